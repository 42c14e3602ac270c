"""Pure: the units of work of ``--pipeline flows`` (*flow boxes*) and what they exchange.

Cellpose's 3D network runs on the planes of three orientations (orientation ``p`` on the planes
normal to axis ``p``: 0 YX, 1 ZX, 2 ZY; a 2D image has one orientation, the image itself) and
sums them.  A plane needs context only within itself, so a region's flow field needs the image
around it only in plane, by the *flow halo* ``h``.  The mask step (following the flows to where
they converge) needs a 3D neighbourhood: the grid's overlap ``o``.

The unit is a *box*: ``k`` blocks per side (``--flow-box``).  One rank computes all three
orientations over the box's core (the network on the planes through it, each grown in plane by
``h``: ``((kB + 2h) / kB)^2`` evaluations per voxel, 1 where a box spans the volume), sums them
in memory as Cellpose's ``run_3D`` does, and writes to the work directory only the *shell*
its neighbours' mask steps read: the parts of its core within ``o`` of a face it shares with
another box.  Once every box its mask region (core + ``o``) touches has written its shell, the
rank builds the masks of the whole region at once and records each of its blocks from them.
So the flow field's trip through the file system is the shells (about ``8 B x`` the shell's
share of a box, written once, read about once), the network runs once per voxel (plus the halo),
and the mask step works on one large region per box instead of ``k^3`` overlapping ones.

A box is a fixed function of the block grid, the mask and ``k`` (never of the rank count), so
the flow field, and with it the labels, is the same at any number of ranks.

A shell is stored in pieces: along each axis a box's core splits into a low band (``o`` wide),
the middle and a high band; the ``3^ndim - 1`` pieces other than the centre are exactly what the
neighbours read (a face neighbour reads the 9 pieces of its face, a corner neighbour one).

Examples
--------
>>> from mpicellpose.grid.geometry import BlockGrid
>>> b = BoxGrid(BlockGrid((160, 160, 160), (40, 40, 40), (16, 16, 16)), range(64), k=2, halo=8)
>>> len(b), b.box_of_block(63), b.blocks_of(7)[:3], b.core(7)
(8, 7, [42, 43, 46], ((80, 160), (80, 160), (80, 160)))
>>> b.mask_region(0), sorted(b.neighbours(0))
(((0, 96), (0, 96), (0, 96)), [1, 2, 3, 4, 5, 6, 7])
>>> round(b.network_voxels(b.linears) / 160 ** 3, 3)    # ((80 + 8) / 80)^2, the outer halo clipped
1.21
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from . import geometry as geo

#: The automatic box keeps a box's mask region (core + overlap) within max(BOX_VOXELS, 2 x a
#: block's read region): the flow step holds about BOX_BYTES_PER_VOXEL per voxel of its read
#: region (the image in float32, the network's output, three orientations' flows in half
#: precision, their sum in single), the mask step about as much of its mask region.  2^27 voxels
#: (about 8 GB of host memory per rank) makes 128^3 blocks with a 60-voxel overlap boxes of 3
#: blocks per side, whose shells cost about 15 bytes per voxel instead of 24 with 2 (grid/cost.py).
BOX_VOXELS = 1 << 27
BOX_BYTES_PER_VOXEL = 60
#: The flow field is stored (shells) in half precision, summed over the orientations: the flow
#: components and the cell probability, ``ndim + 1`` values per voxel.
FLOW_DTYPE = np.float16


def orientations(ndim: int) -> int:
    """Orientations of Cellpose's network: three planes per voxel in 3D, the image itself in 2D."""
    return 3 if ndim == 3 else 1


def flow_channels(ndim: int) -> int:
    """Values of the summed flow field per voxel: the flow components, then the cell probability."""
    return ndim + 1


def flow_bytes_per_voxel(ndim: int) -> int:
    """Bytes per voxel of the flow field as the shells store it (``FLOW_DTYPE``)."""
    return flow_channels(ndim) * np.dtype(FLOW_DTYPE).itemsize


