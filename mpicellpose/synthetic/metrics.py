"""Object-level comparison of label images.

Everything here works from the sparse contingency table of the two label
images (which label of ``a`` overlaps which label of ``b``, and by how many
voxels). Only label pairs that actually overlap are ever stored, so the cost
is one pass over the voxels plus a sort or bincount of the overlapping
pairs, whatever the number of objects.

- :func:`match_objects` counts true/false positives and negatives of a
  predicted segmentation against ground truth at an IoU threshold, with a
  one-to-one matching.
- :func:`label_equivalent` tells whether two label images describe the same
  partition of the same foreground, whatever the numbering.
- :func:`equivalence_report` explains the first differences, for test
  failure messages.
"""
from __future__ import annotations

import logging
from typing import Dict, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["match_objects", "label_equivalent", "equivalence_report", "contingency"]

# A dense bincount over label values is used while the largest label is at
# most this many times the number of voxels (plus a constant); beyond that
# labels are compressed with np.unique first.
_DENSE_FACTOR = 4
_DENSE_EXTRA = 1 << 20


def _as_labels(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise TypeError(f"{name} must be an integer label array, got dtype {x.dtype}")
    if x.dtype == bool:
        x = x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.signedinteger) and x.size and x.min() < 0:
        raise ValueError(f"{name} has negative labels")
    return x.ravel()


