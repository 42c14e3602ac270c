"""Phase 2, every rank: start the backend once, then segment this rank's blocks.

Each block goes through :mod:`mpicellpose.blocks` (read, check, preprocess, backend, number
the core, scratch chunk + record).  Rank 0 prints progress while it works and while it waits;
a failing rank tells the others at once (they stop after their block in progress), and the
phase ends in one agreement, so an error or a stop request ends every rank alike.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .. import comm as mpi
from .. import storage
from ..blocks import build_backend, number_core, record_block, segment_image
from ..errors import BackendError
from ..faults import maybe_fault
from ..runlog import log
from ..signals import StopNow
from ..workdir import WorkDir

PROGRESS_EVERY = 5.0  # seconds between rank 0's progress lines


@dataclass(frozen=True)
class Segmented:
    blocks_now: int      # blocks segmented by all ranks in this run
    seconds: float


def fmt_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Rank 0's progress line, at most every few seconds (also while it waits)."""

    def __init__(self, box, total: int):
        self.box, self.total = box, total
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, force: bool = False) -> None:
        if self.box.rank != 0:
            return
        self.box.poll()
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY and not force:
            return
        self.last = now
        done = sum(d for d, _ in self.box.progress.values())
        el = now - self.t0
        rate = done / el if el > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else math.nan
        log.info("segment: %d/%d blocks (%.0f%%), %.2f blocks/s, ETA %s", done, self.total,
                 100.0 * done / max(self.total, 1), rate, fmt_eta(eta) if rate > 0 else "?")


def start_backend(cfg, plan, box, my_blocks):
    """(backend or None, scratch array): every rank takes part, with or without blocks."""
    with box.step("backend start-up"):
        scratch = storage.open_array(WorkDir(plan.work_dir).scratch, mode="r+")
        backend = build_backend(cfg, plan.settings, plan.normalization, box, load=bool(my_blocks))
    return backend, scratch


def _block_error(exc, blk):
    """The error to report for a block: ours name it already; others get its name."""
    if getattr(exc, "block", None) is not None:
        return exc
    err = BackendError(f"block {blk.index} (#{blk.linear}): {mpi.describe(exc)}")
    err.__cause__ = exc
    return err


def segment_phase(cfg, plan, box, stop, src, my_blocks, backend, scratch) -> Segmented:
    t0 = time.perf_counter()
    grid, work = plan.grid, WorkDir(plan.work_dir)
    progress = Progress(box, sum(len(a) for a in plan.segment_assignment))
    err, done = None, 0
    for linear in my_blocks:
        if box.poll() or stop:
            break
        blk = grid.block(linear)
        t_block = time.perf_counter()
        try:
            labels = segment_image(src, blk, plan.settings, cfg.preprocessing_steps, backend, stop)
            read_local, n, core = number_core(labels, blk)
            maybe_fault("segment", box.rank, done)
            record_block(work, scratch, grid, blk, plan.settings, cfg.iou_depth, read_local, n, core)
        except StopNow:
            break  # the block in progress is not recorded: a resume redoes it
        except Exception as exc:  # noqa: BLE001 - agreed below, on every rank
            err = _block_error(exc, blk)
            log.error("rank %d: %s", box.rank, err)
            box.notify_abort(str(err))
            break
        done += 1
        box.send_progress(done, len(my_blocks), time.perf_counter() - t_block)
        progress(force=done == 1)
    if stop and err is None:
        box.notify_abort("stop requested by signal")
    box.agree(err, interrupted=bool(stop), where="segmentation", progress=progress)
    return Segmented(progress.total, time.perf_counter() - t0)
