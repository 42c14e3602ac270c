"""Pure stitching kernels: local renumbering, per-block statistics, face edges, union-find,
deterministic numbering, per-block lookup tables and the object-table reduction.

Every function takes and returns numpy arrays; nothing here does I/O or MPI.

Vocabulary
----------
local ID
    1..n inside one block's core, numbered by first appearance in C (raster) order.
provisional ID
    ``offset[block] + local``, where ``offset`` is the exclusive prefix sum of block
    label counts in grid order.  Independent of the number of ranks.
final ID
    provisional IDs of objects merged across faces collapse to the smallest one, and the
    survivors are compacted to 1..N keeping their order.
"""
from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components


# --------------------------------------------------------------------------- local labels
def renumber_core(read_labels: np.ndarray, core_in_read: tuple):
    """Renumber a block's labels to local IDs 1..n defined by its core.

    Parameters
    ----------
    read_labels : ndarray of int
        Labels of the whole read region, as the backend returned them.
    core_in_read : tuple of slice
        The core inside ``read_labels``.

    Returns
    -------
    read_local : ndarray of uint32
        ``read_labels`` mapped to local IDs; labels that do not occur in the core become 0.
    n : int
        Number of labels in the core.

    Examples
    --------
    >>> lab = np.array([[5, 5, 0, 7], [0, 9, 9, 7]])
    >>> loc, n = renumber_core(lab, (slice(0, 2), slice(0, 3)))
    >>> loc.tolist(), n
    [[1, 1, 0, 0], [0, 2, 2, 0]], 2
    """
    read_labels = np.asarray(read_labels)
    if read_labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {read_labels.dtype}")
    core = read_labels[core_in_read]
    flat = core.ravel()
    values, first = np.unique(flat, return_index=True)
    keep = values != 0
    values, first = values[keep], first[keep]
    if values.size and values.min() < 0:
        raise ValueError("labels must be non-negative")
    order = np.argsort(first, kind="stable")
    values = values[order]
    n = int(values.size)
    if n == 0:
        return np.zeros(read_labels.shape, dtype=np.uint32), 0
    top = int(read_labels.max())
    if top <= 4 * read_labels.size + 1024:
        lut = np.zeros(top + 1, dtype=np.uint32)
        lut[values] = np.arange(1, n + 1, dtype=np.uint32)
        return lut[read_labels], n
    # sparse label values: map through a sorted search instead of a dense table
    sorter = np.argsort(values)
    sv = values[sorter]
    pos = np.clip(np.searchsorted(sv, read_labels), 0, n - 1)
    hit = sv[pos] == read_labels
    out = np.where(hit, sorter[pos] + 1, 0).astype(np.uint32)
    return out, n


def block_stats(core_local: np.ndarray, n: int, origin) -> dict:
    """Per-label voxel count, bounding box and coordinate sums of one core (global coords).

    Returns a dict of arrays indexed by local ID - 1: ``count`` (n,), ``bbox_min`` (n, D),
    ``bbox_max`` (n, D) (exclusive), ``coord_sum`` (n, D) float64.
    """
    d = core_local.ndim
    out = {
        "count": np.zeros(n, np.int64),
        "bbox_min": np.zeros((n, d), np.int64),
        "bbox_max": np.zeros((n, d), np.int64),
        "coord_sum": np.zeros((n, d), np.float64),
    }
    if n == 0:
        return out
    flat = core_local.ravel()
    out["count"] = np.bincount(flat, minlength=n + 1)[1:].astype(np.int64)
    for i, sl in enumerate(ndimage.find_objects(core_local, max_label=n)):
        if sl is None:  # cannot happen for compact labels, kept for safety
            continue
        out["bbox_min"][i] = [s.start + o for s, o in zip(sl, origin)]
        out["bbox_max"][i] = [s.stop + o for s, o in zip(sl, origin)]
    for k in range(d):
        shp = [1] * d
        shp[k] = core_local.shape[k]
        coord = np.broadcast_to(
            (np.arange(core_local.shape[k], dtype=np.float64) + origin[k]).reshape(shp), core_local.shape
        )
        out["coord_sum"][:, k] = np.bincount(flat, weights=coord.ravel(), minlength=n + 1)[1:]
    return out