def default_flow_halo(diameter: float | None, ndim: int) -> int:
    """In-plane halo (voxels) of the flow step: 16 network pixels, at least 16 voxels.

    Cellpose tiles a large plane with 10 % overlap (22 of 224 pixels) and blends the tiles,
    so where two tiles meet its own output rests on 11-22 pixels of context on one side; 16
    pixels of the network's input (cells resized to about 30 pixels) is the same order, i.e.
    ``16 * diameter / 30`` voxels (docs/pipeline.md has the measurements).
    """
    d = float(diameter) if diameter else 30.0
    return int(max(16, math.ceil(16.0 * d / 30.0)))


def normal_axis(ndim: int, orient: int):
    """The axis the planes of ``orient`` are normal to (None in 2D: the image is the plane)."""
    return orient if ndim == 3 else None


def _region(grid: geo.BlockGrid, k: int, grow) -> int:
    return math.prod(min(k * b + 2 * g, s) for b, g, s in zip(grid.blocksize, grow, grid.shape))


def auto_flow_box(grid: geo.BlockGrid, halo: int = 0, budget: int | None = None) -> int:
    """The most blocks per side of a box whose mask region (and read region) stays within ``budget``
    voxels (default: max(:data:`BOX_VOXELS`, 2 x a block's read region)); at least 1, no more than
    the grid needs to cover the volume."""
    if budget is None:
        budget = max(BOX_VOXELS, 2 * _region(grid, 1, grid.overlap))
    best = 1
    for k in range(2, max(grid.grid_shape) + 1):
        grow = [max(o, halo) for o in grid.overlap]
        if _region(grid, k, grow) > budget:
            break
        best = k
    return best


def largest_box_voxels(grid: geo.BlockGrid, k: int, halo: int) -> int:
    """Voxels of the largest box's read or mask region (for memory estimates)."""
    return _region(grid, k, [max(o, halo) for o in grid.overlap])


def _pieces_1d(lo: int, hi: int, o: int):
    """The low band, middle and high band of ``[lo, hi)`` (``o`` wide bands, clipped; may be empty)."""
    a = min(lo + o, hi)
    b = max(hi - o, a)
    return ((lo, a), (a, b), (b, hi))


