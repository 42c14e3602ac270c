"""The watchdog of the MPI gateway: rank 0 watches the others, a few ranks watch rank 0.

Every rank that waits at a collective looks, every few tens of milliseconds, at who is
silent.  Rank 0 knows where each rank last arrived and when it last heard from it; rank 0
itself sends a *heartbeat* to a few *watchers* (:func:`watchers`) whenever it waits, polls or
finishes a block, so a rank 0 stuck in a C call, a hung file system or on a dead node is
seen too.  The limit is derived from the run (:func:`watchdog_limit`) unless ``--watchdog``
sets it.  Before ``MPI_Abort`` a rank runs its ``on_abort`` hooks (the output's lock), bounded.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from .world import processor_name

log = logging.getLogger("mpicellpose.comm")
HEARTBEAT = 3   # the gateway's notice kind of a heartbeat (mpicellpose.comm.mailbox)

WATCHDOG_SECONDS = 300.0    # default floor: a rank silent this long (or 10x the slowest block) while others wait
WATCHDOG_BLOCKS = 10.0      # default: the limit is at least this many times the slowest block seen
WATCHDOG_BLOCKS_GIVEN = 4.0  # with --watchdog S: max(S, this many times the slowest block)
WATCHERS = 3                # ranks that watch rank 0's heartbeat (1, the middle one, the last)
ABORT_HOOK_SECONDS = 5.0    # what an abort waits for its hooks (the output's lock) before MPI_Abort
EXIT_ERROR, EXIT_INTERRUPTED = 1, 3


def _seconds(value, default):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if v >= 0 else default


def watchdog_seconds(value=None) -> float:
    """The watchdog in seconds: ``value``, else $MPICELLPOSE_WATCHDOG, else the default floor (0: off)."""
    if value is None:
        value = os.environ.get("MPICELLPOSE_WATCHDOG")
    return _seconds(value, WATCHDOG_SECONDS) if value is not None else WATCHDOG_SECONDS


def watchdog_given(value=None) -> bool:
    """Whether the watchdog was set (``--watchdog`` or $MPICELLPOSE_WATCHDOG) rather than derived."""
    return value is not None or bool(os.environ.get("MPICELLPOSE_WATCHDOG"))


def watchdog_limit(seconds: float, given: bool, slowest_block: float) -> float:
    """The silence that ends the job: derived from the run (``WATCHDOG_BLOCKS`` x the slowest block
    seen, at least ``WATCHDOG_SECONDS``) unless set, then max(set value, 4 x the slowest block).

    >>> watchdog_limit(300.0, False, 60.0), watchdog_limit(20.0, True, 1.0), watchdog_limit(20.0, True, 10.0)
    (600.0, 20.0, 40.0)
    """
    return max(seconds, (WATCHDOG_BLOCKS_GIVEN if given else WATCHDOG_BLOCKS) * float(slowest_block))


def watchers(size: int) -> tuple:
    """The ranks that watch rank 0's heartbeat: 1, the middle one and the last (likely on other nodes).

    >>> watchers(1), watchers(2), watchers(1024)
    ((), (1,), (1, 512, 1023))
    """
    return tuple(sorted({r for r in (1, size // 2, size - 1) if 0 < r < size}))[:WATCHERS]


STOP_GRACE_SECONDS = 10.0   # after SIGTERM/SIGINT, how long a waiting rank waits for the others


def stop_grace_seconds() -> float:
    return _seconds(os.environ.get("MPICELLPOSE_STOP_GRACE"), STOP_GRACE_SECONDS)


class Watchdog:
    """The watching half of :class:`mpicellpose.comm.Mailbox` (a mixin: it uses the gateway's state)."""

    def check_stop(self, label: str, missing=None) -> None:
        """After SIGTERM/SIGINT, tell the others; past the grace period, end the job (exit 3)."""
        stop = self.stop
        if stop is None or stop.signum is None:
            return
        if not self.notified:
            self.notify_abort(f"stop requested by signal {_signame(stop.signum)} on rank {self.rank}")
        if not getattr(stop, "fast", True):
            return
        grace = stop_grace_seconds()
        waited = time.monotonic() - stop.t
        if waited > grace:
            who = self._missing_text(label) if self.rank == 0 else "some ranks"
            self.abort(EXIT_INTERRUPTED,
                       f"stopped by signal {_signame(stop.signum)}: {who} did not reach '{label}' within "
                       f"{grace:.0f} s; ending the job now. The blocks finished so far are kept: re-run the "
                       f"same command to resume")

    def _missing(self):
        return [r for r in range(self.size) if self.arrived[r][0] < self.seq]

    def _missing_text(self, label):
        missing = self._missing()
        if not missing:
            return "no rank"
        now = time.monotonic()
        parts = []
        for r in missing[:8]:
            seq, where = self.arrived[r]
            done = self.progress.get(r)
            state = f"last at '{where}'" + ("" if not done else f", {int(done[0])}/{done[1]} blocks done"
                                            if done[1] >= 0 else f", {int(done[0])} blocks done")
            parts.append(f"rank {r} ({state}, silent for {now - self.last_seen[r]:.0f} s)")
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        return ("" if len(missing) == 1 else f"{len(missing)} ranks: ") + "; ".join(parts) + more

    def limit(self) -> float:
        """The watchdog's limit now (see :func:`watchdog_limit`)."""
        return watchdog_limit(self.watchdog, self.watchdog_given, self.slowest_block)

    def beat(self, force: bool = False) -> None:
        """Rank 0: tell the watchers where it is (at most every ``beat_every`` seconds unless ``force``)."""
        if self.rank != 0 or self.size == 1 or not self.watchdog:
            return
        now = time.monotonic()
        if not force and now - self._last_beat < self.beat_every:
            return
        self._last_beat = now
        done = self.progress.get(0)
        said = {"where": self.where, "done": done, "host": processor_name(), "slowest": self.slowest_block,
                "phase": self.progress_phase}
        for r in self.watchers:
            self._send(HEARTBEAT, r, said)

    def _watch_root(self, label, t0):
        """A watcher, waiting at ``label``: end the job when rank 0 has been silent too long."""
        if not self.watchdog:
            return
        now = time.monotonic()
        limit = self.limit()
        silent = min(now - t0, now - self.root_seen)
        if silent <= limit:
            return
        said = self.root_said
        host = f" on {said['host']}" if said.get("host") else ""
        done = said.get("done")
        blocks = "" if not done else f", {int(done[0])} {said.get('phase', 'segment')} block(s) done"
        self.abort(EXIT_ERROR,
                   f"watchdog: rank 0{host} is silent: rank {self.rank} has waited {now - t0:.0f} s at '{label}' "
                   f"and has had no heartbeat from rank 0 for {now - self.root_seen:.0f} s (limit {limit:.0f} s, "
                   f"--watchdog); rank 0 was last at '{said.get('where')}'{blocks}. Rank 0 is stuck (a hung file "
                   f"system, a GPU that stopped answering, a dead node), so the job is ended; the blocks "
                   f"finished so far are kept: re-run the same command to resume")

    def _watch(self, label, t0):
        if not self.watchdog or self.size == 1:
            return
        missing = self._missing()
        if not missing:
            return
        now = time.monotonic()
        limit = self.limit()
        silent = min(now - t0, max(now - self.last_seen[r] for r in missing))
        if silent > limit:
            self.abort(EXIT_ERROR,
                       f"watchdog: rank 0 has waited {now - t0:.0f} s at '{label}' for "
                       f"{self._missing_text(label)}; no word from them in {limit:.0f} s (--watchdog), so the job "
                       f"is ended. A rank is stuck (a hung file system, a GPU that stopped answering, a bug); "
                       f"the blocks finished so far are kept: re-run the same command to resume")

    def abort(self, code: int, message: str) -> None:
        """End the whole job now (``MPI_Abort``) after printing ``message`` on this rank."""
        with self._abort_lock:
            try:  # one line: the CLI's handler (or logging's last resort) puts it on stderr
                log.error("rank %d: %s", self.rank, message)
                for h in logging.getLogger("mpicellpose").handlers + [logging.lastResort]:
                    if h is not None and hasattr(h, "flush"):
                        h.flush()
                sys.stderr.flush()
                self._run_abort_hooks()
            finally:
                if self.size == 1:
                    os._exit(code)
                self.comm.Abort(code)

    def _run_abort_hooks(self) -> None:
        """Run ``on_abort`` in a daemon thread, waited for at most ``ABORT_HOOK_SECONDS`` (a hung
        file system must not keep the job alive)."""
        hooks, self.on_abort = list(self.on_abort), []
        if not hooks:
            return

        def run():
            for hook in hooks:
                try:
                    hook()
                except Exception as exc:  # noqa: BLE001 - an abort goes on whatever happens
                    log.warning("rank %d: while aborting: %s", self.rank, _describe(exc))

        t = threading.Thread(target=run, name="mpicellpose-abort", daemon=True)
        t.start()
        t.join(ABORT_HOOK_SECONDS)



def _signame(signum) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return str(signum)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    msg = str(error).strip() or type(error).__name__
    if not isinstance(error, Exception) or type(error).__module__.startswith("mpicellpose"):
        return msg
    return f"{type(error).__name__}: {msg}"
