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


class SkewedSleep:
    """Threshold segmenter (``image > threshold``, face connectivity) whose cost grows with the
    foreground: it sleeps ``unit`` x clip(``skew`` x foreground fraction / ``dense``, 1, ``skew``),
    so a block at least ``dense`` foreground costs ``skew`` (10) times an empty one.  Each process
    adds the seconds it slept to ``SkewedSleep.slept``."""

    name = "skewed-sleep"
    slept = 0.0

    def __init__(self, unit=0.05, threshold=100, dense=0.5, skew=10.0):
        self.unit, self.threshold, self.dense, self.skew = float(unit), threshold, float(dense), float(skew)

    def describe(self):
        return {"unit": self.unit, "threshold": self.threshold, "dense": self.dense, "skew": self.skew}

    def segment(self, image, ndim):
        from scipy import ndimage

        fg = np.asarray(image) > self.threshold
        t = self.unit * min(self.skew, max(1.0, self.skew * float(fg.mean()) / self.dense))
        time.sleep(t)
        SkewedSleep.slept += t
        return ndimage.label(fg)[0]
