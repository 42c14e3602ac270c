"""Pure: the flow step's units of work under ``--pipeline flows`` (*slabs*).

Cellpose's 3D network runs on the planes of three orientations: orientation ``p`` runs on the
planes normal to axis ``p`` (0: YX planes, 1: ZX, 2: ZY; a 2D image has one orientation, the
image itself).  A plane needs context only within itself, so the unit of the flow step is a
*slab*: per orientation, the planes through one layer of blocks along the normal axis (no
context along it), spanning up to ``flow_slab x flow_slab`` blocks in plane, grown in plane by the flow
halo where it meets other slabs.  Wider slabs mean less halo per voxel: the network's cost per
output voxel is ``((G*B + 2h) / (G*B))^2`` for an interior slab instead of ``((B + 2h) / B)^2``
per block, and a slab that spans the whole plane needs no halo at all (exactly what
whole-volume Cellpose computes for those planes).

A slab is a fixed function of the block grid, the mask and ``flow_slab`` (never of the rank count),
so the flow field, and with it the labels, is the same at any number of ranks.  Each slab
writes its orientation's three values (two in-plane flow components and the cell probability)
for the cores of its kept blocks: one chunk per (orientation, block), written by one slab, so no
two ranks write the same chunk.  The mask step sums the orientations as Cellpose's ``run_3D`` does.

Examples
--------
>>> from mpicellpose.grid.geometry import BlockGrid
>>> s = SlabGrid(BlockGrid((160, 160, 160), (80, 80, 80), (32, 32, 32)), range(8), flow_slab=2, halo=16)
>>> len(s), [s.block(i).read for i in (0, 1)]
(6, [((0, 80), (0, 160), (0, 160)), ((80, 160), (0, 160), (0, 160))])
>>> round(s.network_voxels(range(len(s))) / 160 ** 3, 3)
1.0
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import geometry as geo

# The automatic flow slab keeps a slab's core within max(SLAB_VOXELS, 2 x the largest block's read
# region): the flow step holds ~60 bytes per voxel of a slab (the image as float32 in two channels,
# the network's output and its copies), Cellpose's per-block eval ~130 per voxel of a read region,
# so a slab never needs much more memory than a block does under --pipeline blocks.
SLAB_VOXELS = 1 << 24
SLAB_BYTES_PER_VOXEL = 60
#: The flow field is stored in half precision (the flow step clips it to its range first).
FLOW_DTYPE = np.float16


def orientations(ndim: int) -> int:
    """Orientations of Cellpose's network: three planes per voxel in 3D, the image itself in 2D."""
    return 3 if ndim == 3 else 1


def flow_bytes_per_voxel(ndim: int) -> int:
    """Bytes of the stored flow field per voxel: three values per orientation, :data:`FLOW_DTYPE`."""
    return 3 * orientations(ndim) * np.dtype(FLOW_DTYPE).itemsize


def default_flow_halo(diameter: float | None, ndim: int) -> int:
    """In-plane halo (voxels) of the flow step: 16 network pixels, at least 16 voxels.

    Cellpose tiles a large plane with 10 % overlap (22 of 224 pixels) and blends the tiles,
    so where two tiles meet its own output rests on 11-22 pixels of context on one side; 16
    pixels of the network's input (cells resized to about 30 pixels) is the same order, i.e.
    ``16 * diameter / 30`` voxels.  Measured on the shipped model (48^3 blocks, docs/pipeline.md):
    mean IoU of matched objects vs whole-volume Cellpose 0.961 with a halo of 8, 0.989 with 16,
    0.994 with 32 (the per-block pipeline: 0.994); object F1 1.0 in all three.
    """
    d = float(diameter) if diameter else 30.0
    return int(max(16, math.ceil(16.0 * d / 30.0)))


def normal_axis(ndim: int, orient: int):
    """The axis the planes of ``orient`` are normal to (None in 2D: the image is the plane)."""
    return orient if ndim == 3 else None


def auto_flow_slab(grid: geo.BlockGrid, budget: int | None = None) -> int:
    """The widest in-plane flow slab whose slabs' cores stay within ``budget`` voxels in every
    orientation (default: see :data:`SLAB_VOXELS`; at least 1; no more than the grid needs to span
    the whole plane)."""
    ndim, cap = grid.ndim, max(grid.grid_shape)
    if budget is None:
        read = math.prod(min(b + 2 * o, s) for b, o, s in zip(grid.blocksize, grid.overlap, grid.shape))
        budget = max(SLAB_VOXELS, 2 * read)
    best = 1
    for g in range(2, cap + 1):
        for p in range(orientations(ndim)):
            a = normal_axis(ndim, p)
            size = math.prod(b if k == a else min(g * b, s) for k, (b, s) in enumerate(zip(grid.blocksize, grid.shape)))
            if size > budget:
                return best
        best = g
    return best


def largest_slab_voxels(grid: geo.BlockGrid, flow_slab: int, halo: int) -> int:
    """Voxels of the largest slab's planes, halo included (an interior slab; for memory estimates)."""
    ndim = grid.ndim
    return max(math.prod(min(b, s) if k == normal_axis(ndim, p) else min(flow_slab * b + 2 * halo, s)
                         for k, (b, s) in enumerate(zip(grid.blocksize, grid.shape)))
               for p in range(orientations(ndim)))


