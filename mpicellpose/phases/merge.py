"""Phase 4: number the labels and merge those matched across faces.

Provisional IDs come from an exclusive prefix sum of the per-block label counts in grid
order (``offset[block] + local label``), so they do not depend on the number of ranks or the
schedule.  The edges found by :mod:`.faces` are joined by a union-find; every merged object
keeps its smallest provisional ID, and the final IDs are the provisional ones with the
merged-away IDs removed (compact 1..N).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import stitch as st
from ..faults import maybe_fault
from ..workdir import WorkDir


@dataclass(frozen=True)
class Merge:
    counts: np.ndarray        # labels per block, grid order
    offsets: np.ndarray       # provisional ID of a block's label 0
    merged_away: np.ndarray   # provisional IDs merged into a smaller one (sorted)
    roots: np.ndarray         # the ID each of them was merged into
    n_edges: int

    @property
    def n_provisional(self) -> int:
        return int(self.counts.sum())

    @property
    def n_objects(self) -> int:
        return self.n_provisional - int(self.merged_away.size)

    @property
    def dtype(self):
        return st.label_dtype(self.n_objects)

    def lut(self, block: int) -> np.ndarray:
        """Block-local label -> final ID (index 0 -> 0), for one block."""
        return st.block_lut(int(self.offsets[block]), int(self.counts[block]), self.merged_away, self.roots,
                            self.dtype)


def block_counts(plan, box, mine) -> tuple:
    """(counts, offsets) per block of the grid: every rank reads its blocks' records."""
    grid, work = plan.grid, WorkDir(plan.work_dir)
    mine_counts = {}
    with box.step("loading block records"):
        maybe_fault("stitch", box.rank, 0)
        for b in mine:
            mine_counts[b] = int(work.load_stats(b, name=grid.index_of(b))["n"])
    counts = np.zeros(len(grid), np.int64)
    for part in box.allgather(mine_counts, "label counts per block"):
        for b, n in part.items():
            counts[b] = n
    return counts, st.offsets_from_counts(counts)


def merge(box, edges, counts, offsets) -> Merge:
    """Rank 0 joins every rank's edges (union-find) and sends the merged IDs to all."""
    all_edges = box.gather(edges.pairs, "gathering the merge edges")

    def union():
        e = np.concatenate(all_edges) if all_edges else np.zeros((0, 2), np.int64)
        away, roots = st.merge_edges(e)
        return away, roots, int(len(e))

    away, roots, n_edges = box.on_root(union, "merging")
    return Merge(counts, offsets, away, roots, n_edges)
