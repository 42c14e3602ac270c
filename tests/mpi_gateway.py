"""Direct tests of the MPI gateway: ``mpiexec -n N python tests/mpi_gateway.py MODE``.

MODE 'collectives': every labelled collective gives what mpi4py's own would (objects,
numbers, numeric arrays, rows of arrays in rounds).  MODE 'mismatch': rank 0 enters one
labelled collective, the others another; every rank must raise the same clear error (no
deadlock).  MODE 'exchange': the streamed neighbour
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

elif mode == "collectives":
    obj = {"rank": rank, "a": np.arange(rank + 1), "s": "x" * rank}
    for got in (box.allgather(obj, "allgather"), comm.allgather(obj)):
        assert [g["rank"] for g in got] == list(range(size))
        assert all(np.array_equal(g["a"], np.arange(r + 1)) and g["s"] == "x" * r for r, g in enumerate(got))
    root = size - 1
    got = box.bcast(obj if rank == root else None, "bcast", root=root)
    assert got["rank"] == root and np.array_equal(got["a"], np.arange(root + 1)) and got is not obj
    assert box.bcast(None, "bcast None") is None
    big = {"a": np.arange(5000) * (rank + 1)}   # past the inline part: two steps
    assert np.array_equal(box.bcast(big if rank == 0 else None, "bcast big")["a"], np.arange(5000))
    got = box.allgather(big if rank % 2 else rank, "allgather, some big")
    assert all(np.array_equal(g["a"], np.arange(5000) * (r + 1)) if r % 2 else g == r for r, g in enumerate(got))
    sent = [(rank, d, np.full(d + rank, rank)) for d in range(size)]
    got = box.alltoall(sent, "alltoall")
    assert [g[:2] for g in got] == [(s, rank) for s in range(size)], got
    assert all(np.array_equal(g[2], np.full(rank + s, s)) for s, g in enumerate(got))
    assert box.allreduce_sum(rank + 1, "int") == size * (size + 1) // 2
    assert isinstance(box.allreduce_sum(rank, "int type"), int)
    assert box.allreduce_sum(0.5, "float") == 0.5 * size
    v = box.allreduce_sum(np.array([rank, 1], np.int64), "array")
    assert v.dtype == np.int64 and v.tolist() == [size * (size - 1) // 2, size]
    assert box.allreduce_sum([rank], "list (pickled)") == list(range(size))
    assert box.exscan_sum(rank + 1, "exscan") == (rank * (rank + 1) // 2, size * (size + 1) // 2)
    # rows to every rank, in several rounds (a small budget), dtypes and trailing shapes kept
    n = 50 + 7 * rank
    dest = np.arange(n) % size
    rows = (np.arange(n, dtype=np.int64) + 1000 * rank, np.ones((n, 3), np.float32) * rank)
    parts = [tuple(c[dest == d] for c in rows) for d in range(size)]
    got = box.alltoall_arrays(parts, "rows", budget=64)
    assert box.last_rounds > 1 or size == 1
    for s, (ids, vals) in enumerate(got):
        m = 50 + 7 * s
        assert ids.dtype == np.int64 and vals.dtype == np.float32 and vals.shape == (ids.size, 3)
        assert ids.tolist() == [i + 1000 * s for i in range(m) if i % size == rank], (s, ids)
        assert (vals == s).all()
    again = box.alltoall_arrays(parts, "rows, one round without a plan")   # small: no plan, one round
    assert box.last_rounds == 1
    assert all(np.array_equal(a[0], g[0]) and np.array_equal(a[1], g[1]) for a, g in zip(again, got))
    empty = box.alltoall_arrays([(np.zeros(0, np.int64),)] * size, "nothing")
    assert box.last_rounds == 0 and all(e[0].size == 0 for e in empty)
    print(f"rank {rank}: collectives ok", flush=True)

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
