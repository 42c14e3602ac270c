"""Pure: contiguous splits of ordered items among ranks (no MPI, no I/O).

One rule, :func:`contiguous_owner`, behind every contiguous split: items per rank
(:func:`contiguous_bounds`), weighted blocks (:func:`assign_contiguous`), the owner of a block
when ranks own contiguous runs (:class:`RunOwners`), ID ranges
(:func:`mpicellpose.run.table.owner_of`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError


def contiguous_owner(position, total, n_parts: int):
    """Which of ``n_parts`` equal contiguous shares of ``[0, total)`` holds ``position``.

    ``floor(position * n_parts / total)``, clipped to the last part; exact integer
    arithmetic for integer positions (item ``i`` of ``total`` items), floating point
    otherwise (a position along a cumulative weight).  The one rule behind every
    contiguous split: :func:`contiguous_bounds` (items per rank),
    :func:`assign_contiguous` (weighted blocks), :func:`mpicellpose.runner.table.owner_of`.

    Examples
    --------
    >>> contiguous_owner(np.arange(5), 5, 2).tolist()
    [0, 0, 0, 1, 1]
    >>> contiguous_owner(np.array([0.5, 2.5, 4.5]), 5.0, 2).tolist()
    [0, 1, 1]
    """
    pos = np.asarray(position)
    if np.issubdtype(pos.dtype, np.integer):
        part = pos.astype(np.int64) * n_parts // max(int(total), 1)
    else:
        part = (pos / total * n_parts).astype(np.int64)
    return np.minimum(part, n_parts - 1)


def contiguous_bounds(n_items: int, n_parts: int, part: int) -> tuple:
    """``(lo, hi)``: the run ``range(lo, hi)`` of ``range(n_items)`` held by ``part`` of ``n_parts``.

    Runs are contiguous, in order, of near-equal length, and item ``i`` lies in the
    run of part :func:`contiguous_owner` ``(i, n_items, n_parts)``.

    Examples
    --------
    >>> [contiguous_bounds(5, 2, p) for p in range(2)]
    [(0, 3), (3, 5)]
    """
    lo = -(-part * n_items // n_parts)
    hi = -(-(part + 1) * n_items // n_parts)
    return lo, hi


def assign_contiguous(items: Sequence[int], weights: Sequence[float], n_ranks: int) -> list:
    """Split ``items`` (kept in order) into ``n_ranks`` contiguous runs of near-equal weight.

    Contiguous runs in grid order keep neighbouring blocks on the same rank, so most
    faces need no message at all.  Deterministic.

    Examples
    --------
    >>> assign_contiguous([0, 1, 2, 3, 4], [1, 1, 1, 1, 1], 2)
    [[0, 1], [2, 3, 4]]
    """
    items = list(items)
    n_ranks = int(n_ranks)
    if n_ranks < 1:
        raise ConfigError(f"number of ranks must be >= 1, got {n_ranks}")
    out = [[] for _ in range(n_ranks)]
    if not items:
        return out
    w = np.asarray(weights, dtype=np.float64)
    cum = np.cumsum(w)
    total = cum[-1]
    if total <= 0:
        cum = np.arange(1, len(items) + 1, dtype=np.float64)
        total = cum[-1]
    # item i goes to the rank whose share contains the midpoint of its weight
    mid = cum - w / 2 if total > 0 else cum
    ranks = contiguous_owner(mid, total, n_ranks)
    for item, r in zip(items, ranks):
        out[int(r)].append(item)
    return out


class RunOwners:
    """The rank owning a block when ranks own contiguous runs, in grid order, of the blocks
    (``assignment[r]`` ascending, runs in rank order): ``owner[b]`` without a table of all blocks."""

    def __init__(self, assignment: Sequence[Sequence[int]]):
        runs = [(int(run[0]), r) for r, run in enumerate(assignment) if len(run)]
        self.firsts = np.array([f for f, _ in runs], np.int64)
        self.ranks = np.array([r for _, r in runs], np.int64)

    def __getitem__(self, block) -> int:
        return int(self.ranks[np.searchsorted(self.firsts, int(block), side="right") - 1])


def owner_map(assignment: Sequence[Sequence[int]]) -> dict:
    """{block linear index: rank} from a per-rank assignment."""
    return {b: r for r, blocks in enumerate(assignment) for b in blocks}
