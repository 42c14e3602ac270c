"""Synthetic per-block labels for benchmarking the merge/stitch path without inference.

Writes, for a G0 x G1 x G2 grid of blocks of B0 x B1 x B2 voxels (volume = grid * block),
a population of spherical objects cut by block faces, as a segmentation backend would
produce it block by block.  Deterministic by ``--seed``.  Run with either venv::

    python benchmarks/make_blocks.py --out benchmarks/work/blocks_g4 --grid 4 --block 32

Objects
-------
Sphere centres sit on a jittered lattice (spacing ``diameter + gap + 2*jitter``, a random
global offset, each site occupied with probability ``--occupancy``), radii vary in
``[0.35, 0.5] * diameter``: two distinct objects are always at least ``--gap`` voxels
apart, so *the exact whole-volume answer is known*: two pieces belong to the same final
label iff they come from the same sphere (for ``gap >= 1`` this is also what 6-connected
"touch" stitching of the pieces must give).  Every block face cuts many spheres, including
thin caps of a few voxels.

Layout written under ``OUT/`` (all zarr arrays in zarr *format 2*, Zstd, readable by
zarr-python 2 and 3; shape = grid * block; chunks = block, so chunk ``(i, j, k)`` is
block ``(i, j, k)`` and holds exactly its own core)
--------------------------------------------------------------------------------------

``local.zarr``  uint32, *block-local* labels: in every block the pieces are numbered
    1..n_b (0 = background) in increasing order of their object's ID; a block with no
    piece is all zeros.  This is what mpicellpose's scratch array holds after the segment
    phase.  ``attrs``: ``grid``, ``block``, ``seed``, ``diameter``, ``gap``,
    ``occupancy``, ``n_objects``, ``n_pieces``, ``layout`` = "block-local".

``packed.zarr`` uint32, the same pieces with the reference's global IDs
    ``linear_block_index * 100000 + local`` (C-order linear index over the grid; 0 stays 0):
    exactly the reference's temporary ``segmentation_unstitched.zarr``.  Requires
    n_blocks <= 42949 and n_b <= 99999.

``truth.npz``
    ``grid``, ``block``            int arrays of length 3
    ``counts``                     int64 (n_blocks,), n_b per block in C order
    ``offsets``                    int64 (n_blocks + 1,), exclusive prefix sum of counts
    ``piece_object``               int64 (n_pieces,), object ID (1..n_objects) of piece
                                   ``(block b, local l)`` at index ``offsets[b] + l - 1``
    ``piece_voxels``               int64 (n_pieces,), voxel count of each piece
    ``n_objects``                  number of objects with at least one voxel

``meta.json``  the parameters and counts above, plus timings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _zarrcompat import create_v2  # noqa: E402

ID_STRIDE = 100000          # the reference's per-block ID stride
MAX_BLOCKS = (2 ** 32 - 1) // ID_STRIDE


def _triple(v):
    v = list(v)
    return tuple(int(x) for x in (v * 3 if len(v) == 1 else v))


def make_objects(shape, diameter, gap, occupancy, seed):
    """Centres (n, 3) float and radii (n,) of non-touching spheres filling `shape`."""
    rng = np.random.default_rng(seed)
    jitter = 0.25 * diameter
    spacing = diameter + gap + 2.0 * jitter
    offset = rng.uniform(0, spacing, size=3)
    axes = [np.arange(o - spacing, s + spacing, spacing) for o, s in zip(offset, shape)]
    sites = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    keep = rng.random(len(sites)) < occupancy
    centres = sites[keep] + rng.uniform(-jitter, jitter, size=(int(keep.sum()), 3))
    radii = rng.uniform(0.35, 0.5, size=len(centres)) * diameter
    inside = np.all((centres + radii[:, None] > 0) & (centres - radii[:, None] < np.array(shape) - 1),
                    axis=1)
    return centres[inside], radii[inside]


def rasterize_block(lo, hi, centres, radii, candidates):
    """Object IDs (1-based, global) painted into the box [lo, hi); 0 = background."""
    out = np.zeros(tuple(h - l for l, h in zip(lo, hi)), np.int64)
    for i in candidates:
        c, r = centres[i], radii[i]
        a = np.maximum(np.ceil(c - r).astype(int), lo)
        b = np.minimum(np.floor(c + r).astype(int) + 1, hi)
        if np.any(b <= a):
            continue
        g = np.ogrid[tuple(slice(x, y) for x, y in zip(a, b))]
        d2 = sum((gg - cc) ** 2 for gg, cc in zip(g, c))
        view = out[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))]
        view[d2 <= r * r] = i + 1
    return out


def generate(out, grid, block, diameter=12.0, gap=2.0, occupancy=0.8, seed=0):
    """Write the layout described in the module docstring; return the meta dict."""
    t0 = time.perf_counter()
    grid, block = _triple(grid), _triple(block)
    shape = tuple(g * b for g, b in zip(grid, block))
    n_blocks = int(np.prod(grid))
    if n_blocks > MAX_BLOCKS:
        raise ValueError(f"{n_blocks} blocks exceed the reference's ID packing ({MAX_BLOCKS})")
    centres, radii = make_objects(shape, diameter, gap, occupancy, seed)
    # candidate objects per block from each object's bounding box
    lo_blk = np.clip(np.floor((centres - radii[:, None]) / block).astype(int), 0, np.array(grid) - 1)
    hi_blk = np.clip(np.floor((centres + radii[:, None]) / block).astype(int), 0, np.array(grid) - 1)
    cand = [[] for _ in range(n_blocks)]
    for i in range(len(centres)):
        for bi in np.ndindex(*(hi_blk[i] - lo_blk[i] + 1)):
            idx = tuple(int(x) for x in lo_blk[i] + np.array(bi))
            cand[np.ravel_multi_index(idx, grid)].append(i)

    os.makedirs(out, exist_ok=True)
    local_z = create_v2(os.path.join(out, "local.zarr"), shape, block, np.uint32)
    packed_z = create_v2(os.path.join(out, "packed.zarr"), shape, block, np.uint32)
    counts = np.zeros(n_blocks, np.int64)
    piece_object, piece_voxels = [], []
    for lin, bidx in enumerate(np.ndindex(*grid)):
        lo = tuple(i * b for i, b in zip(bidx, block))
        hi = tuple(l + b for l, b in zip(lo, block))
        obj = rasterize_block(lo, hi, centres, radii, cand[lin])
        ids, inv, vox = np.unique(obj, return_inverse=True, return_counts=True)
        inv = inv.reshape(obj.shape)
        if ids[0] != 0:           # block entirely inside one object: shift so 0 is background
            ids, vox, inv = np.concatenate([[0], ids]), np.concatenate([[0], vox]), inv + 1
        n = len(ids) - 1
        if n > ID_STRIDE - 1:
            raise ValueError(f"block {bidx} has {n} pieces; the reference packs at most 99999")
        local = inv.astype(np.uint32)
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        local_z[sl] = local
        packed = np.where(local > 0, np.uint32(lin * ID_STRIDE) + local, 0).astype(np.uint32)
        packed_z[sl] = packed
        counts[lin] = n
        piece_object.append(ids[1:])
        piece_voxels.append(vox[1:])
    piece_object = np.concatenate(piece_object).astype(np.int64)
    piece_voxels = np.concatenate(piece_voxels).astype(np.int64)
    # renumber objects 1..n_objects over those with voxels, in order of first appearance ID
    present = np.unique(piece_object)
    piece_object = np.searchsorted(present, piece_object) + 1
    offsets = np.concatenate([[0], np.cumsum(counts)])
    np.savez(os.path.join(out, "truth.npz"), grid=np.array(grid), block=np.array(block),
             counts=counts, offsets=offsets, piece_object=piece_object,
             piece_voxels=piece_voxels, n_objects=len(present))
    objs_per_piece = np.bincount(piece_object)
    meta = dict(grid=list(grid), block=list(block), shape=list(shape), seed=seed,
                diameter=diameter, gap=gap, occupancy=occupancy, n_blocks=n_blocks,
                n_objects=int(len(present)), n_pieces=int(len(piece_object)),
                n_cut_objects=int(np.sum(objs_per_piece > 1)),
                max_pieces_per_block=int(counts.max()), min_piece_voxels=int(piece_voxels.min()),
                n_pieces_under_5_voxels=int(np.sum(piece_voxels < 5)),
                layout="block-local", id_stride=ID_STRIDE, seconds=round(time.perf_counter() - t0, 3))
    local_z.attrs.update(meta)
    packed_z.attrs.update({**meta, "layout": "reference-packed"})
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--grid", type=int, nargs="+", default=[4], help="blocks per axis (1 or 3 ints)")
    p.add_argument("--block", type=int, nargs="+", default=[32], help="block shape (1 or 3 ints)")
    p.add_argument("--diameter", type=float, default=12.0)
    p.add_argument("--gap", type=float, default=2.0)
    p.add_argument("--occupancy", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    meta = generate(a.out, a.grid, a.block, a.diameter, a.gap, a.occupancy, a.seed)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
