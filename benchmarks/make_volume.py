"""Write a synthetic fluorescence volume (and its ground-truth labels) as zarr v2 arrays.

Both the reference (zarr-python 2) and mpicellpose (zarr-python 3) read the result.

Uses the project's generator ``mpicellpose.synthetic.nuclei.make_nuclei`` when it imports
(run with the project venv); otherwise (e.g. in the reference venv) a simple built-in
generator of blurred, noisy spheres.  Deterministic by seed.

Example::

    .venv/bin/python benchmarks/make_volume.py --out benchmarks/work/vol96 \
        --shape 96 96 96 --chunks 48 --diameter 16 --seed 0

writes ``OUT/image.zarr`` (uint16, chunked by ``--chunks``) and ``OUT/truth.zarr``
(uint32 labels 1..N), plus ``OUT/volume.json`` (parameters, N, generator used).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _zarrcompat import create_v2  # noqa: E402


def simple_nuclei(shape, seed=0, diameter=16.0, density=0.25, gap=2.0):
    """Non-overlapping blurred spheres with Poisson + Gaussian noise (fallback generator)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    labels = np.zeros(shape, np.uint32)
    r_mean = diameter / 2.0
    target = density * np.prod(shape)
    covered, n, tries = 0.0, 0, 0
    centres, radii = [], []
    while covered < target and tries < 20000:
        tries += 1
        r = float(np.clip(rng.normal(r_mean, 0.15 * r_mean), 0.5 * r_mean, 1.5 * r_mean))
        c = rng.uniform(0, np.array(shape))
        if centres:
            d = np.linalg.norm(np.array(centres) - c, axis=1)
            if np.any(d < np.array(radii) + r + gap):
                continue
        centres.append(c)
        radii.append(r)
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        d2 = sum((g - cc) ** 2 for g, cc in zip(grids, c))
        inside = d2 <= r * r
        n += 1
        view = labels[tuple(slice(a, b) for a, b in zip(lo, hi))]
        view[inside] = n
        covered += inside.sum()
    img = (labels > 0).astype(np.float32) * rng.uniform(0.8, 1.2, n + 1)[labels].astype(np.float32)
    img = ndimage.gaussian_filter(img, 1.0) + 0.08
    img = rng.poisson(img * 150).astype(np.float32) / 150 + rng.normal(0, 0.04, shape)
    img = np.clip(img * 20000, 0, 65535).astype(np.uint16)
    return img, labels


def make(shape, seed, diameter):
    try:
        try:
            from mpicellpose.synthetic.nuclei import make_nuclei
        except ImportError:
            sys.path.append(os.path.dirname(HERE))  # the repository root
            from mpicellpose.synthetic.nuclei import make_nuclei
    except Exception as exc:  # noqa: BLE001 - any import problem: use the fallback
        print(f"mpicellpose.synthetic unavailable ({exc!r}); using simple_nuclei", file=sys.stderr)
        img, lab = simple_nuclei(shape, seed=seed, diameter=diameter)
        return img, lab, "benchmarks.make_volume.simple_nuclei"
    img, lab = make_nuclei(shape, seed=seed, mean_diameter=diameter)
    return img, lab, "mpicellpose.synthetic.nuclei.make_nuclei"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shape", type=int, nargs="+", default=[96, 96, 96])
    p.add_argument("--chunks", type=int, nargs="+", default=[64])
    p.add_argument("--diameter", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    chunks = a.chunks * len(a.shape) if len(a.chunks) == 1 else a.chunks
    img, lab, gen = make(a.shape, a.seed, a.diameter)
    os.makedirs(a.out, exist_ok=True)
    create_v2(os.path.join(a.out, "image.zarr"), img.shape, chunks, img.dtype)[...] = img
    lab = lab.astype(np.uint32)
    create_v2(os.path.join(a.out, "truth.zarr"), lab.shape, chunks, np.uint32)[...] = lab
    n = int(len(np.unique(lab[lab > 0])))
    meta = dict(shape=list(img.shape), chunks=list(chunks), diameter=a.diameter, seed=a.seed,
                generator=gen, n_objects=n, image="image.zarr", truth="truth.zarr")
    with open(os.path.join(a.out, "volume.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
