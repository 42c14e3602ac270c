"""The only module that calls MPI.  Every function takes the communicator.

Rules kept here:

* nothing MPI happens at import time; mpi4py is imported on first use, and without it
  (or outside ``mpirun``) a one-rank stand-in communicator is used;
* the caller's communicator is ``Dup()``-ed on entry and the duplicate ``Free()``-d on exit,
  so our messages never mix with the caller's;
* ranks never spin in a blocking collective while others compute: waits go through
  non-blocking requests tested with a short sleep (see ENVIRONMENT.md);
* an error on one rank never leaves the others hanging: failing ranks notify the others
  (point-to-point), and every phase ends in :func:`Mailbox.agree`, which all ranks reach
  and which raises the same exception everywhere when any rank failed.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
import traceback

import numpy as np

from .errors import DistributedError, Interrupted

log = logging.getLogger(__name__)

TAG_NOTICE_ABORT = 71
TAG_NOTICE_PROGRESS = 72
TAG_EXCHANGE = 73

OK, INTERRUPTED, FAILED = 0, 1, 2


def _mpi():
    try:
        from mpi4py import MPI
    except Exception:  # ImportError, or mpi4py without an MPI library
        return None
    return MPI


class SelfComm:
    """A one-rank communicator with the subset of mpi4py's API used here."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    rank = property(Get_rank)
    size = property(Get_size)

    def Dup(self):
        return SelfComm()

    def Free(self):
        pass

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj]

    def gather(self, obj, root=0):
        return [obj]

    def scatter(self, objs, root=0):
        return objs[0]

    def allreduce(self, obj, op=None):
        return obj

    def Barrier(self):
        pass

    def Get_name(self):
        return "SelfComm"


def world():
    """COMM_WORLD if mpi4py works, else a one-rank stand-in."""
    MPI = _mpi()
    return MPI.COMM_WORLD if MPI is not None else SelfComm()


# set by MPI launchers in every process they start (MPICH/Intel MPI, Open MPI, MVAPICH, srun steps)
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def launched_size(environ=None):
    """(number of processes the launcher says it started, variable) or (None, None)."""
    env = os.environ if environ is None else environ
    for var in _LAUNCHER_SIZE_VARS:
        try:
            n = int(env.get(var, ""))
        except ValueError:
            continue
        if n > 0:
            return n, var
    return None, None


def check_world(comm, environ=None) -> None:
    """Refuse to run when a launcher started N > 1 processes but MPI sees a world of 1.

    That happens when ``mpiexec`` and mpi4py come from different MPI libraries: every
    process would believe it is alone and they would all write the same output at once.
    """
    n, var = launched_size(environ)
    if n and n > 1 and comm.Get_size() == 1:
        from .errors import DistributedError

        lib = "no MPI library" if _mpi() is None else _mpi().Get_library_version().splitlines()[0].strip()
        raise DistributedError(
            f"the launcher started {n} processes ({var}={n}) but MPI sees a world of 1 ({lib}): mpiexec/srun "
            "and mpi4py use different MPI libraries, and every process would run alone on the same output. "
            "Use the mpiexec that matches mpi4py (e.g. the one in the same venv for the 'mpich' wheel), or "
            "build mpi4py against the cluster's MPI (see README, Install)."
        )


def dup(comm=None):
    """Duplicate the caller's communicator (COMM_WORLD when None)."""
    comm = world() if comm is None else comm
    return comm.Dup()


def free(comm) -> None:
    try:
        comm.Free()
    except Exception:  # pragma: no cover - already freed / finalized
        pass


def _wait(req, poll=None, interval=0.002):
    """Wait for a request without spinning the CPU."""
    delay = interval
    while True:
        done = req.Test()
        if done:
            return
        if poll is not None:
            poll()
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def quiet_barrier(comm, poll=None) -> None:
    """A barrier that sleeps instead of spinning while it waits."""
    if comm.Get_size() == 1:
        return
    _wait(comm.Ibarrier(), poll)


