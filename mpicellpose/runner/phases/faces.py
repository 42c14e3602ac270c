"""Phase 3, every rank: match the labels of neighbouring blocks across their shared faces.

Each rank owns a contiguous run of blocks (:meth:`Plan.owners`).  For each pair of
neighbouring kept blocks ``a < b``, the owner of ``b`` matches ``a``'s face view against
``b``'s: locally when it owns both, else ``a``'s owner streams its views to it point to point
in bounded messages (never all faces on one rank).  The result is this rank's edges between
provisional IDs ``offset[block] + local label``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ...errors import InputError
from ...grid import geometry as geo
from ...grid import stitch as st
from ...grid.partition import RunOwners
from ..blocks import view_key
from ..runlog import log
from ..workdir import WorkDir

EXCHANGE_BYTES = 64 << 20  # face views per message to one neighbour rank (MPICELLPOSE_EXCHANGE_BYTES)
VIEW_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class Edges:
    pairs: np.ndarray    # (E, 2) int64 provisional IDs found equal on this rank
    bytes_sent: int      # face-view bytes this rank sent to others


def face_pairs(grid: geo.BlockGrid, kept, rule: str, connectivity: int, blocks=None):
    """[(a, b, offset)] for neighbouring kept blocks with b = a + offset and a < b (pure), of which
    a or b is one of ``blocks`` (default: all kept blocks): a rank builds only its own faces."""
    offs = grid.neighbour_offsets(connectivity if rule == "touch" else 1)
    kept = np.asarray(kept, np.int64)
    return geo.face_pairs_of(grid, kept if blocks is None else blocks, kept, offs)


def exchange_budget() -> int:
    """Bytes of face views per message: bounds each rank's memory in the exchange."""
    v = os.environ.get("MPICELLPOSE_EXCHANGE_BYTES")
    try:
        return max(1, int(v)) if v else EXCHANGE_BYTES
    except ValueError:  # never raise here: this runs between collectives
        log.warning("MPICELLPOSE_EXCHANGE_BYTES=%r is not a number of bytes; using %d", v, EXCHANGE_BYTES)
        return EXCHANGE_BYTES


class RecordViews:
    """Face views read from the block records on demand; a record leaves memory after its last use.

    Holding every record of a rank would cost (blocks per rank) x (all its face views): that grows
    with the volume, not the block.  A record's views are read together (one file open) and kept
    until the number of lookups announced for that block (``uses``) is spent, or, past ``budget``
    bytes, dropped least recently used first (a later lookup then reads the file again).
    """

    def __init__(self, work: WorkDir, uses, budget=VIEW_CACHE_BYTES):
        self.work, self.uses, self.budget = work, dict(uses), budget
        self.cache = OrderedDict()
        self.nbytes = 0

    def _drop(self, b):
        self.nbytes -= sum(v.nbytes for v in self.cache.pop(b).values())

    def get(self, b, key):
        views = self.cache.pop(b, None)
        if views is None:
            views = self.work.load_views(b)
            self.nbytes += sum(v.nbytes for v in views.values())
        self.cache[b] = views
        left = self.uses.get(b, 1) - 1
        self.uses[b] = left
        if left <= 0:
            self._drop(b)
        while self.nbytes > self.budget and len(self.cache) > 1:
            self._drop(next(iter(self.cache)))
        if key not in views:
            raise InputError(f"the record of block {b} lacks the face view {key}; it was written by another "
                             f"version or is damaged: re-run with --restart")
        return views[key]

    def close(self):
        self.cache.clear()
        self.nbytes = 0


class FaceMatcher:
    """This rank's share of the face matching: what it sends, what it matches, its edges.

    The first error is kept (not raised) so that the rank still sees the exchange through;
    it is agreed on after the stream ends.
    """

    def __init__(self, plan, work, rank, owner, offsets, mine=None):
        self.plan, self.rank, self.owner, self.offsets = plan, rank, owner, offsets
        self.iou_threshold = plan.settings.iou_threshold
        self.grid = plan.grid
        # only the faces of this rank's blocks (``mine``; all kept blocks when not given)
        self.pairs = face_pairs(self.grid, plan.kept, plan.stitch_rule, plan.connectivity, blocks=mine)
        self.outgoing, self.sources, uses = {}, set(), {}
        for a, b, o in self.pairs:
            ra, rb = owner[a], owner[b]
            if ra == rank:  # local pair or a view to send: a's record is read once for it
                uses[a] = uses.get(a, 0) + 1
            if rb == rank:  # b's side of the face is matched here
                uses[b] = uses.get(b, 0) + 1
            if ra != rb and ra == rank:
                self.outgoing.setdefault(rb, []).append((a, o))
            elif ra != rb and rb == rank:
                self.sources.add(ra)
        self.views = RecordViews(work, uses)
        self.budget = exchange_budget()
        self.edges, self.error, self.sent = [], None, 0

    def fail(self, exc):
        if self.error is None:
            self.error = exc

    def match(self, a, b, o, va):
        vb = self.views.get(b, view_key(tuple(-v for v in o)))
        if self.plan.stitch_rule == "touch":
            e = st.touch_edges(va, vb, o, self.plan.connectivity)
        else:
            e = st.iou_edges(va, vb, self.iou_threshold)
        if len(e):
            self.edges.append(np.stack([e[:, 0] + self.offsets[a], e[:, 1] + self.offsets[b]], axis=1))

    def match_local(self):
        """The pairs whose two blocks this rank owns."""
        try:
            for a, b, o in self.pairs:
                if self.owner[a] == self.rank and self.owner[b] == self.rank:
                    self.match(a, b, o, self.views.get(a, view_key(o)))
        except Exception as exc:  # noqa: BLE001 - agreed after the exchange
            self.fail(exc)

    def messages(self, keys):
        """This rank's views for one neighbour rank, in messages of about ``budget`` bytes."""
        batch, nbytes = {}, 0
        for a, o in keys:
            if self.error is not None:
                break  # still end the stream: the neighbour waits for it
            try:
                v = self.views.get(a, view_key(o))
            except Exception as exc:  # noqa: BLE001
                self.fail(exc)
                break
            batch[(a, o)] = v
            nbytes += v.nbytes
            self.sent += v.nbytes
            if nbytes >= self.budget:
                yield batch
                batch, nbytes = {}, 0
        if batch:
            yield batch

    def receive(self, src, batch):
        if self.error is not None:
            return
        try:
            for (a, o), va in batch.items():
                self.match(a, self.grid.neighbour(a, o), o, va)
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)

    def result(self) -> Edges:
        self.views.close()
        pairs = np.concatenate(self.edges) if self.edges else np.zeros((0, 2), np.int64)
        return Edges(pairs, self.sent)


def match_faces(ctx, offsets) -> Edges:
    """Every rank: the edges between provisional IDs across the faces of its blocks."""
    plan, box = ctx.plan, ctx.box
    owners = plan.owners(box.size)
    matcher = FaceMatcher(plan, ctx.work, box.rank, RunOwners(owners), offsets, mine=owners[box.rank])
    matcher.match_local()  # pairs inside this rank first, then the faces shared with others, streamed
    box.exchange({d: matcher.messages(k) for d, k in matcher.outgoing.items()}, matcher.sources, matcher.receive,
                 "exchanging face views")
    edges = matcher.result()
    box.agree(matcher.error, where="face matching")
    return edges
