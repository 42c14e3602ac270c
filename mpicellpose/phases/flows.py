"""Phase 2a (``--pipeline flows``), every rank: the network's flow field, once per voxel.

Each block's *core* gets its flows (:func:`mpicellpose.flowfield.compute_flows`: the network
on the planes through the core, each grown by the in-plane halo) in half precision in the
work directory's ``flows.zarr`` (one chunk per block, so no two ranks write the same chunk),
then a done-marker ``flows/<linear // 1000>/<linear>.done`` once the chunk is on disk.  The
segmentation phase that follows builds each block's masks from the flow field of its read
region (:class:`FlowMasks`), which its neighbours wrote.

Only the blocks whose flows some block still to segment needs are computed: on a resume,
the flows already done are kept, and a block finished earlier needs none.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import flowfield as ff
from .. import geometry as geo
from .. import storage
from ..blocks import _about, block_image, call_backend
from ..errors import BackendError
from ..faults import maybe_fault
from ..runlog import log
from ..schedule import make_shares
from .segment import Progress, read_ahead_wanted, run_blocks

NEVER_A_CELL = -1.0e4   # cell probability given to voxels of blocks the mask leaves out


@dataclass(frozen=True)
class Flowed:
    blocks_now: int          # blocks whose flows were computed in this run (all ranks)
    network_voxels: int      # voxels the network evaluated (per orientation; all ranks)
    seconds: float
    masked: tuple = ()       # blocks whose masks were built and recorded during the flow step


def store_path(work_dir) -> Path:
    return Path(work_dir) / "flows.zarr"


def done_path(work_dir, linear: int) -> Path:
    return Path(work_dir) / "flows" / str(int(linear) // 1000) / f"{int(linear)}.done"


def create_store(plan) -> None:
    """Rank 0: the flow field's array (``ndim + 1`` channels, half precision, one chunk per block)."""
    path = store_path(plan.work_dir)
    if not path.exists():
        ndim = len(plan.shape)
        storage.create_array(path, (ndim + 1, *plan.shape), (ndim + 1, *plan.blocksize), ff.FLOW_DTYPE)


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


def flows_todo(plan, box, todo_segment) -> list:
    """Blocks whose flows must be computed now: needed by ``todo_segment`` and not done yet
    (each rank checks its share of the done-markers)."""
    need = needed_flows(plan.grid, plan.kept, todo_segment)
    mine = [b for b in need[box.rank::box.size] if not done_path(plan.work_dir, b).exists()]
    missing = box.allgather(mine, "checking which flows are done")
    return sorted(b for part in missing for b in part)


def _fsync_chunk(store: Path, chunk_index) -> None:
    """Make a block's chunk durable before its done-marker (zarr v2 keys: 0.i.j.k)."""
    path = store / ".".join(str(int(i)) for i in chunk_index)
    if path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def flow_read(settings, src, steps, blk):
    """(the block with the flow step's read region, its image): the core grown by the in-plane halo."""
    fblk = replace(blk, read=ff.flow_region(blk.core, settings.shape, settings.flow_halo))
    return fblk, block_image(src, fblk, settings, steps)


def flow_block(settings, src, steps, backend, blk, stop=None, read=None):
    """(flows of the block's core as float32, network voxels); ``read``: :func:`flow_read`'s
    result when it was read already."""
    fblk, img = read if read is not None else flow_read(settings, src, steps, blk)
    flows, nv = call_backend(backend, blk, lambda: ff.compute_flows(backend, img, fblk.core_in_read,
                                                                    len(settings.shape)), stop)
    if not np.all(np.isfinite(flows)):
        raise _about(BackendError(f"the network gave non-finite flows on block {blk.index}"), blk)
    return flows, nv


def flows_phase(cfg, plan, box, stop, src, backend, todo_segment, ahead=None) -> Flowed:
    """Every rank: compute the flows this run still needs, then agree.  ``ahead``: builds the
    thread that masks blocks during this step (:mod:`mpicellpose.phases.maskahead`), or None."""
    t0 = time.perf_counter()
    box.on_root(lambda: create_store(plan), "creating the flow field")
    ahead = ahead() if ahead is not None else None
    todo = flows_todo(plan, box, todo_segment)
    if box.rank == 0:
        log.info("flows: %d block(s) to compute on %d rank(s) (network once per voxel, in-plane halo %d)",
                 len(todo), box.size, plan.settings.flow_halo)
    shares = make_shares(plan.handout, plan.grid, todo, box.size)
    box.start_progress("flows")
    view = SimpleNamespace(grid=plan.grid, segment_assignment=shares, handout=plan.handout)
    progress, agreed = Progress(box, view, label="flows").start(), False
    try:
        err, nv = _flow_blocks(cfg, plan, box, stop, src, backend, shares, ahead, progress)
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
    total_nv = sum(n for n, _ in parts)
    masked = sorted(b for _, part in parts for b in part)
    if box.rank == 0 and masked:
        log.info("flows: the masks of %d block(s) were built during the flow step", len(masked))
    return Flowed(len(todo), int(total_nv), time.perf_counter() - t0, tuple(masked))