class BoxGrid:
    """The flow boxes of a block grid.  ``flow``: the boxes' geometry with the flow halo as
    overlap (``read``: what the flow step reads), ``masks``: with the grid's overlap (``read``:
    the mask region).  Boxes are numbered in C order of the box grid (z-major: a sweep)."""

    def __init__(self, grid: geo.BlockGrid, kept, k: int, halo: int):
        self.grid, self.k, self.halo = grid, max(1, int(k)), int(halo)
        self.ndim = grid.ndim
        size = tuple(self.k * b for b in grid.blocksize)
        self.flow = geo.BlockGrid(grid.shape, size, (self.halo,) * self.ndim)
        self.masks = geo.BlockGrid(grid.shape, size, grid.overlap)
        kept_mask = np.zeros(len(grid), bool)
        kept_mask[np.asarray(list(kept), np.int64)] = True
        self._kept = kept_mask
        owners = self.box_of_block(np.arange(len(grid), dtype=np.int64))
        self.has_kept = np.bincount(owners[kept_mask], minlength=len(self.flow)) > 0
        self.linears = np.flatnonzero(self.has_kept)  # the boxes with a kept block (a sweep: z-major)

    def __len__(self) -> int:
        return int(self.linears.size)

    # -- blocks and boxes ---------------------------------------------------
    def box_of_block(self, blocks):
        """The box of each block (vectorised; an int for an int)."""
        scalar = np.isscalar(blocks)
        ix = np.unravel_index(np.asarray(blocks, np.int64), self.grid.grid_shape)
        out = np.ravel_multi_index(tuple(i // self.k for i in ix), self.flow.grid_shape)
        return int(out) if scalar else out

    def blocks_of(self, box: int, kept_only: bool = True) -> list:
        """The (kept) blocks of ``box``, grid order."""
        pos = self.flow.index_of(box)
        ranges = [range(p * self.k, min((p + 1) * self.k, n)) for p, n in zip(pos, self.grid.grid_shape)]
        out = (self.grid.linear_of(ix) for ix in itertools.product(*ranges))
        return sorted(b for b in out if self._kept[b] or not kept_only)

    def kept(self, block: int) -> bool:
        return bool(self._kept[int(block)])

    def core(self, box: int) -> geo.Box:
        return self.flow.block(int(box)).core

    def read(self, box: int) -> geo.Box:
        """What the flow step reads of the image: the core grown by the halo (clipped)."""
        return self.flow.block(int(box)).read

    def mask_region(self, box: int) -> geo.Box:
        """What the mask step segments: the core grown by the grid's overlap (clipped)."""
        return self.masks.block(int(box)).read

    def block(self, box) -> geo.Block:
        """The box as a block (its read region the flow step's), for the per-unit loop and messages."""
        b = self.flow.block(int(box))
        return geo.Block(f"flow box #{int(box)} {b.index}", int(box), b.core, b.read)

    def sizes(self, boxes, region: str = "core") -> np.ndarray:
        """Voxels of each box's core or ``read`` region (what the progress display counts; vectorised)."""
        return geo.block_sizes(self.flow, np.asarray(boxes, np.int64).reshape(-1), region)

    def network_sizes(self, boxes) -> np.ndarray:
        """Voxels the network evaluates for each box, summed over the orientations (its cost; vectorised)."""
        boxes = np.asarray(boxes, np.int64).reshape(-1)
        core, read = [], []
        for i, b, s in zip(np.unravel_index(boxes, self.flow.grid_shape), self.flow.blocksize, self.grid.shape):
            lo, hi = i * b, np.minimum((i + 1) * b, s)
            core.append(hi - lo)
            read.append(np.minimum(hi + self.halo, s) - np.maximum(lo - self.halo, 0))
        out = np.zeros(boxes.size, np.int64)
        for p in range(orientations(self.ndim)):
            a = normal_axis(self.ndim, p)
            out += np.prod([core[k] if k == a else read[k] for k in range(self.ndim)], axis=0).astype(np.int64)
        return out

    # -- neighbours and shells ----------------------------------------------
    def touching(self, region: geo.Box) -> list:
        """The boxes whose core intersects ``region`` (C order)."""
        size = self.flow.blocksize
        ranges = [range(a // s, (b - 1) // s + 1) for (a, b), s in zip(region, size)]
        return [self.flow.linear_of(ix) for ix in itertools.product(*ranges)]

    def neighbours(self, box: int) -> list:
        """The other boxes whose core the mask region of ``box`` touches (they read each other's shells)."""
        return [b for b in self.touching(self.mask_region(box)) if b != int(box)]

    def pieces(self, box: int) -> dict:
        """The shell of ``box``: ``{direction: piece}`` for the non-empty pieces other than the centre
        (``direction``: per axis -1 low band, 0 middle, 1 high band)."""
        parts = [_pieces_1d(lo, hi, o) for (lo, hi), o in zip(self.core(box), self.grid.overlap)]
        out = {}
        for d in itertools.product((-1, 0, 1), repeat=self.ndim):
            if not any(d):
                continue
            piece = tuple(parts[a][v + 1] for a, v in enumerate(d))
            if all(hi > lo for lo, hi in piece):
                out[d] = piece
        return out

    # -- the network's cost -------------------------------------------------
    def network_voxels(self, boxes) -> int:
        """Voxels the network evaluates for ``boxes``, summed over the orientations and divided by
        their number (per output voxel: 1 when every box spans the volume)."""
        return int(self.network_sizes(boxes).sum()) // orientations(self.ndim)

    def needed_pieces(self, box: int) -> dict:
        """The pieces of the shell of ``box`` that the mask region of a neighbour with kept blocks
        touches: what the box writes."""
        regions = [self.mask_region(n) for n in self.neighbours(box) if self.has_kept[n]]
        return {d: p for d, p in self.pieces(box).items()
                if any(geo.box_intersect(p, r) is not None for r in regions)}

    def shell_voxels(self, boxes) -> int:
        """Voxels the shells of ``boxes`` store."""
        return int(sum(geo.box_size(p) for b in np.asarray(boxes).reshape(-1)
                       for p in self.needed_pieces(int(b)).values()))

    def read_voxels(self, box: int) -> int:
        """Voxels of neighbours' shells the mask step of ``box`` reads."""
        region = self.mask_region(box)
        total = 0
        for n in self.neighbours(box):
            if self.has_kept[n]:
                for p in self.needed_pieces(n).values():
                    inter = geo.box_intersect(p, region)
                    total += geo.box_size(inter) if inter is not None else 0
        return total
