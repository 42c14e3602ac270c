"""Fault injection for the restart, watchdog and signal tests (never set it in production).

``MPICELLPOSE_FAULT="PHASE:RANK:ACTION[:N]"`` (comma separated for several) fires when rank
RANK reaches PHASE (segment, stitch, relabel: with N blocks done there; merge: at the start
of hooking round N of the distributed union-find).  ACTION is

* ``kill``: SIGKILL itself (a node crash);
* ``raise``: a RuntimeError; ``enospc``: a disk-full OSError;
* ``sigusr1``: the walltime warning signal to itself;
* ``hang``: sleep for ever (a stuck rank: hung file system, dead GPU);
* ``mpiblock``: enter a blocking MPI call no other rank enters (a rank whose signal
  handlers cannot run).

Phases that fire in more places: ``finish`` (rank 0, after the table and the output's chunks
are written, before the completion marker).  Faults that are checked rather than fired
(:func:`fault_flag`): ``device:RANK:unusable`` (the rank's GPU is reported unusable at plan time).
"""
from __future__ import annotations

import errno
import os
import signal
import time

from .. import comm as mpi
from .runlog import log

FAULT_ENV = "MPICELLPOSE_FAULT"


def maybe_fault(phase: str, rank: int, count: int = 0) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) < 3 or parts[0] != phase or int(parts[1]) != rank:
            continue
        if count != int(parts[3] if len(parts) > 3 else 0):
            continue
        action = parts[2]
        log.warning("rank %d: injecting fault %r", rank, item)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "raise":
            raise RuntimeError(f"injected fault in {phase}")
        elif action == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        elif action == "sigusr1":
            os.kill(os.getpid(), signal.SIGUSR1)
        elif action == "hang":
            while True:
                time.sleep(3600)
        elif action == "mpiblock":
            mpi.block_inside_mpi()


def fault_flag(phase: str, rank: int) -> str | None:
    """The ACTION of a fault set for ``phase`` on ``rank`` that the code checks instead of firing it
    (``device:RANK:unusable``: the rank's device is reported unusable at plan time), or None."""
    for item in (os.environ.get(FAULT_ENV) or "").split(","):
        parts = item.strip().split(":")
        if len(parts) >= 3 and parts[0] == phase and parts[1].isdigit() and int(parts[1]) == rank:
            log.warning("rank %d: injecting fault %r", rank, item.strip())
            return parts[2]
    return None
