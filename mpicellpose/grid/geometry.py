"""Pure block geometry: the grid, read/core regions, neighbours, contacts, masks (contiguous
:mod:`splits among ranks <mpicellpose.grid.partition>` are apart).

No MPI, no I/O.  Boxes are tuples of ``(start, stop)`` pairs, one per spatial axis,
in global voxel coordinates.  A block's *core* is the part of the volume it owns and
writes; its *read* region is the core grown by ``overlap`` per side, clipped to the
volume.  Cores tile the volume exactly once.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError

Box = tuple  # tuple[tuple[int, int], ...]


def per_axis(value, ndim: int, name: str, *, minimum: int) -> tuple:
    """Expand an int or a sequence of ints to one int per spatial axis and validate it.

    Examples
    --------
    >>> per_axis(64, 3, "blocksize", minimum=1)
    (64, 64, 64)
    >>> per_axis("16,32,32", 3, "blocksize", minimum=1)
    (16, 32, 32)
    """
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{name} must be integers, got {value!r}") from None
        if len(value) == 1:
            value = value[0]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value),) * ndim
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise ConfigError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}") from None
        if len(out) != ndim:
            raise ConfigError(
                f"{name} has {len(out)} values {tuple(out)} but the volume has {ndim} spatial axes"
            )
        for v in out:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                if isinstance(v, (float, np.floating)) and float(v).is_integer():
                    continue
                raise ConfigError(f"{name} must contain integers, got {tuple(out)!r}")
        out = tuple(int(v) for v in out)
    for v in out:
        if v < minimum:
            raise ConfigError(f"{name} must be >= {minimum} on every axis, got {out}")
    return out


def box_shape(box: Box) -> tuple:
    return tuple(b - a for a, b in box)


def box_slices(box: Box, origin: Sequence[int] | None = None) -> tuple:
    """Slices selecting ``box``, relative to ``origin`` when given."""
    if origin is None:
        return tuple(slice(a, b) for a, b in box)
    return tuple(slice(a - o, b - o) for (a, b), o in zip(box, origin))


def box_intersect(a: Box, b: Box):
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(s < e for s, e in out) else None


def box_size(box: Box) -> int:
    return int(np.prod(box_shape(box), dtype=np.int64))


def chunk_boxes(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[Box]:
    """The boxes of a regular grid of ``chunks`` over ``shape``, in C order.

    The last box along an axis is cut at the edge.  Any number of axes (unlike
    :class:`BlockGrid`, which also checks the volume); an empty axis gives no box.

    Examples
    --------
    >>> list(chunk_boxes((3, 5), (2, 4)))
    [((0, 2), (0, 4)), ((0, 2), (4, 5)), ((2, 3), (0, 4)), ((2, 3), (4, 5))]
    """
    shape = tuple(int(s) for s in shape)
    chunks = tuple(int(c) for c in chunks)
    grid = [range(0, s, c) for s, c in zip(shape, chunks)]
    for idx in np.ndindex(*[len(g) for g in grid]):
        yield tuple((int(g[i]), int(min(g[i] + c, s))) for g, i, c, s in zip(grid, idx, chunks, shape))


@dataclass(frozen=True)
class Block:
    """One block of the grid.

    Attributes
    ----------
    index : tuple of int
        Position in the block grid.
    linear : int
        C-order linear index of ``index`` in the grid (the block's identity everywhere).
    core : Box
        Voxels owned and written by this block.
    read : Box
        Voxels read and segmented (core plus overlap, clipped).
    """

    index: tuple
    linear: int
    core: Box
    read: Box

    @property
    def core_slices(self) -> tuple:
        return box_slices(self.core)

    @property
    def read_slices(self) -> tuple:
        return box_slices(self.read)

    @property
    def core_in_read(self) -> tuple:
        """Slices selecting the core inside the read region's array."""
        return box_slices(self.core, [a for a, _ in self.read])


@dataclass(frozen=True)
class BlockGrid:
    """A regular grid of blocks over the spatial shape of a volume.

    Examples
    --------
    >>> g = BlockGrid((100, 70), (64, 32), (8, 8))
    >>> g.grid_shape, len(g)
    ((2, 3), 6)
    >>> g.block(5).core, g.block(5).read
    (((64, 100), (64, 70)), ((56, 100), (56, 70)))
    """

    shape: tuple
    blocksize: tuple
    overlap: tuple

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if not 1 <= len(shape) <= 5:
            raise ConfigError(f"volume must have 1 to 5 spatial axes, got shape {shape}")
        if any(s <= 0 for s in shape):
            raise ConfigError(f"volume shape {shape} has an empty axis")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "blocksize", per_axis(self.blocksize, len(shape), "blocksize", minimum=1))
        object.__setattr__(self, "overlap", per_axis(self.overlap, len(shape), "overlap", minimum=0))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def grid_shape(self) -> tuple:
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.blocksize))

    def __len__(self) -> int:
        return int(np.prod(self.grid_shape, dtype=np.int64))

    def __iter__(self) -> Iterator[Block]:
        for i in range(len(self)):
            yield self.block(i)

    def index_of(self, linear: int) -> tuple:
        return tuple(int(v) for v in np.unravel_index(int(linear), self.grid_shape))

    def linear_of(self, index: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(int(i) for i in index), self.grid_shape))

    def contains_index(self, index: Sequence[int]) -> bool:
        return all(0 <= i < g for i, g in zip(index, self.grid_shape))

    def core_box(self, index: Sequence[int]) -> Box:
        return tuple(
            (i * b, min((i + 1) * b, s)) for i, b, s in zip(index, self.blocksize, self.shape)
        )

    def block(self, key) -> Block:
        """The block with linear index ``key`` (int) or grid index ``key`` (tuple)."""
        if isinstance(key, (int, np.integer)):
            if not 0 <= key < len(self):
                raise IndexError(f"block {key} outside grid of {len(self)} blocks")
            index = self.index_of(key)
        else:
            index = tuple(int(i) for i in key)
            if len(index) != self.ndim or not self.contains_index(index):
                raise IndexError(f"block index {index} outside grid {self.grid_shape}")
        core = self.core_box(index)
        read = tuple(
            (max(a - o, 0), min(b + o, s)) for (a, b), o, s in zip(core, self.overlap, self.shape)
        )
        return Block(index, self.linear_of(index), core, read)

    def neighbour_offsets(self, connectivity: int) -> list:
        """Offsets in {-1,0,1}^ndim with 1 <= nonzeros <= connectivity, in C order."""
        conn = max(1, min(int(connectivity), self.ndim))
        out = []
        for o in itertools.product((-1, 0, 1), repeat=self.ndim):
            nz = sum(1 for v in o if v)
            if 1 <= nz <= conn:
                out.append(o)
        return out

    def neighbour(self, linear: int, offset: Sequence[int]):
        """Linear index of the block at ``offset`` from ``linear``, or None outside the grid."""
        idx = tuple(i + o for i, o in zip(self.index_of(linear), offset))
        return self.linear_of(idx) if self.contains_index(idx) else None

    def contact_box(self, linear: int, offset: Sequence[int]) -> Box:
        """The voxels of block ``linear``'s core that can touch the neighbour at ``offset``.

        Along an axis where the offset is +1 that is the core's last plane, -1 its first
        plane, 0 its whole range.  The neighbour's contact box for ``-offset`` has the same
        shape on the 0-axes, so the two can be compared position by position.
        """
        core = self.core_box(self.index_of(linear))
        return tuple(
            (b - 1, b) if o > 0 else (a, a + 1) if o < 0 else (a, b) for (a, b), o in zip(core, offset)
        )

    def band_box(self, linear: int, axis: int, side: int, depth: int) -> Box:
        """The band around the face of block ``linear`` on ``axis`` (``side`` +1 = high face).

        It spans ``depth`` voxels either side of the face (clipped by the two cores and by
        this block's read region) and the core's range on the other axes.  Both blocks of a
        face get the same band, so their views of it align voxel for voxel.
        """
        idx = self.index_of(linear)
        core = self.core_box(idx)
        nidx = list(idx)
        nidx[axis] += side
        ncore = self.core_box(nidx)
        lo_core, hi_core = (core, ncore) if side > 0 else (ncore, core)
        face = lo_core[axis][1]
        d = min(depth, self.overlap[axis], lo_core[axis][1] - lo_core[axis][0], hi_core[axis][1] - hi_core[axis][0])
        band = list(core)
        band[axis] = (face - d, face + d)
        return tuple(band)


