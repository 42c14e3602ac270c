"""One block segmented as a run segments it: the library call behind :func:`mpicellpose.process_block`.

:func:`segment_one_block` resolves the settings a run resolves (overlap, diameter, anisotropy,
the shipped model's diameter, voxel sizes), samples the same global normalisation, builds the
same backend, and the block then goes through the run's own functions
(:mod:`mpicellpose.runner.blocks`), so under ``--pipeline blocks`` a crop that is a block's read
region gives that block's labels in the run.  Under ``--pipeline flows`` the run builds a block's
masks from its flow box (:mod:`mpicellpose.grid.boxes`, many blocks); here, by default, the block is
its own box (:class:`LocalFlowMasks`: the network on the planes through its read region, the in-plane
halo around them, Cellpose's masks of the read region), so one block costs about one block, and its
labels agree with the run's but for objects near its edges, where the run had more context.  With
``exact=True`` a grid block is computed as the run computes it: its flow box and the neighbouring
boxes its mask region reaches (their flows whole), so its labels are the run's, at the cost of those
boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import comm as mpi
from ..errors import ConfigError
from ..grid import stitch as st
from ..cellpose import flowfield as ff
from ..grid import geometry as geo
from ..grid.boxes import BoxGrid
from ..grid.geometry import Block
from .blocks import build_backend, number_core, segment_image
from .phases import normalize as normalization
from .phases.boxmasks import NEVER_A_CELL
from .phases.flows import box_flows, mask_out
from .phases.plan import kept_blocks, open_volume, resolve_settings
from .runlog import quiet_libraries


@dataclass(frozen=True)
class OneBlock:
    """A block's labels as the run numbers them before the global renumbering."""

    block: Block          # the grid's block, or a free-standing one for any other crop (linear -1)
    labels: np.ndarray    # the core's labels, 1..n
    boxes: list           # per label, its bounding box in global coordinates (tuples of slices)
    ids: np.ndarray       # 1..n (uint32)


def segment_one_block(cfg, block_index, crop, segmenter=None, exact: bool = False) -> OneBlock:
    """Segment the block ``block_index`` (``crop`` None or its read region) or any other region
    ``crop`` of configuration ``cfg``'s input, on this process alone (no MPI needed).
    ``segmenter``: a backend built earlier (its model loaded once for many calls); without one,
    the run's normalisation is sampled and its backend built here."""
    vol = open_volume(cfg)
    settings = resolve_settings(cfg, vol)  # the defaults a run resolves (overlap, diameter, anisotropy)
    grid = settings.grid
    blk = block_for_crop(grid, block_index, crop)
    box = mpi.Mailbox(mpi.SelfComm())
    if segmenter is None:
        # the same global bounds as the run: sampled from the blocks in the mask, whatever the rank count
        norm = normalization.global_normalization(cfg, settings, kept_blocks(cfg, grid), vol.array, box)
        segmenter = build_backend(cfg, settings, norm, box, load=True)
    if settings.pipeline == "flows" and not getattr(segmenter, "from_flows", False):
        kept = kept_blocks(cfg, grid) if exact and blk.linear >= 0 else None
        segmenter = LocalFlowMasks(segmenter, settings, vol.array, cfg.preprocessing_steps, kept)
    with quiet_libraries():  # the warnings a run hides say nothing to a user here either
        labels = segment_image(vol.array, blk, settings, cfg.preprocessing_steps, segmenter)
    _, n, core = number_core(labels, blk)
    stats = st.block_stats(core, n, [a for a, _ in blk.core])
    boxes = [tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)) for lo, hi in zip(stats["bbox_min"], stats["bbox_max"])]
    return OneBlock(blk, core, boxes, np.arange(1, n + 1, dtype=np.uint32))