def _compress(flat: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map the labels of ``flat`` to dense indices.

    Returns ``(index, values, sizes)``: ``index`` has the shape of ``flat``
    with 0 for background and ``1..n`` for the labels ``values[0..n-1]``
    (sorted), and ``sizes[i]`` is the voxel count of ``values[i]``.
    """
    n = flat.size
    top = int(flat.max()) if n else 0
    if top <= _DENSE_FACTOR * n + _DENSE_EXTRA:
        if flat.dtype.itemsize >= 8 or flat.dtype.kind == "b":
            flat = flat.astype(np.int64)
        counts = np.bincount(flat, minlength=top + 1)
        counts[0] = 0
        values = np.flatnonzero(counts)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[values] = np.arange(1, values.size + 1)
        return lut[flat], values.astype(flat.dtype), counts[values].astype(np.int64)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    if values.size and values[0] == 0:
        values, counts = values[1:], counts[1:]
    else:
        inverse += 1  # no background: shift so that 0 stays "background"
    return inverse, values, counts.astype(np.int64)


def contingency(a, b) -> Dict[str, np.ndarray]:
    """Sparse overlap table of two label images of the same shape.

    Parameters
    ----------
    a, b : array_like of int
        Label images, 0 is background. Labels need not be consecutive.

    Returns
    -------
    dict
        ``a_labels``, ``a_sizes``, ``b_labels``, ``b_sizes``: the non-zero
        labels of each image (sorted) and their voxel counts; ``pair_a``,
        ``pair_b``, ``pair_count``: every overlapping pair as indices into
        ``a_labels`` / ``b_labels`` and its number of shared voxels;
        ``a_only``, ``b_only``: voxels foreground in one image only.

    Examples
    --------
    >>> t = contingency([[1, 1, 0], [2, 2, 2]], [[5, 5, 5], [7, 7, 0]])
    >>> t["a_labels"].tolist(), t["b_labels"].tolist(), t["pair_count"].tolist()
    ([1, 2], [5, 7], [2, 2])
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label images differ in shape: {a.shape} vs {b.shape}")
    fa = _as_labels(a, "a")
    fb = _as_labels(b, "b")
    ia, va, sa = _compress(fa)
    ib, vb, sb = _compress(fb)
    na, nb = va.size, vb.size
    fga = ia > 0
    fgb = ib > 0
    both = fga & fgb
    pa = ia[both] - 1
    pb = ib[both] - 1
    if na * nb and na * nb <= max(4 * pa.size, _DENSE_EXTRA):
        counts = np.bincount(pa * nb + pb, minlength=na * nb)
        keys = np.flatnonzero(counts)
        pcount = counts[keys]
    else:
        keys, pcount = np.unique(pa * nb + pb, return_counts=True)
    return {
        "a_labels": va, "a_sizes": sa, "b_labels": vb, "b_sizes": sb,
        "pair_a": (keys // nb).astype(np.int64) if nb else keys.astype(np.int64),
        "pair_b": (keys % nb).astype(np.int64) if nb else keys.astype(np.int64),
        "pair_count": pcount.astype(np.int64),
        "a_only": int(np.count_nonzero(fga & ~fgb)),
        "b_only": int(np.count_nonzero(fgb & ~fga)),
    }


def _one_to_one(pa: np.ndarray, pb: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Indices of candidate pairs forming a maximum one-to-one matching.

    Among all matchings of largest size, one of largest total IoU is chosen.
    """
    if pa.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.unique(pa).size == pa.size and np.unique(pb).size == pb.size:
        return np.arange(pa.size)  # already one-to-one
    from scipy.optimize import linear_sum_assignment

    ua, ra = np.unique(pa, return_inverse=True)
    ub, rb = np.unique(pb, return_inverse=True)
    # weight = big + iou: any matching with one more pair beats any
    # matching with one fewer, whatever the IoUs
    big = float(min(ua.size, ub.size) + 1)
    w = np.zeros((ua.size, ub.size))
    w[ra, rb] = big + iou
    rows, cols = linear_sum_assignment(w, maximize=True)
    keep = w[rows, cols] > 0
    pos = -np.ones((ua.size, ub.size), dtype=np.int64)
    pos[ra, rb] = np.arange(pa.size)
    return np.sort(pos[rows[keep], cols[keep]])


def match_objects(pred, gt, iou_threshold: float = 0.5) -> Dict[str, float]:
    """Match predicted objects to ground-truth objects one-to-one by IoU.

    A predicted and a true object may be matched when their intersection
    over union is at least ``iou_threshold``; each object is matched at most
    once, maximising the number of matches (then the summed IoU).

    For ``iou_threshold > 0.5`` no search is needed: if IoU(p, g) > 0.5 the
    intersection is more than half of ``|g|`` (and of ``|p|``), so no other
    predicted object can also overlap ``g`` by more than half of it, and the
    candidate pairs are one-to-one by themselves. At exactly 0.5 ties are
    possible and at lower thresholds conflicts are common; then (only if the
    candidates are not already one-to-one) the matching is solved with
    :func:`scipy.optimize.linear_sum_assignment` on the labels involved.

    Parameters
    ----------
    pred, gt : array_like of int
        Predicted and ground-truth label images of the same shape; 0 is
        background, labels need not be consecutive.
    iou_threshold : float, optional
        Minimum IoU of a match, in (0, 1].

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (ints), ``precision = tp / (tp + fp)``,
        ``recall = tp / (tp + fn)``, ``f1 = 2 tp / (2 tp + fp + fn)``,
        ``mean_matched_iou`` (0.0 when nothing matched), ``n_pred``,
        ``n_gt`` and ``iou_threshold``. With empty denominators precision
        and recall are 1.0 when there is nothing to get wrong (no false
        positives, resp. no false negatives) and f1 is 1.0 when both images
        are empty.

    Examples
    --------
    >>> gt = np.array([[1, 1, 0, 2, 2, 2]])
    >>> pred = np.array([[7, 7, 0, 0, 0, 3]])
    >>> r = match_objects(pred, gt)
    >>> r["tp"], r["fp"], r["fn"], r["f1"]
    (1, 1, 1, 0.5)
    """
    if not 0 < float(iou_threshold) <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    t = contingency(pred, gt)
    n_pred, n_gt = t["a_labels"].size, t["b_labels"].size
    inter = t["pair_count"].astype(np.float64)
    union = t["a_sizes"][t["pair_a"]] + t["b_sizes"][t["pair_b"]] - inter
    iou = inter / union
    cand = iou >= float(iou_threshold)
    sel = _one_to_one(t["pair_a"][cand], t["pair_b"][cand], iou[cand])
    matched_iou = iou[cand][sel]
    tp = int(sel.size)
    fp = n_pred - tp
    fn = n_gt - tp
    precision = tp / (tp + fp) if tp + fp else float(fn == 0)
    recall = tp / (tp + fn) if tp + fn else float(fp == 0)
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {
        "tp": tp, "fp": fp, "fn": fn,
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "mean_matched_iou": float(matched_iou.mean()) if tp else 0.0,
        "n_pred": int(n_pred), "n_gt": int(n_gt),
        "iou_threshold": float(iou_threshold),
    }


def _equivalence(a, b):
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        return None, f"shapes differ: {a.shape} vs {b.shape}"
    t = contingency(a, b)
    return t, None


def label_equivalent(a, b) -> bool:
    """True if two label images are the same partition up to renumbering.

    Both must have the same shape and the same foreground (non-zero voxels),
    and the overlap of labels must be a bijection: every label of ``a``
    overlaps exactly one label of ``b`` and vice versa.

    Parameters
    ----------
    a, b : array_like of int
        Label images; 0 is background.

    Returns
    -------
    bool

    Examples
    --------
    >>> label_equivalent([[1, 1, 0, 2]], [[9, 9, 0, 4]])
    True
    >>> label_equivalent([[1, 1, 0, 2]], [[9, 8, 0, 4]])
    False
    """
    t, err = _equivalence(a, b)
    if err is not None:
        return False
    if t["a_only"] or t["b_only"]:
        return False
    n = t["pair_a"].size
    return n == t["a_labels"].size == t["b_labels"].size


def equivalence_report(a, b, max_items: int = 5) -> str:
    """Describe how two label images differ as partitions.

    Parameters
    ----------
    a, b : array_like of int
        Label images; 0 is background.
    max_items : int, optional
        How many examples of each kind of difference to list.

    Returns
    -------
    str
        ``"equivalent: ..."`` when :func:`label_equivalent` holds; otherwise
        lines naming foreground mismatches (with a voxel position), labels of
        ``a`` split over several labels of ``b`` and labels of ``b`` merging
        several labels of ``a``.

    Examples
    --------
    >>> print(equivalence_report([[1, 1, 2, 2]], [[5, 5, 5, 5]]))
    not equivalent: 2 labels in a, 1 labels in b
    merged: 1 label(s) of b cover several labels of a
      b=5 <- a=[1, 2] (overlaps [2, 2] voxels)
    """
    a = np.asarray(a)
    b = np.asarray(b)
    t, err = _equivalence(a, b)
    if err is not None:
        return "not equivalent: " + err
    na, nb = t["a_labels"].size, t["b_labels"].size
    if label_equivalent(a, b):
        return f"equivalent: {na} labels, {int(np.count_nonzero(a))} foreground voxels"
    lines = [f"not equivalent: {na} labels in a, {nb} labels in b"]
    for name, count in (("a", t["a_only"]), ("b", t["b_only"])):
        if count:
            if name == "a":
                where = np.argwhere((a != 0) & (b == 0))
            else:
                where = np.argwhere((b != 0) & (a == 0))
            first = tuple(int(v) for v in where[0])
            lines.append(f"foreground only in {name}: {count} voxels, first at {first}")
    pa, pb, pc = t["pair_a"], t["pair_b"], t["pair_count"]
    for side, key, other, lab_key, olab_key in (
            ("split", pa, pb, "a_labels", "b_labels"),
            ("merged", pb, pa, "b_labels", "a_labels")):
        if key.size == 0:
            continue
        nper = np.bincount(key, minlength=t[lab_key].size)
        bad = np.flatnonzero(nper > 1)
        if bad.size == 0:
            continue
        if side == "split":
            lines.append(f"split: {bad.size} label(s) of a cover several labels of b")
        else:
            lines.append(f"merged: {bad.size} label(s) of b cover several labels of a")
        for i in bad[:max_items]:
            sel = key == i
            others = t[olab_key][other[sel]].tolist()
            counts = pc[sel].tolist()
            lab = int(t[lab_key][i])
            if side == "split":
                lines.append(f"  a={lab} -> b={others} (overlaps {counts} voxels)")
            else:
                lines.append(f"  b={lab} <- a={others} (overlaps {counts} voxels)")
        if bad.size > max_items:
            lines.append(f"  ... {bad.size - max_items} more")
    return "\n".join(lines)