def mask_region(block_core: Box, volume_shape: Sequence[int], mask_shape: Sequence[int]) -> tuple:
    """Slices of a (lower resolution) mask covering ``block_core`` of the volume."""
    out = []
    for (a, b), s, m in zip(block_core, volume_shape, mask_shape):
        r = m / s
        lo = int(math.floor(a * r))
        hi = max(int(math.ceil(b * r)), lo + 1)
        out.append(slice(min(lo, m - 1), min(hi, m)))
    return tuple(out)


def check_mask_shape(mask_shape, volume_shape) -> None:
    """Raise ConfigError unless the mask can map onto the volume."""
    mask_shape, volume_shape = tuple(mask_shape), tuple(volume_shape)
    if len(mask_shape) != len(volume_shape):
        raise ConfigError(
            f"mask has {len(mask_shape)} axes {mask_shape} but the volume has {len(volume_shape)} spatial axes {volume_shape}"
        )
    if any(m <= 0 for m in mask_shape) or any(m > s for m, s in zip(mask_shape, volume_shape)):
        raise ConfigError(
            f"mask shape {mask_shape} cannot map onto volume shape {volume_shape}: "
            "every mask axis must be between 1 and the volume's size (same or lower resolution)"
        )


def blocks_in_mask(grid: BlockGrid, mask) -> np.ndarray:
    """Boolean array (one per block, linear order): does the block's core hold foreground?"""
    if mask is None:
        return np.ones(len(grid), dtype=bool)
    return mask_fractions(grid, mask) > 0