def block_for_crop(grid, block_index, crop):
    """The grid's block whose read region ``crop`` is (``block_index``'s when ``crop`` is None), or a
    free-standing block for any other region: read = the crop, core = the crop less the overlap on
    every side not at the volume's start, at most one block long (``linear`` -1)."""
    if crop is None:
        return grid.block(tuple(block_index))
    crop = tuple(crop)
    if len(crop) != len(grid.shape) or not all(isinstance(c, slice) and c.step in (None, 1) for c in crop):
        raise ConfigError(f"crop must be {len(grid.shape)} slices (one per spatial axis, step 1), got {crop!r}")
    want = tuple(geo_range(c, n) for c, n in zip(crop, grid.shape))
    for a, b in want:
        if not b > a:
            raise ConfigError(f"crop {crop!r} is empty or outside the volume of shape {grid.shape}")
    guess = tuple(0 if a == 0 else min((a + o) // s, g - 1)
                  for (a, _), o, s, g in zip(want, grid.overlap, grid.blocksize, grid.grid_shape))
    for index in dict.fromkeys([tuple(block_index) if block_index is not None else guess, guess]):
        if len(index) == len(want) and all(0 <= i < g for i, g in zip(index, grid.grid_shape)):
            blk = grid.block(index)
            if blk.read == want:
                return blk
    core = []
    for (a, b), o, s in zip(want, grid.overlap, grid.blocksize):
        lo = a + o if a > 0 else a
        lo = min(lo, b - 1)
        core.append((lo, min(b, lo + s)))
    index = tuple(block_index) if block_index is not None else guess
    return Block(index=index, linear=-1, core=tuple(core), read=want)


def geo_range(c: slice, n: int) -> tuple:
    """(start, stop) of slice ``c`` on an axis of length ``n`` (None and negative bounds resolved)."""
    start, stop, _ = c.indices(n)
    return start, stop


class LocalFlowMasks:
    """:func:`mpicellpose.process_block` under ``--pipeline flows``: the block's read region is one
    flow box (flows of the three orientations with the run's in-plane halo, summed in half
    precision as the run sums them), then Cellpose's masks of that region."""

    from_flows = True

    def __init__(self, backend, settings, src, steps, kept=None):
        self.backend, self.settings, self.src, self.steps, self.kept = backend, settings, src, steps, kept
        self.name = f"{getattr(backend, 'name', 'cellpose')} (masks from flows)"

    def segment_block(self, blk) -> np.ndarray:
        if self.kept is not None:
            return self._as_the_run(blk)
        s, h = self.settings, self.settings.flow_halo
        read = tuple((max(0, a - h), min(n, b + h)) for (a, b), n in zip(blk.read, s.shape))
        field, _ = box_flows(s, self.src, self.steps, self.backend, Block(blk.index, -1, blk.read, read))
        return ff.compute_masks(self.backend, field.astype(np.float32), len(s.shape), int(np.prod(s.shape)))

    def _as_the_run(self, blk) -> np.ndarray:
        """The run's labels of ``blk``'s read region: its box's masks from the flows of the box and of
        the neighbours its mask region reaches, assembled as the run assembles them."""
        s = self.settings
        boxes = BoxGrid(s.grid, self.kept, s.flow_box, s.flow_halo)
        y = boxes.box_of_block(blk.linear)
        region = boxes.mask_region(y)
        origin = [a for a, _ in region]
        flows = np.zeros((len(s.shape) + 1,) + geo.box_shape(region), np.float32)
        flows[len(s.shape)] = NEVER_A_CELL
        for x in [y] + [n for n in boxes.neighbours(y) if boxes.has_kept[n]]:
            field, _ = box_flows(s, self.src, self.steps, self.backend, boxes.block(x))
            mask_out(boxes, x, field)
            xo = [a for a, _ in boxes.core(x)]
            parts = [boxes.core(x)] if x == y else list(boxes.needed_pieces(x).values())
            for part in parts:
                inter = geo.box_intersect(part, region)
                if inter is not None:
                    flows[(slice(None),) + geo.box_slices(inter, origin)] = \
                        field[(slice(None),) + geo.box_slices(inter, xo)]
        labels = ff.compute_masks(self.backend, flows, len(s.shape), int(np.prod(s.shape)))
        return labels[geo.box_slices(blk.read, origin)]

    def describe(self):
        return {"pipeline": "flows", "backend": self.backend.describe()}
