"""Small Segmenter objects for tests (importable under mpiexec too)."""
import time

import numpy as np


class Identity:
    """Treats the image as its own labels: a perfect segmenter of a ground-truth volume."""

    name = "identity"

    def segment(self, image, ndim):
        return np.asarray(image).astype(np.int64)


class FailOnMarker:
    """Threshold segmenter that raises on the block containing ``marker`` and sleeps per block."""

    name = "fail-on-marker"

    def __init__(self, marker=77, sleep=0.0):
        self.marker, self.sleep = marker, sleep

    def segment(self, image, ndim):
        time.sleep(self.sleep)
        if np.any(image == self.marker):
            raise RuntimeError("boom: simulated backend failure")
        from scipy import ndimage

        return ndimage.label(image > 100)[0]