def _flow_blocks(cfg, plan, box, stop, src, backend, shares, ahead, progress):
    """This rank's flow blocks; (the error to agree on or None, network voxels)."""
    store = storage.open_array(store_path(plan.work_dir), mode="r+")

    def one(blk, done, get):
        flows, n = flow_block(plan.settings, src, cfg.preprocessing_steps, backend, blk, stop,
                              get() if get is not None else None)
        maybe_fault("flows", box.rank, done)
        _write_flows(plan, store, blk, flows)
        if ahead is not None:
            ahead.offer(blk.linear)
        return n

    def block_error(exc, blk):
        if getattr(exc, "block", None) is not None:
            return exc
        return _about(BackendError(f"flows of block {blk.index} (#{blk.linear}): {type(exc).__name__}: {exc}"), blk)

    load = None
    if read_ahead_wanted(cfg, backend):
        def load(blk):
            return flow_read(plan.settings, src, cfg.preprocessing_steps, blk)
    return run_blocks(box, plan.grid, shares, plan.handout == "dynamic", "flows", progress, stop, one, block_error,
                      load)


def _write_flows(plan, store, blk, flows) -> None:
    """The core's flows, durable, then the block's done-marker."""
    store[(slice(None),) + blk.core_slices] = ff.to_half(flows)
    _fsync_chunk(store_path(plan.work_dir), (0,) + tuple(blk.index))
    marker = done_path(plan.work_dir, blk.linear)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


class FlowMasks:
    """The segmentation phase's backend under ``--pipeline flows``: a block's labels are
    Cellpose's masks of the flow field over its read region (no image is read)."""

    from_flows = True

    def __init__(self, backend, plan):
        self.backend, self.settings = backend, plan.settings
        self.name = f"{getattr(backend, 'name', 'cellpose')} (masks from flows)"
        self.store = storage.open_array(store_path(plan.work_dir), mode="r")
        self.kept = set(int(b) for b in plan.kept)

    def read_flows(self, blk) -> np.ndarray:
        """The flow field over the block's read region (float32); the cores of blocks the mask
        leaves out read as 'no cell'."""
        flows = np.asarray(self.store[(slice(None),) + blk.read_slices], dtype=np.float32)
        for c in cores_touching(self.settings.grid, blk.read):
            if c not in self.kept:
                self._no_cell(flows, blk, c)
        return flows

    def _no_cell(self, flows, blk, c):
        ndim = len(self.settings.shape)
        sl = geo.box_slices(geo.box_intersect(self.settings.grid.block(c).core, blk.read), [a for a, _ in blk.read])
        flows[(ndim,) + sl] = NEVER_A_CELL
        flows[(slice(0, ndim),) + sl] = 0.0

    def segment_block(self, blk) -> np.ndarray:
        flows = self.read_flows(blk)
        return ff.compute_masks(self.backend, flows, len(self.settings.shape), int(np.prod(self.settings.shape)))

    def describe(self):
        return {"pipeline": "flows", "backend": self.backend.describe()}


class LocalFlowMasks(FlowMasks):
    """:func:`mpicellpose.process_block` under ``--pipeline flows``: the flow field of the read
    region is computed here, block by block as the run computes it (each core it touches with
    that core's halo, stored in half precision), so the labels equal the run's."""

    def __init__(self, backend, settings, kept, src, steps):
        self.backend, self.settings, self.src, self.steps = backend, settings, src, steps
        self.name = f"{getattr(backend, 'name', 'cellpose')} (masks from flows)"
        self.kept = set(int(b) for b in kept)

    def read_flows(self, blk) -> np.ndarray:
        ndim, grid = len(self.settings.shape), self.settings.grid
        flows = np.zeros((ndim + 1,) + geo.box_shape(blk.read), np.float32)
        origin = [a for a, _ in blk.read]
        for c in cores_touching(grid, blk.read):
            if c not in self.kept:
                self._no_cell(flows, blk, c)
                continue
            other = grid.block(c)
            f, _ = flow_block(self.settings, self.src, self.steps, self.backend, other)
            inter = geo.box_intersect(other.core, blk.read)
            flows[(slice(None),) + geo.box_slices(inter, origin)] = \
                ff.to_half(f)[(slice(None),) + geo.box_slices(inter, [a for a, _ in other.core])]
        return flows