def mask_fractions(grid: BlockGrid, mask) -> np.ndarray:
    """Float array (one per block, linear order): the fraction of the mask's voxels over the
    block's core that are foreground (the mask may be at a lower resolution)."""
    check_mask_shape(mask.shape, grid.shape)
    nbytes = int(np.prod(mask.shape, dtype=np.int64)) * np.dtype(getattr(mask, "dtype", np.uint8)).itemsize
    if nbytes <= 1 << 29:
        mask = np.asarray(mask[...])
    out = np.zeros(len(grid), dtype=np.float64)
    for blk in grid:
        region = np.asarray(mask[mask_region(blk.core, grid.shape, mask.shape)])
        out[blk.linear] = np.count_nonzero(region) / max(region.size, 1)
    return out


def block_sizes(grid: BlockGrid, blocks, region: str = "core") -> np.ndarray:
    """Voxels of the ``core`` (or ``read`` region) of each of ``blocks`` (int64, vectorised: the
    same as ``box_size(grid.block(b).core)`` per block, without building the blocks).

    Examples
    --------
    >>> g = BlockGrid((100, 70), (64, 32), (8, 8))
    >>> block_sizes(g, [0, 5]).tolist(), block_sizes(g, [0, 5], "read").tolist()
    ([2048, 216], [2880, 616])
    """
    if not isinstance(grid, BlockGrid):  # another grid of work units (mpicellpose.grid.boxes.BoxGrid)
        return grid.sizes(blocks, region)
    blocks = np.asarray(blocks, np.int64).reshape(-1)
    out = np.ones(blocks.size, np.int64)
    if not blocks.size:
        return out
    grow = region == "read"
    for i, b, s, o in zip(np.unravel_index(blocks, grid.grid_shape), grid.blocksize, grid.shape, grid.overlap):
        lo, hi = i * b, np.minimum((i + 1) * b, s)
        if grow:
            lo, hi = np.maximum(lo - o, 0), np.minimum(hi + o, s)
        out *= hi - lo
    return out


def face_pairs_of(grid: BlockGrid, blocks, kept, offsets) -> list:
    """``[(a, b, offset)]`` for the neighbouring kept blocks ``a < b`` (``b`` at ``offset`` from
    ``a``, ``offset`` among the positive ones of ``offsets``) of which ``a`` or ``b`` is in
    ``blocks``: the faces a rank owning ``blocks`` deals with, sorted by ``a`` then by offset, without
    looking at the rest of the grid (vectorised; ``kept`` sorted).

    Examples
    --------
    >>> g = BlockGrid((4, 6), (2, 2), (0, 0))
    >>> face_pairs_of(g, [4], range(6), g.neighbour_offsets(1))
    [(1, 4, (1, 0)), (3, 4, (0, 1)), (4, 5, (0, 1))]
    """
    blocks = np.unique(np.asarray(blocks, np.int64).reshape(-1))
    kept = np.asarray(kept, np.int64).reshape(-1)
    gshape = np.array(grid.grid_shape, np.int64)
    idx = np.stack(np.unravel_index(blocks, grid.grid_shape), axis=1).reshape(-1, grid.ndim)
    positive = [o for o in offsets if next(v for v in o if v) > 0]
    a_all, b_all, k_all = [], [], []
    for k, o in enumerate(positive):
        for sign in (1, -1):   # this block as the lower (a) or the upper (b) end of the pair
            n = idx + sign * np.asarray(o, np.int64)
            ok = np.all((n >= 0) & (n < gshape), axis=1)
            other = np.ravel_multi_index(tuple(n[ok].T), grid.grid_shape) if ok.any() else np.zeros(0, np.int64)
            mine = blocks[ok]
            pos = np.searchsorted(kept, other)
            found = (pos < kept.size) & (kept[np.minimum(pos, kept.size - 1)] == other) if kept.size else other < 0
            mine, other = mine[found], other[found]
            if sign < 0:   # both ends among ``blocks``: already found from the lower end
                keep = ~np.isin(other, blocks)
                mine, other = mine[keep], other[keep]
            a_all.append(mine if sign > 0 else other)
            b_all.append(other if sign > 0 else mine)
            k_all.append(np.full(mine.size, k, np.int64))
    if not a_all:
        return []
    a, b, k = np.concatenate(a_all), np.concatenate(b_all), np.concatenate(k_all)
    order = np.lexsort((k, a))
    return [(int(a[i]), int(b[i]), positive[int(k[i])]) for i in order]
