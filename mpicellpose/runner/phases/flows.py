"""Phase 2 under ``--pipeline flows``, every rank: the network once per voxel, masks per flow box.

The unit of work is a *flow box* (:mod:`mpicellpose.grid.boxes`): ``--flow-box`` blocks per
side.  For each box it is handed, a rank reads the image of its core grown by the in-plane halo,
runs Cellpose's network on the planes through the core in each orientation
(:func:`mpicellpose.cellpose.flowfield.compute_flows`), sums the orientations in memory as
Cellpose does, writes the shell its neighbours need (:class:`.boxmasks.ShellStore`) and keeps the field for the
mask step (:mod:`.boxmasks`), which runs once every neighbour's shell is written.  Boxes are
handed out in a sweep (by layer of boxes along the first axis, costliest first within a layer),
so the masks follow the flows closely and the shells are deleted behind the sweep.

On a resume, a box whose blocks are all recorded is not computed again; a box with blocks still
to segment is (its field was only in memory); a box whose shell a box still to mask reads is
computed again only when that shell is not on disk.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ...cellpose import flowfield as ff
from ...errors import BackendError
from ...grid import geometry as geo
from ...grid import schedule as sched
from ...grid.boxes import BoxGrid, orientations
from ..blocks import _about, block_image, call_backend
from ..faults import maybe_fault
from ..progress import Progress
from ..runlog import log
from .blockloop import read_ahead_wanted, run_blocks
from .boxmasks import NEVER_A_CELL, BoxMasks
from .boxmasks import ShellStore, ShellWriter


@dataclass(frozen=True)
class Flowed:
    boxes_now: int           # boxes whose flows were computed in this run (all ranks)
    network_voxels: int      # voxels the network evaluated (per orientation; all ranks)
    seconds: float
    masked: tuple = ()       # blocks recorded by the mask step (all ranks)
    io: dict = None          # shell bytes written and read, mask-step seconds (all ranks)


def box_grid(settings, kept) -> BoxGrid:
    """The run's flow boxes."""
    return BoxGrid(settings.grid, kept, settings.flow_box, settings.flow_halo)


def boxes_to_mask(boxes: BoxGrid, todo_segment) -> list:
    """The boxes with a block still to segment (sorted; vectorised)."""
    todo = np.asarray(list(todo_segment), np.int64)
    return np.unique(boxes.box_of_block(todo)).tolist() if todo.size else []


def flows_todo(ctx, boxes: BoxGrid, to_mask) -> list:
    """Boxes whose flows this run computes: those to mask, and those whose shell a box to mask
    reads and that is not on disk (each rank looks at its share of the neighbourhoods)."""
    box, store = ctx.box, ShellStore(ctx.work.shells)
    need, mine = set(to_mask), set()
    for b in to_mask[box.rank::box.size]:
        mine.update(n for n in boxes.neighbours(b) if boxes.has_kept[n] and n not in need and not store.done(n))
    parts = box.allgather(sorted(mine), "checking which shells are on disk")
    return sorted(need.union(*map(set, parts)))


def sweep_shares(boxes: BoxGrid, todo, mode: str, n_ranks: int) -> tuple:
    """Per-rank shares of ``todo`` handed out as a sweep: layer by layer of boxes along the first
    axis, the costliest first within a layer (dynamic), or contiguous runs (static)."""
    if mode == "static":
        return sched.contiguous_shares(boxes.flow, todo, n_ranks)
    todo = np.asarray(todo, np.int64)
    if not todo.size:
        return tuple(() for _ in range(n_ranks))
    layer = np.unravel_index(todo, boxes.flow.grid_shape)[0]
    cost = boxes.network_sizes(todo)
    order = np.lexsort((todo, -cost, layer))
    return sched.round_robin_shares(todo[order].tolist(), n_ranks)


def box_flows(settings, src, steps, backend, blk, stop=None, img=None, tick=None):
    """(the summed flow field over ``blk``'s core in half precision, network voxels): the network
    on the planes through the core in each orientation, each plane the read region's extent
    (``tick(f)`` after each orientation: the share of the box done, for the progress display)."""
    if img is None:
        img = block_image(src, blk, settings, steps)
    ndim, halves, nv = len(settings.shape), [], 0
    for p in range(orientations(ndim)):
        flows, n = call_backend(backend, blk, lambda p=p: ff.compute_flows(backend, img, blk.core_in_read, ndim, p),
                                stop)
        if not np.all(np.isfinite(flows)):
            raise _about(BackendError(f"the network gave non-finite flows on {blk.index}"), blk)
        halves.append(ff.to_half(flows))
        nv += n
        if tick is not None:
            tick(0.9 * (p + 1) / orientations(ndim))
    return ff.to_half(ff.combine(np.concatenate(halves))), nv


