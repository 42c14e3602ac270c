"""The run-time hand-out on COMM_WORLD: ``mpiexec -n N python tests/mpi_queue.py CASE``.

``busy-host``: rank 0 sleeps 3 s (no MPI call) in its first item while the others take the
rest, 20 ms each: every item is handed out exactly once and the others are not held up.
``few``: more ranks than items.  ``abort``: rank 1 fails in its second item; every rank stops
taking items and leaves the queue."""
import json
import sys
import time

from mpi4py import MPI

from mpicellpose.comm import Handout, Mailbox
from mpicellpose.grid.schedule import round_robin_shares

case = sys.argv[1]
comm = MPI.COMM_WORLD.Dup()
box = Mailbox(comm)
n_items = {"busy-host": 120, "few": 3, "abort": 200}[case]
shares = round_robin_shares(list(range(n_items)), box.size)
got, stamps, t0 = [], [], time.monotonic()
with Handout(box, shares, dynamic=True, label="test") as items:
    for item in items:
        if box.poll():
            break
        got.append(item)
        stamps.append(time.monotonic() - t0)
        if case == "busy-host" and box.rank == 0:
            time.sleep(3.0)
        elif case == "abort" and box.rank == 1 and len(got) == 2:
            box.notify_abort("rank 1 failed")
            break
        else:
            time.sleep(0.02)
everything = comm.gather((box.rank, got, stamps), root=0)
box.agree(None, where="test end")
if box.rank == 0:
    print("RESULT " + json.dumps(everything), flush=True)
comm.Free()
