"""Phase 2a (``--pipeline flows``), every rank: the network's flow field, once per voxel.

The unit of work is a *slab* (:mod:`mpicellpose.grid.slabs`): per orientation of Cellpose's 3D
network, the planes through one layer of block cores, up to ``--flow-slab`` blocks wide in
plane, each plane grown by the in-plane halo.  A slab's three values per voxel
(:func:`mpicellpose.cellpose.flowfield.compute_flows`) go in half precision to the work directory's
``flows.zarr``, in its orientation's channels (one chunk per orientation and block, so no two
ranks write the same chunk), then a done-marker ``flows/<linear // 1000>/<linear>.done`` once
the chunks are on disk.  The segmentation phase that follows builds each block's masks from
the flow field of its read region (:class:`FlowMasks`: the orientations summed).

Only the slabs whose flows some block still to segment needs are computed: on a resume, the
slabs already done are kept, and a block finished earlier needs none.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...cellpose import flowfield as ff
from ...errors import BackendError
from ...grid import geometry as geo
from ...grid.schedule import make_shares
from ...grid.slabs import FLOW_DTYPE, SlabGrid, orientations
from ...volumes import storage
from ..blocks import _about, block_image, call_backend
from ..faults import maybe_fault
from ..progress import Progress
from ..runlog import log
from .blockloop import read_ahead_wanted, run_blocks

NEVER_A_CELL = -1.0e4   # cell probability given to voxels of blocks the mask leaves out


@dataclass(frozen=True)
class Flowed:
    slabs_now: int           # slabs whose flows were computed in this run (all ranks)
    network_voxels: int      # voxels the network evaluated (per orientation; all ranks)
    seconds: float
    masked: tuple = ()       # blocks whose masks were built and recorded during the flow step


def create_store(plan, work) -> None:
    """Rank 0: the flow field's array (three half-precision channels per orientation, one chunk
    per orientation and block)."""
    if not work.flows_store.exists():
        ndim = len(plan.shape)
        channels = 3 * orientations(ndim)
        storage.create_array(work.flows_store, (channels, *plan.shape), (3, *plan.blocksize), FLOW_DTYPE,
                             dimension_separator=storage.NESTED)


def slab_grid(settings, kept, along: int = 0) -> SlabGrid:
    """The run's slabs; ``along``: voxels read beyond a slab along its planes' normal (context
    for Cellpose's resizing, see :func:`mpicellpose.cellpose.flowfield.along_context`; nothing else
    depends on it)."""
    return SlabGrid(settings.grid, kept, settings.flow_slab, settings.flow_halo, along)


def cores_touching(grid: geo.BlockGrid, box) -> list:
    """Linear indices of the blocks whose core intersects ``box`` (pure)."""
    ranges = [range(a // size, (b - 1) // size + 1) for (a, b), size in zip(box, grid.blocksize)]
    return [grid.linear_of(ix) for ix in itertools.product(*ranges)]


def needed_flows(grid, kept, todo) -> list:
    """The kept blocks whose flows the blocks in ``todo`` read (grid order)."""
    keep = set(int(b) for b in kept)
    need = set()
    for b in todo:
        need.update(c for c in cores_touching(grid, grid.block(b).read) if c in keep)
    return sorted(need)


def needed_slabs(slabs: SlabGrid, kept, todo) -> list:
    """The slabs that compute the flows the blocks in ``todo`` read (sorted)."""
    return slabs.of_blocks(needed_flows(slabs.grid, kept, todo))


def flows_todo(ctx, slabs, todo_segment) -> list:
    """Slabs whose flows must be computed now: needed by ``todo_segment`` and not done yet
    (each rank checks its share of the done-markers)."""
    box = ctx.box
    need = needed_slabs(slabs, ctx.plan.kept, todo_segment)
    mine = [s for s in need[box.rank::box.size] if not ctx.work.flow_done(s).exists()]
    missing = box.allgather(mine, "checking which flows are done")
    return sorted(s for part in missing for s in part)


def _separator(store: str) -> str:
    return storage.read_json(Path(store) / ".zarray").get("dimension_separator") or "."


def _fsync_chunk(store: Path, chunk_index) -> None:
    """Make a chunk durable before its done-marker (zarr v2 keys: ``p/i/j/k``, or ``p.i.j.k`` in a
    work directory of an earlier version, which is resumed as it was written)."""
    path = store / _separator(str(store)).join(str(int(i)) for i in chunk_index)
    if path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def flow_read(settings, src, steps, slab):
    """(the slab, its read region's image)."""
    return slab, block_image(src, slab.as_block(), settings, steps)


def slab_flows(settings, src, steps, backend, slab, stop=None, read=None):
    """(the slab's three values over its core as float32, network voxels); ``read``:
    :func:`flow_read`'s result when it was read already."""
    _, img = read if read is not None else flow_read(settings, src, steps, slab)
    blk = slab.as_block()
    flows, nv = call_backend(backend, blk, lambda: ff.compute_flows(backend, img, slab.core_in_read,
                                                                    len(settings.shape), slab.orient), stop)
    if not np.all(np.isfinite(flows)):
        raise _about(BackendError(f"the network gave non-finite flows on {slab.label}"), blk)
    return flows, nv


def flows_phase(ctx, backend, todo_segment, ahead=None) -> Flowed:
    """Every rank: compute the flows this run still needs, then agree.  ``ahead``: builds the
    thread that masks blocks during this step (:mod:`mpicellpose.runner.phases.maskahead`), or None."""
    plan, box, stop = ctx.plan, ctx.box, ctx.stop
    t0 = time.perf_counter()
    box.on_root(lambda: create_store(plan, ctx.work), "creating the flow field")
    ahead = ahead() if ahead is not None else None
    slabs = slab_grid(plan.settings, plan.kept)  # what is handed out; the slabs as read: _flow_slabs
    todo = flows_todo(ctx, slabs, todo_segment)
    if box.rank == 0:
        kept = len(needed_slabs(slabs, plan.kept, todo_segment)) - len(todo)  # done by an earlier run
        log.info("flows: %d slab(s) to compute on %d rank(s)%s (network once per voxel; slabs up to %d block(s) "
                 "wide, in-plane halo %d)", len(todo), box.size,
                 f", {kept} reused from an earlier run" if kept else "", plan.settings.flow_slab,
                 plan.settings.flow_halo)
    shares = make_shares(plan.handout, slabs, slabs.coarse_order(todo), box.size)
    box.start_progress("flows")
    progress, agreed = Progress(box, slabs, shares, plan.handout, label="flows", unit="slab").start(), False
    try:
        err, nv = _flow_slabs(ctx, slabs, backend, shares, ahead, progress)
        masked = ahead.drain(box, stop) if ahead is not None else []
        if err is None and ahead is not None and ahead.error is not None:
            err = ahead.error
            box.notify_abort(f"masks during the flow step: {err}")
        if stop and err is None:
            box.notify_abort("stop requested by signal")
        box.agree(err, interrupted=bool(stop), where="flows", progress=progress)
        agreed = True
    finally:
        if ahead is not None and not agreed:
            ahead.close()
        progress.close(finished=agreed)
    parts = box.allgather((nv, masked), "network voxels and blocks masked during the flow step")
    total_nv = sum(n for n, _ in parts) // orientations(len(plan.shape))
    masked = sorted(b for _, part in parts for b in part)
    if box.rank == 0 and masked:
        log.info("flows: the masks of %d block(s) were built during the flow step", len(masked))
    return Flowed(len(todo), int(total_nv), time.perf_counter() - t0, tuple(masked))


def _flow_slabs(ctx, slabs, backend, shares, ahead, progress):
    """This rank's slabs; (the error to agree on or None, network voxels).  What the slabs read
    beyond their planes (:func:`mpicellpose.cellpose.flowfield.along_context`) asks the model, and the
    store is opened, inside the loop: an error there is one slab's, agreed like any other."""
    plan, box, stop, src, steps = ctx.plan, ctx.box, ctx.stop, ctx.src, ctx.options.preprocessing_steps
    lazy = {}

    def as_read(slab):
        if "slabs" not in lazy:  # the same value whichever thread gets here first
            lazy["slabs"] = slab_grid(plan.settings, plan.kept, ff.along_context(backend, plan.settings))
        return lazy["slabs"].block(slab.linear)

    def one(slab, done, get):
        read = get() if get is not None else flow_read(plan.settings, src, steps, as_read(slab))
        flows, n = slab_flows(plan.settings, src, steps, backend, read[0], stop, read)
        maybe_fault("flows", box.rank, done)
        if "store" not in lazy:
            lazy["store"] = storage.open_array(ctx.work.flows_store, mode="r+")
        write_flows(plan.grid, ctx.work, lazy["store"], slab, flows)
        if ahead is not None:
            ahead.offer_slab(slab)
        return n

    def slab_error(exc, slab):
        if getattr(exc, "block", None) is not None:
            return exc
        return _about(BackendError(f"flows of {slab.label}: {type(exc).__name__}: {exc}"), slab.as_block())

    load = None
    if read_ahead_wanted(ctx.options, backend):
        def load(slab):
            return flow_read(plan.settings, src, steps, as_read(slab))
    return run_blocks(ctx, slabs, shares, "flows", progress, one, slab_error, load)


def write_flows(grid, work, store, slab, flows) -> None:
    """The slab's values over its kept blocks' cores, durable, then the slab's done-marker."""
    p = slab.orient
    origin = [a for a, _ in slab.core]
    half = ff.to_half(flows)
    blocks = [grid.block(b) for b in slab.blocks]
    for blk in blocks:
        store[(slice(3 * p, 3 * p + 3),) + blk.core_slices] = half[(slice(None),) + geo.box_slices(blk.core, origin)]
    for blk in blocks:
        _fsync_chunk(work.flows_store, (p,) + tuple(blk.index))
    marker = work.flow_done(slab.linear)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


class FlowMasks:
    """The segmentation phase's backend under ``--pipeline flows``: a block's labels are
    Cellpose's masks of the flow field over its read region (no image is read)."""

    from_flows = True

    def __init__(self, backend, ctx):
        self.backend, self.settings = backend, ctx.settings
        self.name = f"{getattr(backend, 'name', 'cellpose')} (masks from flows)"
        self.store = storage.open_array(ctx.work.flows_store, mode="r")
        self.kept = set(int(b) for b in ctx.plan.kept)

    def read_flows(self, blk) -> np.ndarray:
        """The flow field over the block's read region (float32, the orientations summed); the
        cores of blocks the mask leaves out read as 'no cell'."""
        flows = ff.combine(self.store[(slice(None),) + blk.read_slices])
        return self._mask_out(flows, blk)

    def _mask_out(self, flows, blk):
        ndim = len(self.settings.shape)
        for c in cores_touching(self.settings.grid, blk.read):
            if c not in self.kept:
                sl = geo.box_slices(geo.box_intersect(self.settings.grid.block(c).core, blk.read),
                                    [a for a, _ in blk.read])
                flows[(ndim,) + sl] = NEVER_A_CELL
                flows[(slice(0, ndim),) + sl] = 0.0
        return flows

    def segment_block(self, blk) -> np.ndarray:
        flows = self.read_flows(blk)
        return ff.compute_masks(self.backend, flows, len(self.settings.shape), int(np.prod(self.settings.shape)))

    def describe(self):
        return {"pipeline": "flows", "backend": self.backend.describe()}


class LocalFlowMasks(FlowMasks):
    """:func:`mpicellpose.process_block` under ``--pipeline flows``: the flow field of the read
    region is computed here, slab by slab as the run computes it (each slab it touches whole,
    stored in half precision), so the labels equal the run's."""

    def __init__(self, backend, settings, kept, src, steps):
        self.backend, self.settings, self.src, self.steps = backend, settings, src, steps
        self.name = f"{getattr(backend, 'name', 'cellpose')} (masks from flows)"
        self.kept = set(int(b) for b in kept)

    def read_flows(self, blk) -> np.ndarray:
        ndim = len(self.settings.shape)
        slabs = slab_grid(self.settings, sorted(self.kept), ff.along_context(self.backend, self.settings))
        stored = np.zeros((3 * orientations(ndim),) + geo.box_shape(blk.read), FLOW_DTYPE)
        origin = [a for a, _ in blk.read]
        for s in needed_slabs(slabs, self.kept, [blk.linear]):
            slab = slabs.block(s)
            f, _ = slab_flows(self.settings, self.src, self.steps, self.backend, slab)
            inter = geo.box_intersect(slab.core, blk.read)
            stored[(slice(3 * slab.orient, 3 * slab.orient + 3),) + geo.box_slices(inter, origin)] = \
                ff.to_half(f)[(slice(None),) + geo.box_slices(inter, [a for a, _ in slab.core])]
        return self._mask_out(ff.combine(stored), blk)
