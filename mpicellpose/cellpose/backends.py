"""Segmentation backends behind one small interface.

A backend is created once per rank and then called once per block with the block's
image (spatial axes first, an optional channel axis last).  It returns integer labels
over the spatial shape.  Here: the threshold and labels backends and :func:`make_backend`;
the interface and the Cellpose backend are in :mod:`mpicellpose.cellpose.segmenter`, model
resolution in :mod:`mpicellpose.cellpose.models`.  Heavy dependencies (torch, cellpose) are
imported lazily.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import BackendError, ConfigError
from .segmenter import CellposeSegmenter, Segmenter

class ThresholdSegmenter(Segmenter):
    """Connected components of ``image > threshold``.

    Parameters
    ----------
    threshold : float
    connectivity : int or 'full'
        1 = faces (scipy.ndimage.label's default) up to ndim (or 'full') = all neighbours.
    channel : int
        Channel used when the image has a channel axis (last).

    Examples
    --------
    >>> seg = ThresholdSegmenter(0.5, 1)
    >>> seg.segment(np.array([[1., 0, 1], [1, 0, 0]]), ndim=2).tolist()
    [[1, 0, 2], [1, 0, 0]]
    """

    name = "threshold"

    def __init__(self, threshold: float = 0.0, connectivity: int = 1, channel: int = 0):
        self.threshold = float(threshold)
        self.connectivity = 99 if connectivity == "full" else int(connectivity)
        self.channel = int(channel)

    def segment(self, image, ndim=None):
        image = np.asarray(image)
        ndim = image.ndim if ndim is None else ndim
        if image.ndim > ndim:
            image = image[..., self.channel]
        fg = image > self.threshold
        structure = ndimage.generate_binary_structure(ndim, min(self.connectivity, ndim))
        labels, _ = ndimage.label(fg, structure=structure)
        return labels

    def describe(self):
        return {"backend": self.name, "threshold": self.threshold, "connectivity": self.connectivity,
                "channel": self.channel}


class LabelsSegmenter(Segmenter):
    """The input already holds labels (e.g. per-block segmentations from another tool):
    each block's labels are taken as they are, then stitched and renumbered like any other
    backend's.  Also the no-inference path of the merge benchmarks.

    Examples
    --------
    >>> LabelsSegmenter().segment(np.array([[0, 7], [7, 3]]), ndim=2).tolist()
    [[0, 7], [7, 3]]
    """

    name = "labels"

    def segment(self, image, ndim=None):
        image = np.asarray(image)
        if image.dtype.kind not in "iub":
            raise BackendError(f"the labels backend needs an integer input, got {image.dtype}")
        return image


def make_backend(name: str, *, model_kwargs=None, eval_kwargs=None, backend_kwargs=None, resolved=None,
                 device=None, threads=None, ndim=3, precision=None) -> Segmenter:
    """Build the backend called ``name`` ('cellpose', 'threshold' or 'labels')."""
    bk = dict(backend_kwargs or {})
    if name == "threshold":
        return ThresholdSegmenter(bk.get("threshold", 0.0), bk.get("connectivity", 1), bk.get("channel", 0))
    if name == "labels":
        return LabelsSegmenter()
    if name == "cellpose":
        return CellposeSegmenter(model_kwargs, eval_kwargs, resolved=resolved, device=device, threads=threads,
                                 ndim=ndim, precision=precision)
    raise ConfigError(f"unknown backend {name!r}; choose 'cellpose', 'threshold' or 'labels'")
