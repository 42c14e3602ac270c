"""Phase 4: number the labels and merge those matched across faces, on every rank.

Provisional IDs come from an exclusive prefix sum of the per-block label counts in grid
order (``offset[block] + local label``), so they do not depend on the number of ranks or the
schedule.  Every connected component of the edge graph keeps its smallest provisional ID, and
the final IDs are the provisional ones with the merged-away IDs removed (compact 1..N).

Nothing here is done by one rank for all (issue 13).  The provisional IDs are split into
contiguous ranges, one per rank (a rank's own blocks' IDs when blocks are owned in grid
order, :func:`mpicellpose.grid.stitch.id_bounds`); a rank holds the parent of each ID of its range
that has an edge.  Then:

1. each rank joins its own edges (union-find) and keeps a star per component (ID -> its
   smallest), so only components crossing ranks are left to the distributed part;
2. rounds of *hook and jump*: every edge between two roots ``a < b`` sets ``parent[b] =
   min(a, ...)`` at b's owner; pointer jumping (``parent = parent[parent]``, asked of the
   owners) until every ID points at a root; the edges are renamed to their roots, loops
   dropped.  A round leaves no edge's larger end a root, so the rounds end (in practice a
   few: the components are stars after each jump);
3. per block and per range, the number of merged-away IDs (one allgather, blocks + ranks
   numbers in all); the owner of a root answers its final ID (``root`` minus merged-away IDs
   below it); each merged-away ID goes, with its root's final ID, to the owner of its block.

Every exchange is an ``alltoall`` of numpy rows in rounds of at most
``MPICELLPOSE_MESSAGE_BYTES`` (64 MiB) per rank (:meth:`Mailbox.alltoall_arrays`); a loop
ends when the reduction that plans an exchange finds that no rank has anything to send, so
every rank enters the same collectives.
A rank holds its edges, the IDs of its range that have edges, and its blocks' merged-away IDs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...grid import stitch as st
from ..faults import maybe_fault


@dataclass(frozen=True)
class Merge:
    counts: np.ndarray        # labels per block, grid order
    offsets: np.ndarray       # provisional ID of a block's label 0
    n_edges: int              # edges found on all ranks
    n_merged: int             # provisional IDs merged into a smaller one, all ranks
    away_before: np.ndarray   # merged-away IDs in the blocks before each block, grid order
    owned: np.ndarray         # the blocks this rank can give a lookup table for (sorted)
    away: np.ndarray          # merged-away IDs of those blocks (sorted)
    away_final: np.ndarray    # the final ID each of them became
    largest_message: int = 0  # bytes, this rank's largest single alltoall payload in the merge

    @property
    def n_provisional(self) -> int:
        return int(self.counts.sum())

    @property
    def n_objects(self) -> int:
        return self.n_provisional - self.n_merged

    @property
    def dtype(self):
        return st.label_dtype(self.n_objects)

    def lut(self, block: int) -> np.ndarray:
        """Block-local label -> final ID (index 0 -> 0), for one of this rank's blocks."""
        block = int(block)
        i = np.searchsorted(self.owned, block)
        if i >= self.owned.size or self.owned[i] != block:
            raise ValueError(f"block {block} is not one of this rank's blocks: its lookup table is not here")
        off, n = int(self.offsets[block]), int(self.counts[block])
        lo, hi = np.searchsorted(self.away, [off + 1, off + n + 1])
        return st.lut_from_merged(off, n, int(self.away_before[block]), self.away[lo:hi],
                                  self.away_final[lo:hi], self.dtype)


def block_counts(ctx, mine) -> tuple:
    """(counts, offsets) per block of the grid: every rank reads its blocks' records."""
    grid, work, box = ctx.plan.grid, ctx.work, ctx.box
    mine = np.asarray(list(mine), np.int64)
    mine_counts = np.zeros(mine.size, np.int64)
    with box.step("loading block records"):
        maybe_fault("stitch", box.rank, 0)
        for i, b in enumerate(mine.tolist()):
            mine_counts[i] = int(work.load_stats(b, name=grid.index_of(b))["n"])
    counts = np.zeros(len(grid), np.int64)
    parts = box.allgather((mine, mine_counts), "label counts per block")
    counts[np.concatenate([p[0] for p in parts])] = np.concatenate([p[1] for p in parts])
    return counts, st.offsets_from_counts(counts)


class _Ids:
    """This rank's range of provisional IDs and the parents of those of them that have edges."""

    def __init__(self, box, bounds):
        self.box, self.bounds = box, bounds
        self.nodes = np.zeros(0, np.int64)   # sorted
        self.parent = np.zeros(0, np.int64)

    def exchange(self, dest, cols, label):
        """Rows to ranks (``dest`` per row); the rows received, concatenated in source order."""
        got = self.box.alltoall_arrays(st.split_rows(dest, self.box.size, *cols), label)
        return [np.concatenate([g[i] for g in got]) for i in range(len(cols))]

    def ask(self, ids, answer, label):
        """``answer(ids)`` computed by the owner of each ID (ids: int64, any order); None when
        no rank asked anything."""
        u, inv = np.unique(ids, return_inverse=True)
        parts = st.split_rows(st.id_owner(u, self.bounds), self.box.size, u)
        asked = self.box.alltoall_arrays(parts, f"{label}: asking")
        rounds = self.box.last_rounds
        if not rounds:
            return None
        # an int64 per int64 asked: the reply is the request transposed, so the same rounds
        # the reply follows the request in lockstep: no arrival of its own
        replies = self.box.alltoall_arrays([(answer(q[0]).astype(np.int64),) for q in asked], f"{label}: answering",
                                           rounds=rounds, arrive=False)
        return np.concatenate([r[0] for r in replies])[inv.ravel()]

    def index(self, ids):
        return np.searchsorted(self.nodes, ids)

    def parent_of(self, ids):
        return self.parent[self.index(ids)]


