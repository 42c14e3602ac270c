"""Deterministic test volumes and their serial oracle, shared by in-process and mpiexec tests."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from mpicellpose.grid import geometry as geo


def blobs(shape, seed, sigma=1.5, level=0.55):
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.random(shape), sigma) > level).astype(np.uint8) * 200


def speckle(shape, seed, density=0.3):
    """Dense random voxels: many objects connected only diagonally."""
    rng = np.random.default_rng(seed)
    return (rng.random(shape) < density).astype(np.uint8) * 200


def _mask_for(shape):
    low = tuple(max(1, s // 9) for s in shape)
    m = np.zeros(low, bool)
    m[tuple(slice(0, max(1, l // 2)) for l in low)] = True
    m[tuple(slice(l - 1, l) for l in low)] = True
    return m


CASES = {
    "2d_many": dict(shape=(61, 47), blocksize=(8, 13), conn=1, kind="blobs", seed=1),
    "2d_full": dict(shape=(50, 52), blocksize=7, conn="full", kind="speckle", seed=2),
    "3d_odd": dict(shape=(23, 31, 29), blocksize=(7, 9, 11), conn=1, kind="blobs", seed=3),
    "3d_full": dict(shape=(20, 24, 28), blocksize=(6, 8, 7), conn="full", kind="speckle", seed=4),
    "3d_conn2": dict(shape=(18, 21, 16), blocksize=5, conn=2, kind="speckle", seed=5),
    "3d_one_block": dict(shape=(30, 28, 26), blocksize=64, conn=1, kind="blobs", seed=6),
    "3d_tiny_blocks": dict(shape=(12, 14, 10), blocksize=(2, 3, 2), conn=1, kind="blobs", seed=7),
    "3d_mask": dict(shape=(36, 36, 36), blocksize=(9, 12, 9), conn=1, kind="blobs", seed=8, mask=True),
    "3d_empty": dict(shape=(16, 16, 16), blocksize=8, conn=1, kind="empty", seed=9),
}


def make_case(name):
    c = CASES[name]
    shape = c["shape"]
    if c["kind"] == "blobs":
        img = blobs(shape, c["seed"])
    elif c["kind"] == "speckle":
        img = speckle(shape, c["seed"])
    else:
        img = np.zeros(shape, np.uint8)
    mask = _mask_for(shape) if c.get("mask") else None
    return img, mask


def oracle(name):
    """Whole-volume scipy.ndimage.label of the same foreground (mask-skipped blocks zeroed)."""
    c = CASES[name]
    img, mask = make_case(name)
    fg = img > 100
    if mask is not None:
        g = geo.BlockGrid(img.shape, c["blocksize"], 0)
        keep = geo.blocks_in_mask(g, mask)
        for blk in g:
            if not keep[blk.linear]:
                fg[blk.core_slices] = False
    conn = img.ndim if c["conn"] == "full" else c["conn"]
    lab, n = ndimage.label(fg, structure=ndimage.generate_binary_structure(img.ndim, conn))
    return lab, n


def run_case(name, out_dir, comm=None, **extra):
    from mpicellpose import distributed_eval

    c = CASES[name]
    img, mask = make_case(name)
    return distributed_eval(img, c["blocksize"], f"{out_dir}/{name}.zarr", mask=mask, backend="threshold",
                            backend_kwargs={"threshold": 100, "connectivity": c["conn"]}, comm=comm, **extra)
