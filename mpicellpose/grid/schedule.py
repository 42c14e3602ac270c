"""Pure: in which order the blocks are segmented and which rank starts with which (no MPI, no I/O).

Two schedules (``RunConfig.schedule``):

* ``static``: each rank gets a contiguous run of blocks in grid order, balanced by read
  volume (:func:`contiguous_shares`); what it is given is what it does.
* ``dynamic`` (the default): the blocks are sorted costliest first (:func:`costliest_first`,
  ties in grid order) and dealt round-robin (:func:`round_robin_shares`): rank ``r`` starts
  with the ``r``-th costliest block; every later block goes, at run time, to whichever rank
  asks first (:class:`mpicellpose.comm.queue.Handout`), in the order :func:`interleave`
  gives back.  A fast rank takes more; the shares are only what each rank would do if every
  block cost exactly its estimate (what ``mpicellpose plan`` reports).

The cost of a block is the voxels of its read region (what the backend is given) times the
fraction of its core that the mask keeps when a mask is given (:func:`block_costs`): the
network's cost grows with the voxels it sees, and without tissue a block is cheap (mask
steps and stitching are nearly free).  Labels never depend on the schedule: IDs come from
per-block counts in grid order.

Examples
--------
>>> order = costliest_first([0, 1, 2, 3, 4], [1.0, 5.0, 5.0, 2.0, 0.5])
>>> order
[1, 2, 3, 0, 4]
>>> shares = round_robin_shares(order, 2)
>>> shares
((1, 3, 4), (2, 0))
>>> interleave(shares) == order
True
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import geometry as geo
from .partition import assign_contiguous

SCHEDULES = ("dynamic", "static")


def block_costs(grid: geo.BlockGrid, blocks: Sequence[int], fractions=None) -> np.ndarray:
    """Estimated cost of each block (float64): read-region voxels, times the kept fraction of the
    mask over its core when ``fractions`` (one value per block of the grid) is given."""
    blocks = [int(b) for b in blocks]
    cost = geo.block_sizes(grid, blocks, "read").astype(np.float64)
    if fractions is not None and len(blocks):
        cost *= np.asarray(fractions, np.float64)[blocks]
    return cost


def costliest_first(blocks: Sequence[int], costs: Sequence[float]) -> list:
    """``blocks`` sorted by decreasing cost; equal costs keep their order (grid order)."""
    blocks = [int(b) for b in blocks]
    if not blocks:
        return []
    order = np.argsort(-np.asarray(costs, np.float64), kind="stable")
    return [blocks[i] for i in order]


def round_robin_shares(order: Sequence[int], n_ranks: int) -> tuple:
    """Deal ``order`` to ``n_ranks`` ranks like cards: rank r gets ``order[r::n_ranks]``."""
    order = list(order)
    return tuple(tuple(order[r::n_ranks]) for r in range(int(n_ranks)))


def interleave(shares: Sequence[Sequence[int]]) -> list:
    """The order of hand-out for per-rank ``shares``: first item of every share, then the second
    of every share, ... (the inverse of :func:`round_robin_shares`)."""
    shares = [list(s) for s in shares]
    depth = max((len(s) for s in shares), default=0)
    return [s[k] for k in range(depth) for s in shares if k < len(s)]


def contiguous_shares(grid: geo.BlockGrid, blocks: Sequence[int], n_ranks: int) -> tuple:
    """Contiguous runs in grid order balanced by read volume (the static schedule)."""
    weights = geo.block_sizes(grid, blocks, "read")
    return tuple(tuple(part) for part in assign_contiguous(list(blocks), weights, n_ranks))


def make_shares(mode: str, grid: geo.BlockGrid, todo: Sequence[int], n_ranks: int, fractions=None) -> tuple:
    """Per-rank shares of ``todo`` (grid order) for the schedule ``mode``."""
    if mode == "static":
        return contiguous_shares(grid, todo, n_ranks)
    return round_robin_shares(costliest_first(todo, block_costs(grid, todo, fractions)), n_ranks)