def merge(box, edges, counts, offsets, mine) -> Merge:
    """Join every rank's edges into components (see the module's docstring), collectively.

    ``mine``: this rank's blocks (those it relabels and reports: ``Merge.lut`` answers for
    them)."""
    size = box.size
    counts = np.asarray(counts, np.int64)
    owner = np.full(counts.size, -1, np.int64)
    parts = box.allgather((np.asarray(list(mine), np.int64), int(len(edges.pairs))),
                          "merge: who owns which block, and the edges")
    owner[np.concatenate([p[0] for p in parts])] = np.repeat(np.arange(size, dtype=np.int64),
                                                             [p[0].size for p in parts])
    n_edges = sum(p[1] for p in parts)
    ids = _Ids(box, st.id_bounds(counts, offsets, owner, size))
    with box.step("merge: joining this rank's edges"):
        away, roots = st.merge_edges(edges.pairs)   # a star per local component
    e_lo, e_hi = roots, away
    nodes = np.unique(np.concatenate([e_lo, e_hi]))
    (got,) = ids.exchange(st.id_owner(nodes, ids.bounds), (nodes,), "merge: registering IDs")
    ids.nodes = np.unique(got)
    ids.parent = ids.nodes.copy()
    rnd = 0
    while True:
        maybe_fault("merge", box.rank, rnd)   # tests: a rank dying between rounds
        # hook: the larger root of every edge points at the smallest root it touches
        b, a = ids.exchange(st.id_owner(e_hi, ids.bounds), (e_hi, e_lo), f"merge: hooking, round {rnd}")
        if not box.last_rounds:
            break   # no edge left on any rank
        np.minimum.at(ids.parent, ids.index(b), a)
        _jump(box, ids, rnd)
        # rename the edges to their roots, drop loops and repeats
        r = ids.ask(np.concatenate([e_lo, e_hi]), ids.parent_of, f"merge: renaming edges, round {rnd}")
        if r is None:
            r = np.zeros(0, np.int64)
        ra, rb = r[:e_lo.size], r[e_lo.size:]
        keep = ra != rb
        pairs = np.unique(np.stack([np.minimum(ra, rb)[keep], np.maximum(ra, rb)[keep]], axis=1), axis=0)
        e_lo, e_hi = pairs[:, 0], pairs[:, 1]
        rnd += 1
    return _finish(box, ids, counts, offsets, owner, mine, n_edges)


def _jump(box, ids, rnd):
    """Pointer jumping until every ID of every range points at a root."""
    active = np.flatnonzero(ids.parent != ids.nodes)
    k = 0
    while True:
        p = ids.parent[active]
        pp = ids.ask(p, ids.parent_of, f"merge: jumping, round {rnd}.{k}")
        if pp is None:
            return   # no rank has an ID whose parent may still move
        ids.parent[active] = pp
        active = active[pp != p]   # pp == p: p is a root, and roots do not move while jumping
        k += 1


def _finish(box, ids, counts, offsets, owner, mine, n_edges) -> Merge:
    """Per-block counts of merged-away IDs, and each merged-away ID's final ID at its block's owner."""
    merged = ids.parent != ids.nodes
    away, root = ids.nodes[merged], ids.parent[merged]            # sorted by ID
    blk, per_block = np.unique(st.block_of(away, offsets), return_counts=True)
    parts = box.allgather((blk, per_block), "merge: merged-away IDs per block")
    away_counts = np.bincount(np.concatenate([p[0] for p in parts]), weights=np.concatenate([p[1] for p in parts]),
                              minlength=counts.size).astype(np.int64)
    below = int(sum(int(p[1].sum()) for p in parts[:box.rank]))   # merged-away IDs below this rank's range

    def final_of_root(q):   # q: roots in this rank's range (never merged away)
        return q - below - np.searchsorted(away, q)

    root_final = ids.ask(root, final_of_root, "merge: final IDs of roots")
    root_final = np.zeros(0, np.int64) if root_final is None else root_final
    got_away, got_final = ids.exchange(owner[st.block_of(away, offsets)], (away, root_final),
                                       "merge: merged-away IDs to their blocks' owners")
    order = np.argsort(got_away, kind="stable")
    return Merge(counts, offsets, n_edges, int(away_counts.sum()), st.offsets_from_counts(away_counts),
                 np.unique(np.asarray(list(mine), np.int64)), got_away[order], got_final[order],
                 int(getattr(box, "largest_message", 0)))
