"""Phase 2, every rank: start the backend once, then segment this rank's blocks.

Each block goes through :mod:`mpicellpose.runner.blocks` (read, check, preprocess, backend,
number the core, scratch chunk + record), in the loop of :mod:`.blockloop`.  Rank 0 shows the
progress while it works and while it waits (:class:`mpicellpose.runner.progress.Progress`); a
failing rank tells the others at once (they stop after their block in progress), and the phase
ends in one agreement, so an error or a stop request ends every rank alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ... import comm as mpi
from ...errors import BackendError
from ...volumes import storage
from ..blocks import block_image, build_backend, number_core, record_block, segment_image
from ..faults import maybe_fault
from ..progress import Progress
from ..runlog import log
from .blockloop import read_ahead_wanted, run_blocks


@dataclass(frozen=True)
class Segmented:
    blocks_now: int      # blocks segmented by all ranks in this run
    seconds: float


def start_backend(ctx, my_blocks):
    """(backend or None, scratch array): every rank takes part, with or without blocks."""
    plan, box = ctx.plan, ctx.box
    model = plan.resolved_model
    if box.rank == 0 and model and ctx.options.cellpose:
        log.info("loading model %s (%s) on the rank(s) with blocks", model.get("name"),
                 model.get("path") or "downloaded by Cellpose")
    with box.step("backend start-up"):
        scratch = storage.open_array(ctx.work.scratch, mode="r+")
        backend = build_backend(ctx.options, plan.settings, plan.normalization, box, load=bool(my_blocks))
    return backend, scratch


def _block_error(exc, blk):
    """The error to report for a block: ours name it already; others get its name."""
    if getattr(exc, "block", None) is not None:
        return exc
    err = BackendError(f"block {blk.index} (#{blk.linear}): {mpi.describe(exc)}")
    err.__cause__ = exc
    return err


def segment_phase(ctx, backend, scratch) -> Segmented:
    """Every rank: its share of the plan's blocks (or those handed out at run time), then one agreement."""
    box, stop = ctx.box, ctx.stop
    t0 = time.perf_counter()
    box.start_progress("segment")
    label = "masks" if getattr(backend, "from_flows", False) else "segment"  # --pipeline flows: the mask step
    progress, agreed = Progress.of_plan(box, ctx.plan, label=label).start(), False
    try:
        err = _segment_blocks(ctx, backend, scratch, progress)
        if stop and err is None:
            box.notify_abort("stop requested by signal")
        box.agree(err, interrupted=bool(stop), where="segmentation", progress=progress)
        agreed = True
    finally:
        progress.close(finished=agreed)
    return Segmented(progress.total, time.perf_counter() - t0)


def _segment_blocks(ctx, backend, scratch, progress):
    """This rank's blocks; returns the error to agree on (or None)."""
    plan, box, stop, src, steps = ctx.plan, ctx.box, ctx.stop, ctx.src, ctx.options.preprocessing_steps

    def one(blk, done, get, tick):
        labels = segment_image(src, blk, plan.settings, steps, backend, stop, img=get() if get is not None else None)
        read_local, n, core = number_core(labels, blk)
        maybe_fault("segment", box.rank, done)
        record_block(ctx.work, scratch, blk, plan.settings, read_local, n, core)

    load = None
    if read_ahead_wanted(ctx.options, backend) and not getattr(backend, "from_flows", False):
        def load(blk):
            return block_image(src, blk, plan.settings, steps)
    err, _ = run_blocks(ctx, plan.grid, plan.segment_assignment, "segment", progress, one, _block_error, load)
    return err
