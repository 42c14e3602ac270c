"""Direct tests of the MPI gateway: ``mpiexec -n N python tests/mpi_gateway.py MODE``.

MODE 'mismatch': rank 0 enters one labelled collective, the others another; every rank
must raise the same clear error (no deadlock).  MODE 'exchange': the streamed neighbour
exchange, progress and abort notices, and the agreement that settles them.
"""
import sys

import numpy as np
from mpi4py import MPI

from mpicellpose.comm import Mailbox, dup, free
from mpicellpose.errors import DistributedError

mode = sys.argv[1]
comm = dup(MPI.COMM_WORLD)
box = Mailbox(comm)
rank, size = box.rank, box.size

if mode == "mismatch":
    box.barrier("a step every rank takes")
    try:
        if rank == 0:
            box.bcast("x", "step A")
        else:
            box.allgather("y", "step B")
    except DistributedError as exc:
        print(f"rank {rank}: mismatch seen: {exc}", flush=True)
    # the communicator is still usable afterwards: the ranks were in lockstep
    assert box.allreduce_sum(1, "after the mismatch") == size

elif mode == "exchange":
    # ring: each rank streams 5 arrays to its right neighbour, in messages of 2 arrays
    right, left = (rank + 1) % size, (rank - 1) % size
    got = []

    def messages():
        batch = []
        for i in range(5):
            batch.append(np.full(3, rank * 10 + i))
            if len(batch) == 2:
                yield batch
                batch = []
        if batch:
            yield batch

    box.exchange({right: messages()}, [left], lambda src, obj: got.extend((src, a) for a in obj), "ring")
    assert [src for src, _ in got] == [left] * 5, got
    assert [int(a[0]) for _, a in got] == [left * 10 + i for i in range(5)], got
    # progress notices reach rank 0; an abort notice reaches everyone; agree settles both
    box.send_progress(3, 4, 0.5)
    if rank == size - 1:
        box.notify_abort("stop, please")
    try:
        box.agree(None, where="the test phase")
    except Exception as exc:  # noqa: BLE001 - nobody failed: agree must not raise
        raise SystemExit(f"agree raised {exc!r}")
    if rank != size - 1:
        assert box.abort_seen == (size - 1, "stop, please"), box.abort_seen
    if rank == 0:
        assert box.progress == {r: (3, 4) for r in range(size)}, box.progress
        assert box.slowest_block == 0.5
    # a failure on one rank is raised on every rank, with its message
    try:
        box.agree(RuntimeError("disk on fire") if rank == 1 else None, where="the failing phase")
    except DistributedError as exc:
        assert "rank 1: RuntimeError: disk on fire" in str(exc) and "during the failing phase" in str(exc), exc
    else:
        raise SystemExit("agree did not raise")
    assert not comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)  # nothing left in flight
    print(f"rank {rank}: exchange ok", flush=True)

free(comm)
