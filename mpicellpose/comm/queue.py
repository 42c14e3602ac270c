"""A queue of work items handed out at run time: an MPI-3 atomic counter, no server rank.

:class:`Handout` is what a per-block loop iterates over::

    with Handout(box, shares, dynamic=True, label="segment") as items:
        for item in items:          # the blocks this rank does, one at a time
            if box.poll() or stop:
                break
            ...

``shares`` holds, per rank, the items it would do if every item cost its estimate (see
:mod:`mpicellpose.grid.schedule`: round-robin over the items sorted costliest first).  Every rank
starts with the first item of its own share (no message); every further item is taken from
the common order (:func:`mpicellpose.grid.schedule.interleave` of the shares) at the position an
atomic counter gives: ``MPI_Rget_accumulate(+1)`` on one int64 in a window of rank 0, under
a passive ``MPI_Win_lock_all`` epoch.  Nobody serves: the rank that hosts the counter
computes like the others.  A fast rank simply asks more often, and the costliest items are
handed out first, so the last items to finish are the cheap ones.

Progress.  On one node MPICH performs these atomics itself in shared memory
(``MPI_Win_allocate``): a rank's fetch completes at once even while rank 0 is inside a long
backend call (measured with the MPICH 5 wheel; a window over user memory, ``MPI_Win_create``,
waited 3 s, until rank 0 next entered MPI).  Between nodes a network without hardware atomics
needs the host to enter MPI; so when MPI runs with ``MPI_THREAD_MULTIPLE`` (mpi4py's default)
rank 0 runs a light progress thread while the queue is open: an ``MPI_Iprobe`` every 2 ms
(it made the ``MPI_Win_create`` case answer within a few ms, at no measurable cost).  Knobs
(for tests and odd installations): ``MPICELLPOSE_QUEUE_PROGRESS=0`` turns the thread off,
``MPICELLPOSE_QUEUE_WINDOW=create`` uses ``MPI_Win_create`` (the path a network without
hardware atomics takes).

Waiting never blocks inside MPI: the fetch is a request tested by :meth:`Mailbox.wait`
(short sleeps, notices received, a stop honoured, rank 0 watching); opening and closing are
labelled arrivals of the gateway, so a rank that is elsewhere is reported, not waited for.
When a rank has seen an abort notice it takes nothing more.  ``static`` (``dynamic=False``)
or one rank: each rank iterates its own share, with no MPI at all.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np

from .world import _mpi

log = logging.getLogger("mpicellpose.comm")

HOST = 0                 # the rank whose window holds the counter
PROGRESS_SECONDS = 0.002  # the host's progress thread: one MPI_Iprobe per period
_PROBE_TAG = 79           # never sent: the probe only drives MPI's progress engine


def _interleave(shares) -> list:
    depth = max((len(s) for s in shares), default=0)
    return [s[k] for k in range(depth) for s in shares if k < len(s)]


class Handout:
    """Hands out ``shares`` (per rank, items) at run time (``dynamic``) or as given.

    Collective: every rank of ``box`` enters and leaves it, also ranks with an empty share
    (they take nothing).  ``progress`` is called while a fetch waits (rank 0's display).
    After the loop, ``taken`` lists the items this rank was handed, in order.
    """

    def __init__(self, box, shares, *, dynamic: bool = True, label: str = "blocks", progress=None):
        self.box, self.label, self.progress = box, label, progress
        self.shares = [list(s) for s in shares] + [[] for _ in range(max(0, box.size - len(shares)))]
        self.dynamic = bool(dynamic) and box.size > 1
        self.taken = []
        self.fetches = 0
        self._win = self._buf = self._thread = None
        self._stop = threading.Event()

    # -- collective open / close ---------------------------------------------------
    def __enter__(self):
        if self.dynamic:
            self._open()
        return iter(self)

    def __exit__(self, exc_type, exc, tb):
        if self.dynamic and self._win is not None:
            if exc_type is not None:
                # an error nobody agreed on is leaving the loop: the run ends this job (MPI_Abort);
                # tell the others to stop taking items rather than wait for them at the close
                self.box.notify_abort(f"rank {self.box.rank} left the work queue: {exc_type.__name__}: {exc}")
                self._stop.set()
                return False
            self._close()
        return False

    def _open(self):
        box, MPI = self.box, _mpi()
        box.barrier(f"{self.label}: opening the work queue")
        if os.environ.get("MPICELLPOSE_QUEUE_WINDOW", "allocate") == "create":
            self._buf = np.zeros(1 if box.rank == HOST else 0, np.int64)
            self._win = MPI.Win.Create(self._buf, 8, comm=box.comm)
        else:
            self._win = MPI.Win.Allocate(8 if box.rank == HOST else 0, 8, comm=box.comm)
            if box.rank == HOST:
                np.frombuffer(self._win.tomemory(), np.int64)[:] = 0
        box.barrier(f"{self.label}: work queue ready")   # the counter is zero before anyone adds to it
        self._win.Lock_all(MPI.MODE_NOCHECK)
        if box.rank == HOST and os.environ.get("MPICELLPOSE_QUEUE_PROGRESS", "1") != "0":
            if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
                self._thread = threading.Thread(target=self._progress_loop, args=(box.comm, MPI),
                                                name="mpicellpose-queue-progress", daemon=True)
                self._thread.start()
            else:
                log.warning("MPI was initialised without MPI_THREAD_MULTIPLE: no progress thread for the work "
                            "queue; between nodes a rank may wait for rank 0's current block before it gets "
                            "another")

    def _progress_loop(self, comm, MPI):
        while not self._stop.wait(PROGRESS_SECONDS):
            try:
                comm.Iprobe(source=MPI.ANY_SOURCE, tag=_PROBE_TAG)
            except Exception:  # noqa: BLE001 - MPI is going down: the main thread reports it
                return

    def _close(self):
        self._win.Unlock_all()   # no fetch is outstanding: each one was waited for
        try:
            self.box.barrier(f"{self.label}: closing the work queue")
        finally:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5.0)
                self._thread = None
        self._win.Free()
        self._win = self._buf = None

    # -- the items ----------------------------------------------------------------
    def __iter__(self):
        mine = self.shares[self.box.rank] if self.box.rank < len(self.shares) else []
        if not self.dynamic:
            for item in mine:
                self.taken.append(item)
                yield item
            return
        if not mine:
            return   # more ranks than items: this rank takes part in nothing
        self.taken.append(mine[0])
        yield mine[0]
        order = _interleave(self.shares)
        first_round = sum(1 for s in self.shares if s)
        while not self.box.poll():
            k = self._fetch()
            if k is None or first_round + k >= len(order):
                return
            item = order[first_round + k]
            self.taken.append(item)
            yield item

    def _fetch(self):
        """The counter's value before this rank's +1 (None when an abort came meanwhile)."""
        MPI = _mpi()
        one, got = np.ones(1, np.int64), np.zeros(1, np.int64)
        req = self._win.Rget_accumulate(one, got, HOST, op=MPI.SUM)
        self.box.wait(req, f"{self.label}: taking the next item", self.progress)
        self.fetches += 1
        return None if self.box.abort_seen is not None else int(got[0])