# --------------------------------------------------------------------------- edges
def _unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.size == 0:
        return np.zeros((0, 2), np.int64)
    pairs = np.stack([a.astype(np.int64), b.astype(np.int64)], axis=1)
    return np.unique(pairs, axis=0)


def touch_edges(view_a: np.ndarray, view_b: np.ndarray, offset, connectivity: int) -> np.ndarray:
    """Pairs of labels that touch across the contact of two neighbouring blocks.

    Parameters
    ----------
    view_a : ndarray
        Block a's local labels in its contact box for ``offset``.
    view_b : ndarray
        Block b's (= a + offset) local labels in its contact box for ``-offset``.
    offset : tuple of {-1, 0, 1}
    connectivity : int
        1 = faces only (scipy.ndimage.label's default) ... ndim = all neighbours.

    Returns
    -------
    ndarray (M, 2) of int64
        Unique ``(label_a, label_b)`` pairs, both nonzero.

    Examples
    --------
    >>> a = np.array([[0, 1, 1, 0]]); b = np.array([[2, 0, 0, 3]])
    >>> touch_edges(a, b, (1, 0), 1).tolist()
    []
    >>> touch_edges(a, b, (1, 0), 2).tolist()
    [[1, 2], [1, 3]]
    """
    offset = tuple(int(o) for o in offset)
    zero_axes = [k for k, o in enumerate(offset) if o == 0]
    nz = len(offset) - len(zero_axes)
    budget = int(connectivity) - nz
    if budget < 0:
        return np.zeros((0, 2), np.int64)
    shp = [view_a.shape[k] for k in zero_axes]
    a_arr = np.asarray(view_a).reshape(shp)
    b_arr = np.asarray(view_b).reshape(shp)
    got_a, got_b = [], []
    for s in itertools.product((-1, 0, 1), repeat=len(zero_axes)):
        if sum(1 for v in s if v) > budget:
            continue
        sa = tuple(slice(max(0, -v), n - max(0, v)) for v, n in zip(s, shp))
        sb = tuple(slice(max(0, v), n - max(0, -v)) for v, n in zip(s, shp))
        x, y = a_arr[sa].ravel(), b_arr[sb].ravel()
        m = (x != 0) & (y != 0)
        got_a.append(x[m])
        got_b.append(y[m])
    return _unique_pairs(np.concatenate(got_a), np.concatenate(got_b))


def iou_edges(band_a: np.ndarray, band_b: np.ndarray, threshold: float) -> np.ndarray:
    """One-to-one matches between two blocks' labels of the same band around their face.

    Each block segmented the band (one side is its core, the other its overlap), and
    labels not present in a block's core are 0 in its view.  A pair matches when it is
    each other's best partner by IoU and that IoU is >= ``threshold``.  Two distinct
    cells that merely touch at the face overlap little and stay apart.

    Examples
    --------
    >>> a = np.array([1, 1, 1, 1, 2, 2, 0, 0]); b = np.array([5, 5, 5, 0, 0, 6, 6, 6])
    >>> iou_edges(a, b, 0.5).tolist()
    [[1, 5]]
    """
    a = np.asarray(band_a).ravel().astype(np.int64)
    b = np.asarray(band_b).ravel().astype(np.int64)
    if a.shape != b.shape:
        raise ValueError(f"band shapes differ: {band_a.shape} vs {band_b.shape}")
    m = (a != 0) & (b != 0)
    if not m.any():
        return np.zeros((0, 2), np.int64)
    size_a = np.bincount(a, minlength=1)
    size_b = np.bincount(b, minlength=1)
    pairs, inter = np.unique(np.stack([a[m], b[m]], axis=1), axis=0, return_counts=True)
    pa, pb = pairs[:, 0], pairs[:, 1]
    iou = inter / (size_a[pa] + size_b[pb] - inter)
    # best partner of each label on either side (ties -> smaller partner label)
    order = np.lexsort((pb, -iou, pa))
    best_a = np.zeros(len(pairs), bool)
    first = np.r_[True, pa[order][1:] != pa[order][:-1]]
    best_a[order[first]] = True
    order = np.lexsort((pa, -iou, pb))
    best_b = np.zeros(len(pairs), bool)
    first = np.r_[True, pb[order][1:] != pb[order][:-1]]
    best_b[order[first]] = True
    keep = best_a & best_b & (iou >= threshold)
    return pairs[keep]


