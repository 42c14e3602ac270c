"""One run per output at a time: :class:`OutputLock`, a lock file beside the output.

Created with O_EXCL (atomic on local file systems, NFSv3+, Lustre and GPFS), it holds the host,
pid, scheduler job id, start time and lease and is refreshed by a background thread (every
minute, or a quarter of the lease).  A lock is taken over, with a log line, when

* its process is gone (same host),
* it was left by the same scheduler job (``SLURM_JOB_ID``, ``LSB_JOBID``, ...: the job was
  requeued, possibly on other nodes, or an earlier step of the job died), or
* it was not refreshed for its lease (:data:`LEASE_SECONDS`, ``MPICELLPOSE_LOCK_LEASE``): any host.

A live lock of another run makes this one wait (``--lock-wait``; by default, inside a scheduler
job, a little longer than a lease: a requeued job often starts before the old job's lease has
run out; outside one, not at all) before it fails.  The driver releases the lock on every
error and, through the gateway's abort hooks, before an ``MPI_Abort`` of rank 0.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from ..errors import OutputInUseError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one run per output
LEASE_SECONDS = 600.0      # a lock not refreshed for this long belongs to a dead run
HEARTBEAT_SECONDS = 60.0   # at most; a quarter of the lease when that is shorter
WAIT_TICK = 0.5            # seconds between the ``tick`` calls while waiting for a lock


def lease_seconds() -> float:
    """The lease this run writes into its lock: $MPICELLPOSE_LOCK_LEASE, else :data:`LEASE_SECONDS`."""
    try:
        v = float(os.environ.get("MPICELLPOSE_LOCK_LEASE", LEASE_SECONDS))
    except ValueError:
        return LEASE_SECONDS
    return v if v > 0 else LEASE_SECONDS


def default_wait(lease: float | None = None) -> float:
    """How long to wait for another run's live lock when ``--lock-wait`` is not given: a lease and
    two refreshes inside a scheduler job (a requeue waits out the old job's lease), else 0."""
    if os.environ.get("MPICELLPOSE_LOCK_WAIT"):
        try:
            return max(0.0, float(os.environ["MPICELLPOSE_LOCK_WAIT"]))
        except ValueError:
            pass
    lease = lease_seconds() if lease is None else lease
    return lease + 2 * min(HEARTBEAT_SECONDS, lease / 4) if _job_id() else 0.0


_JOB_VARS = ("SLURM_JOB_ID", "LSB_JOBID", "PBS_JOBID", "FLUX_JOB_ID", "JOB_ID")


def _proc_start(pid: int):
    """Start time of a process (clock ticks since boot) from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # exited, not yet reaped
                return False
    except (OSError, IndexError):
        pass
    now_start = _proc_start(pid)
    return start is None or now_start is None or now_start == start


def _job_id():
    for var in _JOB_VARS:
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


class OutputLock:
    """An exclusive lock on an output: a file created with O_EXCL (atomic on local file
    systems, NFSv3+, Lustre and GPFS), holding host, pid, job id and start time, refreshed
    every minute by a background thread.  A lock whose process is gone (same host) or that
    was not refreshed for ``LEASE_SECONDS`` (any host) is stale and taken over."""

    def __init__(self, path, output_name: str, *, wait: float | None = None, tick=None):
        self.path = str(path)
        self.output_name = output_name
        self.token = uuid.uuid4().hex
        self.lease = lease_seconds()
        self.wait = default_wait(self.lease) if wait is None else max(0.0, float(wait))
        self.tick = tick   # called every WAIT_TICK seconds while waiting (rank 0's heartbeat)
        self._stop = threading.Event()
        self._thread = None
        self.took_over = None
        self.released = False
        self._logged = None   # when the last "waiting" line was written

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                "job": _job_id(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "lease": self.lease, "token": self.token}

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _stale(self, info, age) -> str | None:
        if info is None:
            return "unreadable lock file" if age > HEARTBEAT_SECONDS else None
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            if not _alive(info["pid"], info.get("proc_start")):
                return f"process {info['pid']} on {info['host']} is gone"
            return None
        if info.get("job") and info.get("job") == _job_id():
            return f"it was left by this same scheduler job ({info['job']}): the job was requeued or restarted"
        lease = info.get("lease") if isinstance(info.get("lease"), (int, float)) else LEASE_SECONDS
        if age > lease:
            return f"not refreshed for {age:.0f} s (its lease is {lease:.0f} s)"
        return None

    def _describe(self, info, age) -> str:
        if info is None:
            return "a run whose lock file cannot be read"
        job = f", {info['job']}" if info.get("job") else ""
        return (f"host {info.get('host')}, pid {info.get('pid')}{job}, started {info.get('started')} "
                f"(lock refreshed {age:.0f} s ago)")

    def _wait_or_fail(self, info, age, t0) -> None:
        """Another run's live lock: wait a little (calling ``tick``), or fail once ``wait`` has passed."""
        waited = time.monotonic() - t0
        if waited >= self.wait:
            more = f" (waited {waited:.0f} s, --lock-wait)" if self.wait else ""
            raise OutputInUseError(
                f"OUTPUT {self.output_name!r} is in use by another run ({self._describe(info, age)}){more}; "
                f"wait for it to finish. If that run is dead, remove {self.path!r}")
        if self._logged is None or time.monotonic() - self._logged >= 60:
            self._logged = time.monotonic()
            log.warning("OUTPUT %r is locked by another run (%s); waiting up to %.0f s more for it to end or for "
                        "its lease to run out (--lock-wait)", self.output_name, self._describe(info, age),
                        self.wait - waited)
        end = time.monotonic() + min(5.0, self.wait - waited)
        while time.monotonic() < end:
            if self.tick is not None:
                self.tick()
            time.sleep(min(WAIT_TICK, max(0.0, end - time.monotonic())))

    def acquire(self) -> "OutputLock":
        t0, tries = None, 0
        while tries < 3:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    age = time.time() - os.stat(self.path).st_mtime
                except FileNotFoundError:
                    continue
                info = self._read()
                why = self._stale(info, age)
                if why is None:
                    t0 = time.monotonic() if t0 is None else t0
                    self._wait_or_fail(info, age, t0)
                    continue
                aside = f"{self.path}.stale-{self.token[:8]}"
                try:
                    os.rename(self.path, aside)  # atomic: one taker wins
                except FileNotFoundError:
                    continue
                os.unlink(aside)
                tries += 1
                self.took_over = f"{self._describe(info, age)}: {why}"
                log.warning("took over the lock of an earlier run (%s)", self.took_over)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="mpicellpose-lock", daemon=True)
            self._thread.start()
            return self
        raise OutputInUseError(f"could not take the lock {self.path!r} (another run keeps taking it)")

    def _heartbeat(self):
        while not self._stop.wait(min(HEARTBEAT_SECONDS, self.lease / 4)):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent; also called before an ``MPI_Abort``)."""
        if self.released:
            return
        self.released = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        info = self._read()
        if info is not None and info.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
