"""Training data of the Cellpose 3 demo nuclei model (:mod:`mpicellpose.training.nuclei`), also
the first volumes of the Cellpose 4 stand-in's (:mod:`mpicellpose.training.cp4_data`): 2D slices
along all three axes of synthetic 3D nuclei volumes."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..synthetic.labels import split_disconnected
from ..synthetic.nuclei import make_nuclei


#: Mean nucleus diameter (voxels) of the training data = the model's ``diam_mean``.
MEAN_DIAMETER = 16.0
#: Generator settings of the training volumes (``seed`` is offset by the
#: run's seed). They span sparse to dense, dim to bright, sharp to blurred,
#: with and without an illumination gradient.
TRAIN_VOLUMES: Tuple[Dict, ...] = (
    dict(shape=(112, 112, 112), seed=11, density=0.25, touching_fraction=0.3),
    dict(shape=(112, 112, 112), seed=12, density=0.32, touching_fraction=0.5,
         noise=0.06, photons=60.0, blur_sigma=1.4),
    dict(shape=(112, 112, 112), seed=13, density=0.15, touching_fraction=0.2,
         noise=0.02, photons=400.0, blur_sigma=0.7, intensity_jitter=0.35),
    dict(shape=(112, 112, 112), seed=14, density=0.28, touching_fraction=0.4,
         gradient=(0, 0.4, 1.6), diameter_jitter=0.3),
)
#: Distance between the training slices cut out of each volume, per axis.
SLICE_STRIDE = 14


def training_slices(volumes: Sequence[Dict] = TRAIN_VOLUMES, *, seed: int = 0,
                    stride: int = SLICE_STRIDE) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """2D training images and labels cut from synthetic 3D volumes.

    Parameters
    ----------
    volumes : sequence of dict
        Keyword arguments of :func:`~mpicellpose.synthetic.nuclei.make_nuclei`, one
        dict per volume (``shape`` included).
    seed : int, optional
        Added to every volume's ``seed``.
    stride : int, optional
        Distance between slices along each axis.

    Returns
    -------
    images : list of numpy.ndarray
        float32 2D images.
    labels : list of numpy.ndarray
        uint32 2D labels; labels split by the cut are renumbered so that
        every label is one connected piece.

    Examples
    --------
    >>> imgs, labs = training_slices([dict(shape=(32, 32, 32), seed=1)], stride=16)
    >>> len(imgs), imgs[0].shape
    (6, (32, 32))
    """
    images, labels = [], []
    for spec in volumes:
        kw = dict(spec)
        kw["seed"] = int(kw.get("seed", 0)) + int(seed)
        kw.setdefault("mean_diameter", MEAN_DIAMETER)
        img, lab = make_nuclei(**kw)
        for axis in range(3):
            n = img.shape[axis]
            for pos in range(stride // 2, n, stride):
                images.append(np.take(img, pos, axis=axis).astype(np.float32))
                labels.append(split_disconnected(np.take(lab, pos, axis=axis)))
    return images, labels
