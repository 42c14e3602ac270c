"""Stopping a run: signals, the grace period, and ranks whose launcher died.

* The first SIGTERM, SIGINT or SIGUSR1 asks for a stop.  SIGUSR1 (the batch scripts' "walltime
  soon" signal) lets every rank finish the block in progress.  SIGTERM and SIGINT also abandon
  the Cellpose call in progress (nothing of that block has been recorded yet, so a resume
  redoes it) and a rank that then waits for the others ends the job after a grace period
  (``MPICELLPOSE_STOP_GRACE``, 10 s) if they do not arrive.  Exit code 3, resumable.
* A second signal ends the job at once (``MPI_Abort``, exit 3).
* A guard thread watches what the main thread cannot: a signal that arrived while the main
  thread is stuck inside a C call (it learns of it through ``signal.set_wakeup_fd``), and a
  launcher that died (the parent process changed), after which the rank exits instead of
  spinning.

Handlers are installed only in the main thread and restored on exit, so a host program that
calls :func:`mpicellpose.distributed_eval` gets its own handlers back.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time

log = logging.getLogger(__name__)

FAST = tuple(s for s in (signal.SIGTERM, signal.SIGINT))
SIGNALS = FAST + tuple(s for s in (getattr(signal, "SIGUSR1", None),) if s is not None)
HARD_STOP_MARGIN = 20.0  # beyond the grace period, the guard thread ends a rank stuck in C


class StopNow(BaseException):
    """Raised inside an interruptible section (the backend call) by SIGTERM/SIGINT.

    A BaseException, so that libraries catching ``Exception`` do not swallow it.
    """


class StopFlag:
    """What the signal handler saw: the first signal and when."""

    def __init__(self):
        self.signum = None
        self.t = None
        self.count = 0
        self.interruptible = False

    def __bool__(self):
        return self.signum is not None

    @property
    def fast(self) -> bool:
        return self.signum in FAST

    def note(self, signum):
        if self.signum is None:
            self.signum, self.t = signum, time.monotonic()

    @contextlib.contextmanager
    def interruptible_section(self):
        """Inside, SIGTERM/SIGINT raise :class:`StopNow` (also when it came just before)."""
        if self.signum is not None and self.fast:
            raise StopNow(self.signum)
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False


def _name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class _Guard(threading.Thread):
    def __init__(self, flag, abort, rank, read_fd, watch_parent):
        super().__init__(name="mpicellpose-guard", daemon=True)
        self.flag, self.abort, self.rank = flag, abort, rank
        self.read_fd = read_fd
        self.ppid = os.getppid() if watch_parent else None
        self.done = threading.Event()
        self.seen = 0
        self.t_first = None

    def run(self):
        from ..comm import stop_grace_seconds

        while not self.done.is_set():
            if self.read_fd is not None:
                ready, _, _ = select.select([self.read_fd], [], [], 0.5)
                if ready:
                    try:
                        data = os.read(self.read_fd, 64)
                    except OSError:
                        data = b""
                    for b in data:
                        if b in SIGNALS:
                            self.seen += 1
                            if self.t_first is None and b in FAST:
                                self.t_first = time.monotonic()
                            if self.seen >= 2 and not self.done.is_set():
                                self.abort(3, f"second signal ({_name(b)}): stopping at once. The blocks finished "
                                              f"so far are kept: re-run the same command to resume")
            else:
                self.done.wait(0.5)
            if self.done.is_set():
                return
            if self.ppid is not None and os.getppid() != self.ppid:
                log.error("rank %d: the MPI launcher is gone (parent process %d exited); exiting",
                          self.rank, self.ppid)
                os._exit(1)
            if self.t_first is not None:
                late = time.monotonic() - self.t_first - stop_grace_seconds() - HARD_STOP_MARGIN
                if late > 0 and not self.done.is_set():
                    where = "" if self.flag.signum is not None else " (its handler never ran: stuck in a C call)"
                    self.abort(3, f"rank {self.rank} did not stop within "
                                  f"{stop_grace_seconds() + HARD_STOP_MARGIN:.0f} s of the signal{where}; ending the "
                                  f"job. Re-run the same command to resume")


@contextlib.contextmanager
def handling_signals(flag: StopFlag, abort, rank: int = 0, watch_parent: bool = False):
    """Install the stop handlers and the guard thread for the duration of a run.

    ``abort(code, message)`` ends the job at once (the MPI gateway's hard stop).
    ``watch_parent``: exit when the parent process (the launcher's agent) goes away.
    """
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signum is None:
            log.warning("rank %d: received %s; %s", rank, _name(signum),
                        "finishing the current block, then stopping" if signum not in FAST
                        else "stopping (the block in progress will be redone on resume)")
        flag.note(signum)
        flag.count += 1
        if flag.interruptible and signum in FAST:
            flag.interruptible = False
            raise StopNow(signum)

    old = {}
    read_fd = write_fd = None
    old_wakeup = None
    try:
        for s in SIGNALS:
            old[s] = signal.signal(s, handler)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):  # pragma: no cover - no wakeup fd on this platform
        if write_fd is not None:
            os.close(read_fd)
            os.close(write_fd)
        read_fd = write_fd = None
    guard = _Guard(flag, abort, rank, read_fd, watch_parent)
    guard.start()
    try:
        yield flag
    finally:
        guard.done.set()
        if write_fd is not None:
            signal.set_wakeup_fd(old_wakeup if old_wakeup is not None else -1)
        guard.join(timeout=2.0)
        for s, h in old.items():
            signal.signal(s, h)
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