# --------------------------------------------------------------------------- numbering
def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    """Exclusive prefix sum of per-block label counts (grid order), int64."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(counts.size, np.int64)
    np.cumsum(counts[:-1], out=out[1:])
    return out


def merge_edges(edges: np.ndarray):
    """Union-find over provisional-ID edges.

    Returns
    -------
    merged_away : ndarray int64, sorted
        Provisional IDs that disappear (every member of a merged group but its smallest).
    roots : ndarray int64
        ``roots[i]`` is the smallest ID of ``merged_away[i]``'s group.

    Examples
    --------
    >>> away, roots = merge_edges(np.array([[3, 9], [9, 4], [7, 8]]))
    >>> away.tolist(), roots.tolist()
    ([4, 8, 9], [3, 7, 3])
    """
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if edges.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inv = np.unique(edges.ravel(), return_inverse=True)
    inv = inv.reshape(-1, 2)
    n = nodes.size
    graph = sparse.coo_matrix((np.ones(len(inv), np.int8), (inv[:, 0], inv[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    # nodes are sorted, so the first node of each component is its smallest ID
    _, first = np.unique(comp, return_index=True)
    root_of_node = nodes[first][comp]
    away = root_of_node != nodes
    return nodes[away], root_of_node[away]


def final_ids(provisional: np.ndarray, merged_away: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """Map provisional IDs (> 0) to final compact IDs 1..N.

    Examples
    --------
    >>> final_ids(np.array([1, 2, 3, 4, 5]), np.array([2, 4]), np.array([1, 3])).tolist()
    [1, 1, 2, 2, 3]
    """
    p = np.asarray(provisional, dtype=np.int64)
    if merged_away.size:
        pos = np.searchsorted(merged_away, p)
        posc = np.minimum(pos, merged_away.size - 1)
        hit = merged_away[posc] == p
        p = np.where(hit, roots[posc], p)
    return p - np.searchsorted(merged_away, p, side="left")


def block_lut(offset: int, n: int, merged_away: np.ndarray, roots: np.ndarray, dtype=np.uint32) -> np.ndarray:
    """Lookup table (size n + 1) from a block's local IDs to final IDs; 0 stays 0."""
    lut = np.zeros(n + 1, dtype=dtype)
    if n:
        lut[1:] = final_ids(offset + np.arange(1, n + 1, dtype=np.int64), merged_away, roots)
    return lut


