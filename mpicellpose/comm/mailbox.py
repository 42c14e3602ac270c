"""The MPI gateway of a run: labelled collectives, notices, agreements, the watchdog.

See :mod:`mpicellpose.comm` for the rules it keeps."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib

import numpy as np

from ..errors import DistributedError, Interrupted
from . import streams
from .collectives import DataSteps
from .watchdog import (EXIT_ERROR, EXIT_INTERRUPTED, STOP_GRACE_SECONDS, WATCHDOG_SECONDS,  # noqa: F401
                       Watchdog, _describe, stop_grace_seconds, watchdog_given, watchdog_limit, watchdog_seconds,
                       watchers)
from .world import _mpi, processor_name

log = logging.getLogger("mpicellpose.comm")

TAG_NOTICE_ABORT = 71
TAG_NOTICE_PROGRESS = 72
TAG_NOTICE_ARRIVAL = 74
TAG_NOTICE_HEARTBEAT = 75
_TAGS = (TAG_NOTICE_ABORT, TAG_NOTICE_PROGRESS, TAG_NOTICE_ARRIVAL, TAG_NOTICE_HEARTBEAT)  # kind k: _TAGS[k]
ABORT, PROGRESS, ARRIVAL, HEARTBEAT = 0, 1, 2, 3

OK, INTERRUPTED, FAILED = 0, 1, 2
MESSAGE_CHARS = 2000   # of one rank's error in an agreement's report
MESSAGE_RANKS = 32     # failing ranks named one by one in that report (then a count)

# a waiting rank sleeps WAIT_FIRST_SLEEP, then longer, between tests: a collective completes only as its ranks
# test it (log2(ranks) steps for an allreduce), so long sleeps add up at scale (measured on 2 cores: 8 ranks,
# a labelled barrier took 42 ms with 2 -> 10 ms sleeps, 14 ms with 0.2 -> 2 ms; 64 ranks 99 -> 28 ms, and less
# CPU in all, as the waits end sooner).  Sleeps stay <= WAIT_SHORT_SLEEP for the first WAIT_SHORT_FOR
# seconds of a wait (most collectives), then grow to WAIT_MAX_SLEEP: a test costs ~20 us, and a rank that
# waits minutes for the others (the end of the segment phase) takes ~0.2 % of a core.
WAIT_FIRST_SLEEP = 0.0002
WAIT_SHORT_SLEEP = 0.002
WAIT_SHORT_FOR = 0.2
WAIT_MAX_SLEEP = 0.01
WAIT_CHORES = 0.025   # seconds between a waiting rank's looks at notices, the stop flag and the watchdog


def _label_hash(label: str) -> int:
    return zlib.crc32(label.encode()) + 1  # > 0


class Mailbox(Watchdog, DataSteps):
    """The MPI gateway of a run: labelled collectives, notices, the watchdog and hard stops.

    Notices are small pickled point-to-point messages sent with ``isend``: *abort* (a rank
    failed or was asked to stop), *progress* (to rank 0, per block) and *arrival* (to rank 0,
    each time a rank enters a collective).  Each rank counts what it sent; :meth:`agree`
    exchanges the counts so that every notice is received before the phase ends and nothing
    is left in flight when the communicator is freed.

    Rank 0 is the watchdog: it knows where every rank last arrived and when it last heard
    from it, so when it has waited at a collective for a rank that has been silent longer
    than the limit (:func:`watchdog_limit`), it names the phase and the missing ranks and ends
    the job.  Rank 0 in turn sends a *heartbeat* (where it is, blocks done) to a few watchers
    (:func:`watchers`) whenever it waits, polls or finishes a block; a watcher that waits at a
    collective and has not heard from rank 0 for longer than the limit names rank 0 and its
    step and ends the job.  ``on_abort``: callables run (bounded) before any ``MPI_Abort``
    of this rank, e.g. releasing the output's lock.
    """

    def __init__(self, comm, *, watchdog=None, stop=None):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._sent = np.zeros((len(_TAGS), self.size), np.int64)  # [abort, progress, arrival, beat] per dest
        self._received = np.zeros((len(_TAGS), self.size), np.int64)  # per source
        self._requests = []
        self.abort_seen = None  # (rank, message) of the first abort notice received
        self.progress = {}  # rank -> (blocks done, blocks total), on rank 0
        self.progress_phase = "segment"  # the phase whose progress is counted (see start_progress)
        self.work = {}  # rank -> (voxels done, voxels of the block in progress), on rank 0 (run-time hand-out)
        self.notified = False
        self.watchdog = watchdog_seconds(watchdog)
        self.watchdog_given = watchdog_given(watchdog)
        self.on_abort = []   # callables run before this rank calls MPI_Abort (bounded)
        self.watchers = watchers(self.size)
        self.beat_every = max(0.2, min(5.0, (self.watchdog or WATCHDOG_SECONDS) / 8))
        self._last_beat = 0.0
        self.stop = stop  # an object with .signum/.t (see mpicellpose.runner.signals.StopFlag) or None
        self.seq = 0  # collectives entered on this rank
        self.where = "start-up"
        now = time.monotonic()
        self.last_seen = {r: now for r in range(self.size)}  # rank 0: when each rank was last heard
        self.arrived = {r: (0, "start-up") for r in range(self.size)}  # rank 0: (seq, label) per rank
        self.slowest_block = 0.0
        self.root_seen = now   # watchers: when rank 0 was last heard of, and what it said
        self.root_said = {"where": "start-up", "done": None, "host": None}
        self._abort_lock = threading.Lock()

    # -- notices ---------------------------------------------------------------
    def _send(self, kind: int, dest: int, payload):
        self._requests.append(self.comm.isend(payload, dest=dest, tag=_TAGS[kind]))
        self._sent[kind, dest] += 1
        if len(self._requests) > 64:  # keep the list short: drop completed sends
            self._requests = [r for r in self._requests if not r.Test()]

    def notify_abort(self, message: str) -> None:
        """Tell every other rank that this one failed or was asked to stop (once)."""
        if self.notified or self.size == 1:
            self.notified = True
            return
        self.notified = True
        for r in range(self.size):
            if r != self.rank:
                self._send(ABORT, r, (self.rank, message))

    def send_progress(self, done: int, total: int, seconds: float = 0.0, work=None) -> None:
        """Report blocks done (to rank 0); ``seconds`` is how long the last block took; ``work``:
        (voxels done, voxels of the block now in progress), when blocks are handed out at run time."""
        if self.rank == 0 or self.size == 1:
            self.progress[self.rank] = (done, total)
            if work is not None:
                self.work[self.rank] = tuple(work)
            self.slowest_block = max(self.slowest_block, float(seconds))
            self.beat(force=True)
        else:
            self._send(PROGRESS, 0, (self.rank, done, total, float(seconds), work, self.progress_phase))

    def start_progress(self, phase: str) -> None:
        """Count progress afresh for ``phase`` (reports of an earlier phase arriving late are ignored)."""
        self.progress_phase = phase
        self.progress.clear()
        self.work.clear()

    def _receive(self, kind, source):
        """Receive one notice of ``kind`` from ``source`` (None: from any rank)."""
        if source is None:
            status = _mpi().Status()
            payload = self.comm.recv(source=_mpi().ANY_SOURCE, tag=_TAGS[kind], status=status)
            source = status.Get_source()
        else:
            payload = self.comm.recv(source=source, tag=_TAGS[kind])
        self._received[kind, source] += 1
        self.last_seen[source] = time.monotonic()
        if kind == ABORT:
            if self.abort_seen is None:
                self.abort_seen = payload
        elif kind == HEARTBEAT:
            self.root_seen = self.last_seen[0]
            self.root_said = payload
            self.slowest_block = max(self.slowest_block, float(payload.get("slowest", 0.0)))
        elif kind == PROGRESS:
            r, done, total, seconds, work, phase = payload
            self.slowest_block = max(self.slowest_block, seconds)
            if phase == self.progress_phase:
                self.progress[r] = (done, total)
                if work is not None:
                    self.work[r] = tuple(work)
        else:
            r, seq, label = payload
            self.arrived[r] = (seq, label)

    def poll(self) -> bool:
        """Receive pending notices; True when some rank asked everyone to stop."""
        if self.size == 1:
            return self.abort_seen is not None
        self.beat()
        MPI = _mpi()
        status = MPI.Status()
        for kind, tag in enumerate(_TAGS):
            while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
                self._receive(kind, status.Get_source())
        return self.abort_seen is not None

    # -- waiting -----------------------------------------------------------------
    def wait(self, req, label: str, progress=None) -> None:
        """Wait for a request without spinning; meanwhile receive notices, honour a stop
        request and (rank 0) watch the other ranks.

        The request is tested after every sleep (see ``WAIT_FIRST_SLEEP``); the
        rest (notices, the stop flag, the watchdog, ``progress``) is looked at every
        ``WAIT_CHORES`` seconds: with tens of ranks waiting on each core, what a waiting
        rank does per test is CPU taken from the ranks still computing."""
        if req.Test():
            return
        t0 = time.monotonic()
        chores = t0
        delay = WAIT_FIRST_SLEEP
        while True:
            now = time.monotonic()
            if now >= chores:
                chores = now + WAIT_CHORES
                self.poll()
                if progress is not None:
                    progress()
                self.check_stop(label)
                if self.rank == 0:
                    self._watch(label, t0)
                elif self.rank in self.watchers:
                    self._watch_root(label, t0)
            time.sleep(delay)
            delay = min(delay * 1.5, WAIT_SHORT_SLEEP if now - t0 < WAIT_SHORT_FOR else WAIT_MAX_SLEEP)
            if req.Test():
                return

    # -- labelled collectives ----------------------------------------------------
    def _enter(self, label: str, state: int = OK, progress=None, largest=None) -> int:
        """Arrive at a collective: tell rank 0, wait for everyone without spinning, and check
        that every rank arrived at the same step.  Returns the worst state of all ranks; with
        ``largest`` (an int), the pair (worst state, the largest ``largest`` of all ranks)."""
        self.seq += 1
        self.where = label
        if self.size == 1:
            return state if largest is None else (state, largest)
        if self.rank == 0:
            self.arrived[0] = (self.seq, label)
        else:
            self._send(ARRIVAL, 0, (self.rank, self.seq, label))
        h = _label_hash(label)
        mine = np.array([state, h, -h] + ([] if largest is None else [int(largest)]), np.int64)
        worst = np.zeros_like(mine)
        self.wait(self.comm.Iallreduce(mine, worst, op=_mpi().MAX), label, progress)
        if worst[1] != -worst[2]:  # not every rank is at this step: say where each one is
            labels = self.comm.allgather(label)
            groups = {}
            for r, lab in enumerate(labels):
                groups.setdefault(lab, []).append(r)
            where = "; ".join(f"rank(s) {_ranks(rs)} at '{lab}'" for lab, rs in groups.items())
            exc = DistributedError(f"internal error: the ranks reached different steps ({where}); "
                                   f"please report this with the command line", [(self.rank, where)])
            exc.agreed = True
            raise exc
        return int(worst[0]) if largest is None else (int(worst[0]), int(worst[3]))

    def barrier(self, label: str) -> None:
        self._enter(label)

    def scatter(self, objs, label: str, root: int = 0):
        self._enter(label)
        return self.comm.scatter(objs, root=root)

    def gather(self, obj, label: str, root: int = 0):
        self._enter(label)
        return self.comm.gather(obj, root=root)

    def node_local(self, label: str = "finding the ranks of each node"):
        """(local rank, local size, node name): ranks grouped by processor name."""
        host = processor_name()
        hosts = self.allgather(host, label)
        same = [r for r, h in enumerate(hosts) if h == host]
        return same.index(self.rank), len(same), host

    def exchange(self, outgoing: dict, sources, on_receive, label: str) -> None:
        """Point-to-point exchange between neighbours, streamed (see :func:`.streams.exchange`)."""
        self._enter(label)
        def idle():
            self.beat()
            self.check_stop(label)

        streams.exchange(self.comm, outgoing, sources, on_receive, idle=idle)

    # -- phases ------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, where: str, *, interrupted=None):
        """A piece of work every rank does, ended by an agreement::

            with box.step("writing the table"):
                ...   # an exception here is caught and raised on every rank

        ``interrupted``: a callable telling whether a stop was requested meanwhile.
        """
        error = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - agreed below, on every rank
            error = exc
        self.agree(error, where=where, interrupted=bool(interrupted and interrupted()))

    def on_root(self, fn, where: str):
        """Run ``fn()`` on rank 0 only, agree on its success, and return its result on every rank."""
        result = None
        with self.step(where):
            if self.rank == 0:
                result = fn()
        return self.bcast(result, f"result of {where}")

    # -- agreement -------------------------------------------------------------
    def agree(self, error: BaseException | None = None, *, interrupted: bool = False, where: str = "",
              progress=None) -> None:
        """Collective end of a phase: raise everywhere if any rank failed.

        Every rank must call it exactly once per phase; ``progress`` is called while it
        waits (rank 0's progress lines).  Raises
        :class:`DistributedError` (any rank failed) or :class:`Interrupted` (a rank was
        asked to stop by a signal), with the same message on every rank.
        """
        state = FAILED if error is not None else INTERRUPTED if interrupted else OK
        if error is not None and not self.notified:
            self.notify_abort(_describe(error))
        label = f"end of {where}" if where else "end of a phase"
        if self.size == 1:
            self.seq += 1
            self._finish_state([(0, state, _describe(error) if error else "")], where, error)
            return
        worst = self._enter(label, state, progress)
        # everyone is here: settle the notice counts, so nothing stays in flight.  A reduce-scatter
        # gives each rank how many notices of each kind all the others sent it (3 numbers per rank,
        # not every rank's counts on every rank); they were sent before their senders arrived here
        sent = np.ascontiguousarray(self._sent.T)                   # row d: what this rank sent to d
        expected = np.zeros(len(_TAGS), np.int64)
        self.wait(self.comm.Ireduce_scatter_block(sent, expected, op=_mpi().SUM), label)
        for kind in range(len(_TAGS)):
            while self._received[kind].sum() < expected[kind]:
                self._receive(kind, None)
        for req in self._requests:
            req.wait()
        self._requests.clear()
        if worst == OK:
            return
        # someone failed or was stopped: the messages of the failing ranks only, to every rank
        mine = (state, _describe(error)[:MESSAGE_CHARS] if error else "")
        got = self.comm.gather(mine if state != OK else None, root=0)
        info = None if self.rank else [(r, st, msg) for r, x in enumerate(got) if x is not None for st, msg in [x]]
        self._finish_state(self.comm.bcast(info, root=0), where, error)

    def _finish_state(self, info, where, error):
        """``info``: (rank, state, message) of the ranks that did not end OK."""
        failures = [(r, msg) for r, st, msg in info if st == FAILED]
        if failures:
            head = f"{len(failures)} of {self.size} rank(s) failed" + (f" during {where}" if where else "")
            lines = [f"rank {r}: {msg}" for r, msg in failures[:MESSAGE_RANKS]]
            if len(failures) > MESSAGE_RANKS:
                lines.append(f"... and {len(failures) - MESSAGE_RANKS} more rank(s)")
            exc = DistributedError(head + ":\n  " + "\n  ".join(lines), failures)
            exc.agreed = True
            if error is not None:
                raise exc from error
            raise exc
        if any(st == INTERRUPTED for _, st, _ in info):
            exc = Interrupted(
                "stopped by a signal (walltime or preemption); what was finished is kept on disk: re-run the "
                "same command to resume"
            )
            exc.agreed = True
            raise exc


def _ranks(rs) -> str:
    return ",".join(str(r) for r in rs[:16]) + (f",... ({len(rs)})" if len(rs) > 16 else "")


describe = _describe
