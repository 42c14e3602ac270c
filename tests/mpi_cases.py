"""Run every oracle case on COMM_WORLD: ``mpiexec -n N python tests/mpi_cases.py OUT_DIR``."""
import sys

from mpi4py import MPI

import cases

out = sys.argv[1]
names = sys.argv[2:] or list(cases.CASES)
for name in names:
    labels, boxes = cases.run_case(name, out, comm=MPI.COMM_WORLD)
# the world communicator is still usable afterwards (nothing finalized, nothing leaked)
total = MPI.COMM_WORLD.allreduce(1)
assert total == MPI.COMM_WORLD.Get_size()
if MPI.COMM_WORLD.Get_rank() == 0:
    print("ok", len(names))
