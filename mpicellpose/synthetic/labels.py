"""Label-array helpers of the synthetic data: disconnected pieces of one label made labels of
their own, and the pairs of labels that touch."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["adjacent_label_pairs", "split_disconnected"]


def split_disconnected(labels: np.ndarray, min_size: int = 1) -> np.ndarray:
    """Give every connected piece of every label its own label.

    Pieces smaller than ``min_size`` voxels are set to background. The result
    is renumbered 1..N in order of first appearance of the original label
    (and, within a label, of the piece).

    Parameters
    ----------
    labels : numpy.ndarray
        Integer label image (2D or 3D), 0 is background.
    min_size : int, optional
        Smallest piece kept, in voxels.

    Returns
    -------
    numpy.ndarray
        uint32 labels with each label a single connected component
        (face connectivity).

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.array([[1, 0, 1], [0, 0, 0], [2, 2, 0]])
    >>> split_disconnected(lab)
    array([[1, 0, 2],
           [0, 0, 0],
           [3, 3, 0]], dtype=uint32)
    """
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.uint32)
    next_id = 1
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == lab
        pieces, n = ndimage.label(mask)
        if n == 1:
            if mask.sum() >= min_size:
                out[sl][mask] = next_id
                next_id += 1
            continue
        sizes = np.bincount(pieces.ravel(), minlength=n + 1)
        for p in range(1, n + 1):
            if sizes[p] >= min_size:
                out[sl][pieces == p] = next_id
                next_id += 1
    return out


def adjacent_label_pairs(labels: np.ndarray) -> np.ndarray:
    """Pairs of distinct non-zero labels that share a face (6/4-connectivity).

    Parameters
    ----------
    labels : numpy.ndarray
        Integer label image.

    Returns
    -------
    numpy.ndarray
        ``(M, 2)`` array of unique pairs ``(a, b)`` with ``a < b``.

    Examples
    --------
    >>> import numpy as np
    >>> adjacent_label_pairs(np.array([[1, 1, 2], [0, 0, 0], [3, 0, 4]]))
    array([[1, 2]])
    """
    labels = np.asarray(labels)
    pairs = []
    for axis in range(labels.ndim):
        n = labels.shape[axis]
        if n < 2:
            continue
        a = np.take(labels, np.arange(n - 1), axis=axis).ravel()
        b = np.take(labels, np.arange(1, n), axis=axis).ravel()
        sel = (a != b) & (a > 0) & (b > 0)
        if sel.any():
            a, b = a[sel], b[sel]
            pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
    if not pairs:
        return np.zeros((0, 2), dtype=labels.dtype)
    return np.unique(np.concatenate(pairs), axis=0)
