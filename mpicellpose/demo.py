"""``mpicellpose demo``: the main job end to end on synthetic nuclei, with the shipped model.

Generates a 3D nuclei volume with ground truth (rank 0), writes it as zarr, segments it with
the shipped ``demo`` Cellpose model on however many ranks were launched, writes labels, the
object table and a PNG preview, and reports object F1 against the ground truth, how many
objects cut by block faces were rejoined, and the time per phase.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger(__name__)


def block_ids(shape, blocksize) -> np.ndarray:
    """Linear block index of every voxel (C order), int64."""
    grids = np.meshgrid(*[np.arange(s) // b for s, b in zip(shape, blocksize)], indexing="ij")
    nb = [int(np.ceil(s / b)) for s, b in zip(shape, blocksize)]
    return np.ravel_multi_index(grids, nb).astype(np.int64)


def seam_report(pred, gt, blocksize, iou_threshold=0.5) -> dict:
    """Seam quality: ground-truth objects cut by block faces, and what became of them.

    Returns
    -------
    dict with
      ``cut``: ground-truth objects whose voxels lie in more than one block core;
      ``rejoined``: cut objects matched one-to-one (IoU >= threshold) by a predicted object;
      ``seam_splits``: cut objects covered by two or more predicted labels, each holding at
      least 10% of the object (the object was left in pieces);
      ``seam_merges``: predicted labels spanning several blocks that hold at least half of
      two or more ground-truth objects (distinct objects merged);
      ``seam_fragments``: predicted labels that match no ground-truth object (IoU below the
      threshold) and have a voxel in a plane on either side of a block face: slivers of cut
      objects that the stitching left as objects of their own (too small to count as a split).
    """
    from scipy import ndimage

    from .metrics import contingency

    pred = np.asarray(pred)
    gt = np.asarray(gt)
    bid = block_ids(gt.shape, blocksize)
    fg = gt > 0
    key = np.unique(gt[fg].astype(np.int64) * (int(bid.max()) + 1) + bid[fg])
    gl, nblk = np.unique(key // (int(bid.max()) + 1), return_counts=True)
    cut = set(gl[nblk > 1].tolist())
    pfg = pred > 0
    pkey = np.unique(pred[pfg].astype(np.int64) * (int(bid.max()) + 1) + bid[pfg])
    pl, pblk = np.unique(pkey // (int(bid.max()) + 1), return_counts=True)
    multi_block_pred = set(pl[pblk > 1].tolist())

    t = contingency(pred, gt)
    pa, pb, cnt = t["pair_a"], t["pair_b"], t["pair_count"].astype(np.float64)
    plab, glab = t["a_labels"][pa], t["b_labels"][pb]
    gsize = t["b_sizes"][pb].astype(np.float64)
    psize = t["a_sizes"][pa].astype(np.float64)
    iou = cnt / (gsize + psize - cnt)
    matched = set(glab[iou >= max(iou_threshold, 0.5 + 1e-12)].tolist())
    rejoined = len(cut & matched)
    big_piece = cnt >= 0.1 * gsize
    pieces = {}
    for g, p in zip(glab[big_piece], plab[big_piece]):
        pieces.setdefault(int(g), set()).add(int(p))
    splits = sum(1 for g in cut if len(pieces.get(g, ())) >= 2)
    half = cnt >= 0.5 * gsize
    holders = {}
    for g, p in zip(glab[half], plab[half]):
        holders.setdefault(int(p), set()).add(int(g))
    merges = sum(1 for p, gs in holders.items() if len(gs) >= 2 and p in multi_block_pred)
    matched_pred = set(plab[iou >= max(iou_threshold, 0.5 + 1e-12)].tolist())
    bs = [int(v) for v in (blocksize if np.ndim(blocksize) else [blocksize] * pred.ndim)]
    faces = [set(range(b, n, b)) for b, n in zip(bs, pred.shape)]  # first voxel after each face
    fragments = 0
    boxes = ndimage.find_objects(pred.astype(np.int64, copy=False)) if pfg.any() else []
    for lab, box in enumerate(boxes, start=1):
        if box is None or lab in matched_pred:
            continue
        # touches face c when it has a voxel at c - 1 or c along that axis
        if any(any(sl.start <= c <= sl.stop for c in f) for sl, f in zip(box, faces)):
            fragments += 1
    return {"cut": len(cut), "rejoined": int(rejoined), "seam_splits": int(splits), "seam_merges": int(merges),
            "seam_fragments": int(fragments)}


def register(sub) -> None:
    p = sub.add_parser("demo", help="segment a synthetic nuclei volume with the shipped model and score it",
                       description="Generate a synthetic 3D nuclei volume with ground truth, segment it with the "
                                   "shipped 'demo' Cellpose model on every launched rank, and report object F1 "
                                   "(IoU 0.5), objects cut by block faces and rejoined, and time per phase.")
    p.add_argument("--dir", default="mpicellpose-demo", help="where to write image, labels, table, preview")
    p.add_argument("--size", type=int, default=160, help="edge of the cubic volume (default 160)")
    p.add_argument("--blocksize", default=None,
                   help="block size (default SIZE/2,SIZE,SIZE: two blocks, so objects are cut by a face)")
    p.add_argument("--overlap", default="16",
                   help="overlap per side (default 16 = one nucleus diameter, which keeps the demo under 5 "
                        "minutes on 2 CPU cores; the segment command's default is 2 x diameter)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic volume")
    p.add_argument("--gradient", action="store_true",
                   help="add a 1:4 brightness gradient along z, across the block faces (compare --normalize "
                        "global with --normalize block)")
    p.add_argument("--normalize", choices=("global", "block", "none"), default="global")
    p.add_argument("--stitch", choices=("iou", "touch"), default="iou")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:K")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.set_defaults(func=main)


def main(args) -> int:
    from . import comm as mpi
    from .cli_segment import run_and_report
    from .config import RunConfig

    comm = mpi.world()
    rank = comm.Get_rank()
    os.makedirs(args.dir, exist_ok=True)
    image_path = os.path.join(args.dir, "image.zarr")
    gt_path = os.path.join(args.dir, "ground_truth.zarr")
    out_path = os.path.join(args.dir, "labels.zarr")
    t0 = time.perf_counter()
    err = None
    if rank == 0:
        try:
            from . import io as mio
            from .synthetic import make_nuclei

            gradient = (0, 0.25, 1.0) if args.gradient else None
            img, gt = make_nuclei((args.size,) * 3, seed=args.seed, gradient=gradient)
            mio.numpy_array_to_zarr(image_path, img, (64, 64, 64))
            mio.numpy_array_to_zarr(gt_path, gt, (64, 64, 64))
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
    err = comm.bcast(err, root=0)
    if err:
        if rank == 0:
            sys.stderr.write(f"mpicellpose: error: generating the demo volume failed: {err}\n")
        return 1
    t_gen = time.perf_counter() - t0
    holder = {}

    def make_config():
        blocksize = args.blocksize or (args.size // 2, args.size, args.size)
        return RunConfig(input=image_path, output=out_path, blocksize=blocksize, overlap=args.overlap,
                         backend="cellpose", model_kwargs={"pretrained_model": "demo"},
                         eval_kwargs={"diameter": 16.0}, normalize=args.normalize, stitch=args.stitch,
                         overwrite=True, restart=True, device=args.device, threads=args.threads)

    def runner(cfg, comm):
        from .driver import run

        holder["result"] = run(cfg, comm)
        holder["cfg"] = cfg
        return holder["result"]

    code = run_and_report(make_config, args, runner)
    if code != 0 or rank != 0:
        return code
    res, cfg = holder["result"], holder["cfg"]
    import zarr

    from .metrics import match_objects
    from .preview import write_preview

    t = time.perf_counter()
    pred = res.labels[...]
    gt = zarr.open(gt_path, mode="r")[...]
    bs = tuple(zarr.open(out_path, mode="r").chunks)
    scores = match_objects(pred, gt, 0.5)
    seams = seam_report(pred, gt, bs)
    preview = None
    try:
        img = zarr.open(image_path, mode="r")
        preview = write_preview(res.labels, os.path.join(args.dir, "preview.png"), img, bs,
                                title=f"mpicellpose demo: {scores['n_pred']} objects, F1 {scores['f1']:.3f}")
    except Exception as exc:  # matplotlib missing: the run itself is still valid
        log.warning("no preview: %s", exc)
    t_score = time.perf_counter() - t
    timings = dict(res.timings)
    nvox = float(np.prod(pred.shape))
    report = {
        "ranks": comm.Get_size(), "shape": list(pred.shape), "blocksize": list(bs),
        "f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
        "n_pred": scores["n_pred"], "n_gt": scores["n_gt"], "mean_matched_iou": scores["mean_matched_iou"],
        "seams": seams, "timings": timings, "generate_s": round(t_gen, 2), "score_s": round(t_score, 2),
        "seconds_per_megavoxel": {
            "network": round(timings.get("segment", 0.0) / (nvox / 1e6), 3),
            "pipeline": round(timings.get("total", 0.0) / (nvox / 1e6), 3),
        },
        "normalization": res.stats.get("normalization"),
        "outputs": {"labels": out_path, "table": res.table_path, "preview": preview},
    }
    lines = [
        f"mpicellpose demo: {pred.shape[0]}x{pred.shape[1]}x{pred.shape[2]} synthetic nuclei, blocks {bs}, "
        f"{comm.Get_size()} rank(s)",
        f"  objects: {scores['n_pred']} found, {scores['n_gt']} true; F1 (IoU 0.5) = {scores['f1']:.3f} "
        f"(precision {scores['precision']:.3f}, recall {scores['recall']:.3f}, mean IoU {scores['mean_matched_iou']:.3f})",
        f"  cut by block faces: {seams['cut']} objects, {seams['rejoined']} rejoined correctly; "
        f"seam splits {seams['seam_splits']}, seam merges {seams['seam_merges']}, "
        f"seam fragments {seams['seam_fragments']}",
        "  time per phase: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
        f"  seconds per megavoxel: network {report['seconds_per_megavoxel']['network']}, "
        f"whole pipeline {report['seconds_per_megavoxel']['pipeline']}",
        f"  outputs: {out_path}, {res.table_path}" + (f", {preview}" if preview else ""),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0
