"""In-situ use inside a larger MPI program: ``mpiexec -n 4 python tests/mpi_insitu.py OUT MODE``.

MODE 'split': COMM_WORLD is split in two; each half segments a different volume at the
same time with ``comm=half``.  MODE 'cart': the caller's communicator is a Cartesian one.
MODE 'dup': a duplicate of COMM_WORLD.  Afterwards the world communicator must still work,
no message may be left pending on it, and signal handlers must be as before.
"""
import signal
import sys

import numpy as np
from mpi4py import MPI

import cases

out, mode = sys.argv[1], sys.argv[2]
world = MPI.COMM_WORLD
rank = world.Get_rank()
handlers_before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))

if mode == "split":
    color = rank % 2
    comm = world.Split(color, rank)
    name = ["3d_odd", "2d_many"][color]
elif mode == "cart":
    comm = world.Create_cart([world.Get_size()], periods=[False])
    name = "3d_full"
else:
    comm = world.Dup()
    name = "3d_mask"
labels, boxes = cases.run_case(name, f"{out}/{mode}-{name}", comm=comm)
arr = labels[...]
assert arr.max() == len(boxes)
ref, n = cases.oracle(name)
assert arr.max() == n, (arr.max(), n)
comm.Free()

# the world communicator is intact: a collective works, and nothing is pending on it
assert world.allreduce(1) == world.Get_size()
assert not world.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers_before
assert not MPI.Is_finalized()
checks = world.gather((name, int(arr.max()), int(np.count_nonzero(arr))), root=0)
if rank == 0:
    print("ok", mode, sorted(set(checks)))
