"""One run per output at a time: :class:`OutputLock`, a lock file beside the output.

Created with O_EXCL (atomic on local file systems, NFSv3+, Lustre and GPFS), it holds the host,
pid, job id and start time and is refreshed every minute by a background thread; a lock whose
process is gone (same host) or that was not refreshed for :data:`LEASE_SECONDS` (any host) is
stale and taken over, so a requeued job takes over its own lock.
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


HEARTBEAT_SECONDS = 60.0


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

    def __init__(self, path, output_name: str):
        self.path = str(path)
        self.output_name = output_name
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None
        self.took_over = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                "job": _job_id(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "token": self.token}

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
        if age > LEASE_SECONDS:
            return f"not refreshed for {age:.0f} s"
        return None

    def _describe(self, info, age) -> str:
        if info is None:
            return "a run whose lock file cannot be read"
        job = f", {info['job']}" if info.get("job") else ""
        return (f"host {info.get('host')}, pid {info.get('pid')}{job}, started {info.get('started')} "
                f"(lock refreshed {age:.0f} s ago)")

    def acquire(self) -> "OutputLock":
        for _ in range(3):
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
                    raise OutputInUseError(
                        f"OUTPUT {self.output_name!r} is in use by another run ({self._describe(info, age)}); "
                        f"wait for it to finish. If that run is dead, remove {self.path!r}")
                aside = f"{self.path}.stale-{self.token[:8]}"
                try:
                    os.rename(self.path, aside)  # atomic: one taker wins
                except FileNotFoundError:
                    continue
                os.unlink(aside)
                self.took_over = f"{self._describe(info, age)}: {why}"
                log.warning("took over the lock of an earlier run that died (%s)", self.took_over)
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
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        info = self._read()
        if info is not None and info.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