class Mailbox:
    """Point-to-point notices (abort, progress) plus the collective agreement at phase ends.

    Notices are small pickled messages sent with ``isend``.  Each rank counts what it sent;
    :meth:`agree` exchanges the counts so that every notice is received before the phase
    ends and nothing is left in flight when the communicator is freed.
    """

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._sent = np.zeros((2, self.size), np.int64)  # [abort, progress] per destination
        self._received = np.zeros((2, self.size), np.int64)  # per source
        self._requests = []
        self.abort_seen = None  # (rank, message) of the first abort notice received
        self.progress = {}  # rank -> (blocks done, blocks total), on rank 0
        self.notified = False

    # -- notices ---------------------------------------------------------------
    def _send(self, kind: int, dest: int, payload):
        tag = TAG_NOTICE_ABORT if kind == 0 else TAG_NOTICE_PROGRESS
        self._requests.append(self.comm.isend(payload, dest=dest, tag=tag))
        self._sent[kind, dest] += 1

    def notify_abort(self, message: str) -> None:
        """Tell every other rank that this one failed (once)."""
        if self.notified or self.size == 1:
            self.notified = True
            return
        self.notified = True
        for r in range(self.size):
            if r != self.rank:
                self._send(0, r, (self.rank, message))

    def send_progress(self, done: int, total: int) -> None:
        if self.rank == 0 or self.size == 1:
            self.progress[self.rank] = (done, total)
        else:
            self._send(1, 0, (self.rank, done, total))

    def _receive(self, tag, source):
        payload = self.comm.recv(source=source, tag=tag)
        kind = 0 if tag == TAG_NOTICE_ABORT else 1
        self._received[kind, source] += 1
        if kind == 0:
            if self.abort_seen is None:
                self.abort_seen = payload
        else:
            r, done, total = payload
            self.progress[r] = (done, total)

    def poll(self) -> bool:
        """Receive pending notices; True when some rank asked everyone to stop."""
        if self.size == 1:
            return self.abort_seen is not None
        MPI = _mpi()
        for tag in (TAG_NOTICE_ABORT, TAG_NOTICE_PROGRESS):
            status = MPI.Status()
            while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
                self._receive(tag, status.Get_source())
        return self.abort_seen is not None

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
        if self.size == 1:
            self._finish_state([(state, _describe(error) if error else "", self._sent)], where, error)
            return
        flag = np.array([state], np.int64)
        worst = np.zeros(1, np.int64)
        def poll():
            self.poll()
            if progress is not None:
                progress()

        _wait(self.comm.Iallreduce(flag, worst, op=_mpi().MAX), poll)
        # everyone is here: settle the notice counts, so nothing stays in flight
        info = self.comm.allgather((state, _describe(error) if error else "", self._sent))
        for src, (_, _, sent) in enumerate(info):
            for kind, tag in ((0, TAG_NOTICE_ABORT), (1, TAG_NOTICE_PROGRESS)):
                while self._received[kind, src] < sent[kind, self.rank]:
                    self._receive(tag, src)
        for req in self._requests:
            req.wait()
        self._requests.clear()
        self._finish_state(info, where, error)

    def _finish_state(self, info, where, error):
        failures = [(r, msg) for r, (st, msg, _) in enumerate(info) if st == FAILED]
        if failures:
            head = f"{len(failures)} of {len(info)} rank(s) failed" + (f" during {where}" if where else "")
            lines = [f"rank {r}: {msg}" for r, msg in failures]
            exc = DistributedError(head + ":\n  " + "\n  ".join(lines), failures)
            if error is not None:
                raise exc from error
            raise exc
        if any(st == INTERRUPTED for st, _, _ in info):
            raise Interrupted(
                "stopped by a signal (walltime or preemption) after finishing the blocks in progress; "
                "re-run the same command to resume"
            )


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    msg = str(error).strip() or type(error).__name__
    if not isinstance(error, Exception) or type(error).__module__.startswith("mpicellpose"):
        return msg
    return f"{type(error).__name__}: {msg}"


def format_traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


# --------------------------------------------------------------------------- data movement
def bcast(comm, obj, root=0):
    return comm.bcast(obj, root=root)


def allgather(comm, obj):
    return comm.allgather(obj)


def gather(comm, obj, root=0):
    return comm.gather(obj, root=root)


def _flag_last(items):
    """(is_last, item) for each item; an empty iterable still gives one (True, None)."""
    it = iter(items)
    prev = next(it, _END)
    if prev is _END:
        yield True, None
        return
    while True:
        cur = next(it, _END)
        yield cur is _END, prev
        if cur is _END:
            return
        prev = cur


_END = object()


def exchange(comm, outgoing: dict, sources, on_receive, *, tag: int = TAG_EXCHANGE) -> None:
    """Point-to-point exchange between neighbours, streamed in bounded messages.

    Parameters
    ----------
    outgoing : dict rank -> iterable of objects
        The messages for each destination rank (never self), produced lazily: the next one is
        produced only when the previous send to that rank has completed, so a rank holds at most one
        message per destination at a time.  Every destination gets at least one message (an
        empty iterable sends ``None``).
    sources : iterable of int
        Ranks this rank expects messages from (known from the pure geometry).
    on_receive : callable(src, obj)
        Called for every message received, in order per source; ``None`` messages are skipped.
        It must not raise (record errors and agree on them afterwards): every rank has to see
        the exchange through.
    """
    sources = sorted(set(int(s) for s in sources))
    if comm.Get_size() == 1:
        for _ in outgoing.values():
            pass
        return
    streams = {int(d): _flag_last(items) for d, items in sorted(outgoing.items())}
    reqs = {}
    pending = set(sources)
    delay = 0.001
    while streams or pending:
        progressed = False
        for dest in list(streams):
            req = reqs.get(dest)
            if req is not None:
                if not req.Test():
                    continue
                del reqs[dest]
            step = next(streams[dest], None)
            if step is None:
                del streams[dest]
                continue
            reqs[dest] = comm.isend(step, dest=dest, tag=tag)
            progressed = True
        for src in sorted(pending):
            if comm.iprobe(source=src, tag=tag):
                last, obj = comm.recv(source=src, tag=tag)
                if obj is not None:
                    on_receive(src, obj)
                if last:
                    pending.discard(src)
                progressed = True
        if progressed:
            delay = 0.001
        else:
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)
    for req in reqs.values():
        req.wait()


def allgather_array(comm, arr: np.ndarray) -> np.ndarray:
    """Concatenate one array per rank (along axis 0) on every rank, in rank order."""
    parts = comm.allgather(np.ascontiguousarray(arr))
    return np.concatenate(parts, axis=0) if parts else arr


def alltoall_objects(comm, per_dest: list) -> list:
    """Send ``per_dest[r]`` to rank r; return the list received from every rank."""
    if comm.Get_size() == 1:
        return list(per_dest)
    return comm.alltoall(per_dest)


def node_local(comm):
    """(local rank, local size, node name) via a shared-memory split (1-rank fallback)."""
    MPI = _mpi()
    import socket

    if MPI is None or isinstance(comm, SelfComm):
        return 0, 1, socket.gethostname()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return local.Get_rank(), local.Get_size(), MPI.Get_processor_name()
    finally:
        local.Free()


def payload_nbytes(obj) -> int:
    """Size of an object as pickled (for the communication report)."""
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