@dataclass(frozen=True)
class Slab:
    """One unit of the flow step (duck-types a block for the per-block loop)."""

    linear: int         # identity among every slab of every orientation
    orient: int
    blocks: tuple       # the kept blocks whose cores it computes (grid order)
    core: geo.Box       # the bounding box of their cores
    read: geo.Box       # the core grown in plane by the halo (and along the normal by ``along``), clipped
    planes: str = ""    # 'YX planes', 'ZX planes', 'ZY planes' or 'planes' (2D)

    @property
    def core_in_read(self) -> tuple:
        return geo.box_slices(self.core, [a for a, _ in self.read])

    @property
    def label(self) -> str:
        first, last = self.blocks[0], self.blocks[-1]
        through = f"block {first}" if first == last else f"blocks {first}..{last}"
        return f"flow slab #{self.linear} ({self.planes} through {through})"

    def as_block(self) -> geo.Block:
        """A block whose read region is the slab's (its index is the slab's label, for messages)."""
        return geo.Block(self.label, self.linear, self.core, self.read)


class SlabGrid:
    """The slabs of a block grid: ``block(linear)`` and ``sizes`` make it usable wherever the
    per-block loop and the schedules take a block grid."""

    def __init__(self, grid: geo.BlockGrid, kept, flow_slab: int, halo: int, along: int = 0):
        self.grid, self.flow_slab, self.halo, self.along = grid, max(1, int(flow_slab)), int(halo), int(along)
        self.ndim = grid.ndim
        self.n_orient = orientations(self.ndim)
        self._kept = np.zeros(len(grid), bool)
        self._kept[np.asarray(list(kept), np.int64)] = True
        self.shapes = [self._shape(p) for p in range(self.n_orient)]
        self.offsets = np.cumsum([0] + [math.prod(s) for s in self.shapes]).tolist()
        self.linears = self.of_blocks(np.flatnonzero(self._kept))  # the slabs with a kept block

    def _shape(self, p):
        a = normal_axis(self.ndim, p)
        return tuple(n if k == a else math.ceil(n / self.flow_slab) for k, n in enumerate(self.grid.grid_shape))

    def __len__(self) -> int:
        return len(self.linears)

    def _split(self, linear: int):
        p = int(np.searchsorted(self.offsets, linear, side="right")) - 1
        if not 0 <= p < self.n_orient:
            raise IndexError(f"slab {linear} outside the {self.offsets[-1]} slabs")
        return p, tuple(int(v) for v in np.unravel_index(linear - self.offsets[p], self.shapes[p]))

    def _block_ranges(self, p, pos):
        a = normal_axis(self.ndim, p)
        return [range(i, i + 1) if k == a else range(i * self.flow_slab, min((i + 1) * self.flow_slab, n))
                for k, (i, n) in enumerate(zip(pos, self.grid.grid_shape))]

    def _blocks_of(self, linear: int) -> tuple:
        p, pos = self._split(linear)
        out = (self.grid.linear_of(ix) for ix in itertools.product(*self._block_ranges(p, pos)))
        return tuple(sorted(b for b in out if self._kept[b]))

    def block(self, linear) -> Slab:
        linear = int(linear)
        p, _ = self._split(linear)
        blocks = self._blocks_of(linear)
        if not blocks:
            raise IndexError(f"slab {linear} has no kept block")
        cores = [self.grid.block(b).core for b in blocks]
        core = tuple((min(c[k][0] for c in cores), max(c[k][1] for c in cores)) for k in range(self.ndim))
        a = normal_axis(self.ndim, p)
        read = tuple((max(0, lo - g), min(n, hi + g))
                     for k, ((lo, hi), n) in enumerate(zip(core, self.grid.shape))
                     for g in [self.along if k == a else self.halo])
        planes = f"{('YX', 'ZX', 'ZY')[p]} planes" if self.ndim == 3 else "planes"
        return Slab(linear, p, blocks, core, read, planes)

    def _network_box(self, slab) -> int:
        """Voxels the network evaluates for one slab: the planes through its core, each its
        read box's extent in plane (``along`` never counts: it is read, not evaluated)."""
        a = normal_axis(self.ndim, slab.orient)
        return math.prod((hi - lo) for lo, hi in (slab.core[k] if k == a else slab.read[k] for k in range(self.ndim)))

    def sizes(self, linears, region: str = "core") -> np.ndarray:
        """Voxels of each slab's ``core``, or for ``read`` those the network evaluates (its cost)."""
        pick = (lambda sl: geo.box_size(sl.core)) if region == "core" else self._network_box
        return np.array([pick(self.block(s)) for s in linears], np.int64)

    def network_voxels(self, linears) -> int:
        """Voxels the network evaluates for ``linears``, summed over the orientations and
        divided by their number (per output voxel: 1 when every slab spans its planes)."""
        return int(sum(self._network_box(self.block(s)) for s in linears)) // self.n_orient

    def coarse_order(self, linears) -> list:
        """``linears`` in the order the flow step hands them out between equal costs: by the
        position of their first block in units of ``flow_slab`` blocks (then orientation), so the
        three orientations advance through the volume together and a block's masks can be built
        (``--masks-during-flows``) long before the last slab, not only after the last orientation."""
        def key(s):
            p, pos = self._split(s)
            first = self.grid.index_of(self._blocks_of(s)[0])
            return (tuple(i // self.flow_slab for i in first), p, pos)
        return sorted(linears, key=key)

    def of_blocks(self, blocks) -> list:
        """The slabs that compute the cores of ``blocks`` (kept blocks; sorted, vectorised)."""
        blocks = np.asarray(list(blocks), np.int64).reshape(-1)
        if not blocks.size:
            return []
        ix = np.unravel_index(blocks, self.grid.grid_shape)
        out = []
        for p in range(self.n_orient):
            a = normal_axis(self.ndim, p)
            pos = tuple(i if k == a else i // self.flow_slab for k, i in enumerate(ix))
            out.append(self.offsets[p] + np.ravel_multi_index(pos, self.shapes[p]))
        return np.unique(np.concatenate(out)).tolist()
