"""Training data of the Cellpose 4 stand-in (:mod:`mpicellpose.training.cp4`): ``--data v1`` and ``v2``.

Both are 2D images with labels built from :mod:`mpicellpose.synthetic`; ``v2`` (the shipped model's)
normalises each source before slicing and cropping, and pads crops into the 256x256 tile so that the
network's output depends little on how much of a tile an image fills.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from ..synthetic.labels import split_disconnected
from ..synthetic.nuclei import make_nuclei
from ..volumes.storage import plain_json

#: ``--data v1`` training volumes: the first two of the Cellpose 3 demo model's (clean; noisy and blurred).
N_TRAIN_VOLUMES = 2
SLICE_STRIDE = 14
#: Extra full-size 256x256 tiles (CPSAM's tile size), ``make_nuclei`` seeds ``500 + seed + i``.
N_TILES = 8


def training_set(seed: int = 0) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """2D training images: slices of the first :data:`N_TRAIN_VOLUMES` Cellpose 3 demo training
    volumes along all three axes, plus :data:`N_TILES` synthetic 256x256 images."""
    from .nuclei_data import TRAIN_VOLUMES, training_slices

    images, labels = training_slices(TRAIN_VOLUMES[:N_TRAIN_VOLUMES], seed=seed, stride=SLICE_STRIDE)
    for i in range(N_TILES):
        img, lab = make_nuclei((256, 256), seed=500 + seed + i, density=0.15 + 0.03 * i,
                               touching_fraction=0.3)
        images.append(img.astype(np.float32))
        labels.append(split_disconnected(lab))
    return images, labels


#: ``--data v2``: all four Cellpose 3 demo training volumes, varied 256x256 tiles, and crops.
V2_TILES = 24
V2_TILE_CROPS = 2
V2_SLICE_CROPS = 1
V2_MIN_CROP = 24
TILE = 256


def _normalized(img: np.ndarray) -> np.ndarray:
    """``img`` scaled so that its 1st/99th percentiles become 0/1 (Cellpose's ``normalize99``)."""
    lo, hi = (float(v) for v in np.percentile(img, [1.0, 99.0]))
    return ((img.astype(np.float32) - lo) / max(hi - lo, 1e-3)).astype(np.float32)


def _v2_tile_spec(i: int, seed: int) -> dict:
    """Generator arguments of the ``i``-th v2 tile: every third one with ``make_nuclei``'s defaults
    (bar density and contacts), the others with varied size, brightness, noise, blur and gradient."""
    rng = np.random.default_rng(1000 + seed + i)
    spec = dict(shape=(TILE, TILE), seed=500 + seed + i, density=float(rng.uniform(0.12, 0.4)),
                touching_fraction=float(rng.uniform(0.1, 0.5)))
    if i % 3:
        spec.update(mean_diameter=float(rng.uniform(13.0, 19.0)), diameter_jitter=float(rng.uniform(0.15, 0.35)),
                    noise=float(rng.uniform(0.02, 0.08)), photons=float(rng.choice([40.0, 60.0, 150.0, 400.0])),
                    blur_sigma=float(rng.uniform(0.6, 1.6)), intensity_jitter=float(rng.uniform(0.15, 0.4)),
                    background=float(rng.uniform(0.04, 0.15)))
        if rng.random() < 0.3:
            spec["gradient"] = (int(rng.integers(0, 2)), 0.4, 1.6)
    return spec


def _crop_into_tile(rng, img: np.ndarray, lab: np.ndarray):
    """A random crop (sides from :data:`V2_MIN_CROP` to the image's) of a normalised image, zero-padded
    to a 256x256 tile: centred as Cellpose pads a small image (``get_pad_yx``) or at a random offset."""
    H, W = img.shape
    h = int(rng.integers(min(V2_MIN_CROP, H), H + 1))
    w = int(rng.integers(min(V2_MIN_CROP, W), W + 1))
    y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    if rng.random() < 0.5:
        py, px = (TILE - h) // 2, (TILE - w) // 2
    else:
        py, px = int(rng.integers(0, TILE - h + 1)), int(rng.integers(0, TILE - w + 1))
    ti = np.zeros((TILE, TILE), np.float32)
    tl = np.zeros((TILE, TILE), np.uint32)
    ti[py:py + h, px:px + w] = img[y0:y0 + h, x0:x0 + w]
    tl[py:py + h, px:px + w] = lab[y0:y0 + h, x0:x0 + w]
    return ti, split_disconnected(tl)


def training_set_v2(seed: int = 0, diameter: float = 16.0) -> Tuple[List[np.ndarray], List[np.ndarray], dict]:
    """2D training images for ``--data v2``, each **already normalised** (1st/99th percentiles of its
    source image or volume -> 0/1, as mpicellpose normalises a block by global bounds), so that a crop
    padded with zeros looks like a block that Cellpose pads to a 256x256 tile:

    - slices (every 14th, three axes) of all four Cellpose 3 demo training volumes, normalised per volume;
    - :data:`V2_TILES` 256x256 ``make_nuclei`` tiles (:func:`_v2_tile_spec`: varied size, brightness,
      noise, blur, gradient);
    - :data:`V2_TILE_CROPS` crops per tile and :data:`V2_SLICE_CROPS` per slice (:func:`_crop_into_tile`),
      so that the network sees every amount of padding and content anywhere in the tile.

    Returns images, labels and a description (for the provenance record).
    """
    from .nuclei_data import TRAIN_VOLUMES

    rng = np.random.default_rng(2000 + seed)
    sources = []
    for spec in TRAIN_VOLUMES:
        kw = dict(spec, seed=int(spec["seed"]) + int(seed), mean_diameter=diameter)
        vol, lab = make_nuclei(**kw)
        vol = _normalized(vol)
        for axis in range(3):
            for pos in range(SLICE_STRIDE // 2, vol.shape[axis], SLICE_STRIDE):
                sources.append((np.take(vol, pos, axis=axis), split_disconnected(np.take(lab, pos, axis=axis)),
                                V2_SLICE_CROPS))
    n_slices = len(sources)
    tile_specs = [_v2_tile_spec(i, seed) for i in range(V2_TILES)]
    for spec in tile_specs:
        img, lab = make_nuclei(**spec)
        sources.append((_normalized(img), split_disconnected(lab), V2_TILE_CROPS))
    images, labels = [], []
    for img, lab, ncrop in sources:
        images.append(img)
        labels.append(lab)
    n_crops = 0
    for img, lab, ncrop in sources:
        for _ in range(ncrop):
            ci, cl = _crop_into_tile(rng, img, lab)
            if cl.max() > 0:
                images.append(ci)
                labels.append(cl)
                n_crops += 1
    desc = {"data": "v2", "volumes": plain_json([dict(v, seed=v["seed"] + seed) for v in TRAIN_VOLUMES]),
            "n_volume_slices": n_slices, "slice_stride": SLICE_STRIDE, "n_tiles": V2_TILES,
            "tiles": plain_json(tile_specs), "n_crops": n_crops,
            "crops": f"{V2_TILE_CROPS} per tile, {V2_SLICE_CROPS} per slice; sides uniform in "
                     f"[{V2_MIN_CROP}, source side]; zero-padded to {TILE}x{TILE}, centred (p=0.5) or at a "
                     f"random offset; rng default_rng(2000+seed)",
            "normalization": "per source image/volume, percentiles 1/99 -> 0/1, before slicing and cropping; "
                             "train_seg normalize off"}
    return images, labels, desc