def mask_out(boxes, linear, field) -> None:
    """The cores of the box's blocks that the mask leaves out read as 'no cell'."""
    ndim, origin = boxes.ndim, [a for a, _ in boxes.core(linear)]
    for b in boxes.blocks_of(linear, kept_only=False):
        if not boxes.kept(b):
            sl = geo.box_slices(boxes.grid.block(b).core, origin)
            field[(ndim,) + sl] = NEVER_A_CELL
            field[(slice(0, ndim),) + sl] = 0


def flows_phase(ctx, backend, scratch, threaded: bool) -> Flowed:
    """Every rank: the flows and masks this run still needs, then agree.  ``threaded``: the mask
    step in a CPU thread (a GPU rank), else between boxes in the main thread."""
    plan, box, stop = ctx.plan, ctx.box, ctx.stop
    t0 = time.perf_counter()
    boxes = box_grid(plan.settings, plan.kept)
    to_mask = boxes_to_mask(boxes, plan.to_segment)
    todo = flows_todo(ctx, boxes, to_mask)
    store = ShellStore(ctx.work.shells)
    if box.rank == 0:
        log.info("flows: %d flow box(es) of %s block(s) to compute on %d rank(s), %d to mask%s (network once "
                 "per voxel, in-plane halo %d)", len(todo), "x".join([str(boxes.k)] * boxes.ndim), box.size,
                 len(to_mask), f", {len(boxes) - len(todo)} done or on disk from an earlier run"
                 if len(todo) < len(boxes) else "", plan.settings.flow_halo)
    shares = sweep_shares(boxes, todo, plan.handout, box.size)
    masks = BoxMasks(ctx, backend, scratch, boxes, store, set(to_mask), threaded and backend is not None)
    box.start_progress("flows")
    progress, agreed = Progress(box, boxes, shares, plan.handout, label="flows", unit="box").start(), False
    try:
        writer = ShellWriter(store, masks.threaded)
        err, nv = _run(ctx, boxes, backend, shares, masks, writer, set(to_mask), progress)
        try:
            writer.finish()
        except Exception as exc:  # noqa: BLE001 - agreed below, on every rank
            err = err or exc
            box.notify_abort(f"writing a flow box's shell: {exc}")
        masked = masks.drain(box, stop) if err is None else masks.close()
        if err is None and masks.error is not None:
            err = masks.error
            box.notify_abort(f"masks of the flow boxes: {err}")
        if stop and err is None:
            box.notify_abort("stop requested by signal")
        box.agree(err, interrupted=bool(stop), where="flows", progress=progress)
        agreed = True
    finally:
        if not agreed:
            masks.close()
        progress.close(finished=agreed)
    blocks = [b for x in masked for b in boxes.blocks_of(x) if masks.todo[b]]
    parts = box.allgather((nv, blocks, store.bytes_written, store.bytes_read, masks.seconds),
                          "network voxels and blocks masked")
    masked_all = sorted(b for p in parts for b in p[1])
    io = {"shell_bytes_written": sum(p[2] for p in parts), "shell_bytes_read": sum(p[3] for p in parts),
          "mask_seconds": round(sum(p[4] for p in parts), 3)}
    total_nv = sum(p[0] for p in parts) // orientations(len(plan.shape))
    return Flowed(len(todo), int(total_nv), time.perf_counter() - t0, tuple(masked_all), io)


def _run(ctx, boxes, backend, shares, masks, writer, to_mask, progress):
    """This rank's boxes; (the error to agree on or None, network voxels)."""
    plan, box, stop, src, steps = ctx.plan, ctx.box, ctx.stop, ctx.src, ctx.options.preprocessing_steps

    def one(blk, done, get, tick):
        linear = blk.linear
        field, n = box_flows(plan.settings, src, steps, backend, blk, stop, get() if get else None, tick)
        mask_out(boxes, linear, field)
        maybe_fault("flows", box.rank, done)
        writer.write(linear, field, boxes.core(linear), boxes.needed_pieces(linear))
        if linear in to_mask:
            masks.add(linear, field)
        if not masks.threaded:
            masks.run_ready()
            if masks.error is not None:
                raise masks.error
        return n

    def box_error(exc, blk):
        if getattr(exc, "block", None) is not None:
            return exc
        return _about(BackendError(f"flows of {blk.index}: {type(exc).__name__}: {exc}"), blk)

    load = None
    if read_ahead_wanted(ctx.options, backend):
        def load(blk):
            return block_image(src, blk, plan.settings, steps)
    return run_blocks(ctx, boxes, shares, "flows", progress, one, box_error, load)