# --------------------------------------------------------------------------- distributed merge (pure parts)
def id_bounds(counts: np.ndarray, offsets: np.ndarray, block_owner: np.ndarray, size: int) -> np.ndarray:
    """Contiguous ranges of provisional IDs 1..N, one per rank: rank r owns ``[b[r], b[r + 1])``.

    When the blocks holding labels are owned in grid order (each rank a contiguous run, as
    :meth:`Plan.owners` gives), a rank's range is exactly its own blocks' IDs; otherwise N / size each.

    Examples
    --------
    >>> id_bounds(np.array([2, 0, 3]), np.array([0, 2, 2]), np.array([0, 1, 1]), 2).tolist()
    [1, 3, 6]
    >>> id_bounds(np.array([2, 0, 3]), np.array([0, 2, 2]), np.array([1, 0, 0]), 2).tolist()
    [1, 4, 6]
    """
    counts = np.asarray(counts, np.int64)
    n = int(counts.sum())
    nz = np.flatnonzero(counts)
    own = np.asarray(block_owner, np.int64)[nz]
    bounds = np.empty(size + 1, np.int64)
    if nz.size and (own >= 0).all() and (np.diff(own) >= 0).all():
        starts = np.append(np.asarray(offsets, np.int64)[nz], n)
        bounds[:size] = starts[np.searchsorted(own, np.arange(size), side="left")] + 1
    else:
        bounds[:size] = -(-np.arange(size, dtype=np.int64) * n // size) + 1
    bounds[size] = n + 1
    return bounds


def id_owner(ids: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Rank whose range (:func:`id_bounds`) holds each ID (nondecreasing for sorted IDs)."""
    return np.searchsorted(bounds, np.asarray(ids, np.int64), side="right") - 1


def block_of(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Block holding each provisional ID (ID ``offsets[b] + l``, ``1 <= l <= counts[b]``)."""
    return np.searchsorted(offsets, np.asarray(ids, np.int64) - 1, side="right") - 1


def split_rows(dest: np.ndarray, size: int, *cols) -> list:
    """Per rank r, the tuple of ``cols`` rows with ``dest == r`` (kept in their order)."""
    dest = np.asarray(dest, np.int64)
    order = np.argsort(dest, kind="stable")
    cut = np.searchsorted(dest[order], np.arange(size + 1))
    cols = [np.asarray(c)[order] for c in cols]
    return [tuple(c[cut[r]:cut[r + 1]] for c in cols) for r in range(size)]


def lut_from_merged(offset: int, n: int, shift: int, away: np.ndarray, away_final: np.ndarray,
                    dtype=np.uint32) -> np.ndarray:
    """A block's lookup table (like :func:`block_lut`) from what its owner holds after the
    distributed merge: ``shift`` merged-away IDs below the block's first ID, and the block's own
    merged-away IDs (sorted) with their roots' final IDs.

    Examples
    --------
    >>> lut_from_merged(3, 4, 1, np.array([5, 7]), np.array([1, 2])).tolist()
    [0, 3, 1, 4, 2]
    """
    lut = np.zeros(n + 1, dtype=dtype)
    if n:
        ids = offset + np.arange(1, n + 1, dtype=np.int64)
        k = np.searchsorted(away, ids)
        fin = ids - shift - k
        if away.size:
            hit = away[np.minimum(k, away.size - 1)] == ids
            fin[hit] = away_final[k[hit]]
        lut[1:] = fin
    return lut


MAX_UINT32_LABEL = int(np.iinfo(np.uint32).max)


def label_dtype(n_objects: int):
    """uint32 unless the count does not fit (> MAX_UINT32_LABEL), then uint64."""
    return np.dtype(np.uint32) if n_objects <= MAX_UINT32_LABEL else np.dtype(np.uint64)


# --------------------------------------------------------------------------- object table
TABLE_FIELDS = ("id", "count", "bbox_min", "bbox_max", "coord_sum", "n_blocks")


def reduce_pieces(ids: np.ndarray, count, bbox_min, bbox_max, coord_sum, block=None) -> dict:
    """Combine per-block pieces of objects by final ID (sort based, O(K log K)).

    Returns a dict with ``id`` (sorted unique), ``count``, ``bbox_min``, ``bbox_max``,
    ``coord_sum`` and ``n_blocks`` (pieces per object; > 1 means stitched).  With
    ``block`` (the block of each piece) also ``block_sorted`` and ``block_start``: the
    blocks of object i are ``block_sorted[block_start[i]:block_start[i + 1]]``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    d = np.asarray(bbox_min).shape[1] if np.asarray(bbox_min).ndim == 2 else 0
    if ids.size == 0:
        out = {
            "id": np.zeros(0, np.int64), "count": np.zeros(0, np.int64),
            "bbox_min": np.zeros((0, d), np.int64), "bbox_max": np.zeros((0, d), np.int64),
            "coord_sum": np.zeros((0, d), np.float64), "n_blocks": np.zeros(0, np.int64),
        }
        if block is not None:
            out["block_sorted"], out["block_start"] = np.zeros(0, np.int64), np.zeros(1, np.int64)
        return out
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    out = {
        "id": s[start],
        "count": np.add.reduceat(np.asarray(count, np.int64)[order], start),
        "bbox_min": np.minimum.reduceat(np.asarray(bbox_min, np.int64)[order], start, axis=0),
        "bbox_max": np.maximum.reduceat(np.asarray(bbox_max, np.int64)[order], start, axis=0),
        "coord_sum": np.add.reduceat(np.asarray(coord_sum, np.float64)[order], start, axis=0),
        "n_blocks": np.diff(np.r_[start, s.size]),
    }
    if block is not None:
        out["block_sorted"] = np.asarray(block, np.int64)[order]
        out["block_start"] = np.r_[start, s.size].astype(np.int64)
    return out
