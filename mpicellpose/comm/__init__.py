"""The only module that calls MPI.  Every function takes the communicator.

Rules kept here:

* nothing MPI happens at import time; mpi4py is imported on first use, and without it
  (or outside ``mpirun``) a one-rank stand-in communicator is used;
* the caller's communicator is duplicated on entry and the duplicate freed on exit,
  so our messages never mix with the caller's;
* no rank ever blocks inside MPI while it waits for the others: every collective starts
  with a non-blocking *arrival* (``Iallreduce``) tested with a short sleep, and moves its data
  in non-blocking calls waited for the same way (:mod:`.collectives`), so a waiting rank does
  not steal CPU from the ranks still computing (ENVIRONMENT.md), still runs its signal
  handlers, and can watch the others;
* every collective is *labelled*: the arrival compares the label across ranks, so a rank
  that skipped a step (or took an extra one) is reported at once, on every rank, naming
  both steps, instead of deadlocking;
* a rank that waits too long for a silent rank (the watchdog), or that was asked to stop
  and cannot get the others to agree within a grace period, ends the whole job with
  ``MPI_Abort`` and a message: never a hang;
* an error on one rank never leaves the others hanging: failing ranks notify the others
  (point-to-point), and every phase ends in :meth:`Mailbox.agree`, which all ranks reach
  and which raises the same exception everywhere when any rank failed.
"""
from __future__ import annotations

from .mailbox import (EXIT_ERROR, EXIT_INTERRUPTED, STOP_GRACE_SECONDS, WATCHDOG_SECONDS, Mailbox, describe,
                      stop_grace_seconds, watchdog_seconds)
from .queue import Handout
from .streams import exchange
from .world import (SelfComm, block_inside_mpi, check_world, dup, free, launched_size, library_version,
                    mpi_import_error, mpi_standard, processor_name, query_cuda_support, quiet_barrier,
                    thread_level_name, world)

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "STOP_GRACE_SECONDS", "WATCHDOG_SECONDS", "Handout", "Mailbox",
           "SelfComm", "block_inside_mpi", "check_world", "describe", "dup", "exchange", "free", "launched_size",
           "library_version", "mpi_import_error", "mpi_standard", "processor_name", "query_cuda_support",
           "quiet_barrier", "stop_grace_seconds", "thread_level_name", "watchdog_seconds", "world"]
