"""``mpicellpose demo``: the main job end to end on synthetic nuclei, with the shipped model.

Generates a 3D nuclei volume with ground truth (rank 0), writes it as zarr, segments it with
the shipped ``demo`` Cellpose model on however many ranks were launched, writes labels, the
object table and a PNG preview, and reports object F1 against the ground truth, how many
objects cut by block faces were rejoined, and the time per phase.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from ..grid import geometry as geo

log = logging.getLogger(__name__)


def block_ids(shape, blocksize) -> np.ndarray:
    """Linear block index of every voxel (C order), int64."""
    out = np.empty(tuple(int(s) for s in shape), np.int64)
    for linear, box in enumerate(geo.chunk_boxes(shape, blocksize)):
        out[geo.box_slices(box)] = linear
    return out


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

    from ..synthetic.metrics import contingency

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


def default_dir() -> str:
    """Where the demo writes without ``--out``: ``$XDG_CACHE_HOME/mpicellpose/demo``
    (``~/.cache/mpicellpose/demo`` when the variable is unset or not absolute).

    A per-user cache folder, not the current directory: the demo's files (a few MB) then
    never land inside a source checkout or whatever folder the command was started from, and
    a second run replaces the first one's files instead of leaving copies around.

    Examples
    --------
    >>> import os
    >>> default_dir().endswith(os.path.join("mpicellpose", "demo"))
    True
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore relative paths
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpicellpose", "demo")


def demo_paths(out_dir) -> tuple:
    """(image, ground truth, labels) zarr paths of the demo in ``out_dir``."""
    return (os.path.join(out_dir, "image.zarr"), os.path.join(out_dir, "ground_truth.zarr"),
            os.path.join(out_dir, "labels.zarr"))


def generate(out_dir, size: int, seed: int = 1, gradient: bool = False) -> None:
    """Write the synthetic nuclei volume (``size`` per axis) and its ground truth to ``out_dir``
    (one rank); ``gradient`` adds a 1:4 brightness gradient along z."""
    from ..volumes import storage
    from ..synthetic.nuclei import make_nuclei

    image_path, gt_path, _ = demo_paths(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    gradient = (0, 0.25, 1.0) if gradient else None
    img, gt = make_nuclei((size,) * 3, seed=seed, gradient=gradient)
    storage.numpy_array_to_zarr(image_path, img, (64, 64, 64))
    storage.numpy_array_to_zarr(gt_path, gt, (64, 64, 64))


def demo_config(out_dir, size: int, blocksize=None, overlap="16", normalize="global", stitch="iou", device=None,
                threads=None):
    """The RunConfig of the demo: the shipped model on the volume of :func:`generate`, two blocks along z
    unless ``blocksize`` is given."""
    from ..config import RunConfig

    image_path, _, out_path = demo_paths(out_dir)
    blocksize = blocksize or (size // 2, size, size)
    return RunConfig(input=image_path, output=out_path, blocksize=blocksize, overlap=overlap,
                     backend="cellpose", model_kwargs={"pretrained_model": "demo"},
                     eval_kwargs={"diameter": 16.0}, normalize=normalize, stitch=stitch,
                     overwrite=True, restart=True, device=device, threads=threads)


def evaluate(res, out_dir, n_ranks: int, generate_s: float) -> dict:
    """Score the demo run ``res`` (a RunResult) against the ground truth, write the PNG preview
    and return the report (F1, seams, time per phase, outputs)."""
    import zarr

    from ..synthetic.metrics import match_objects
    from .preview import write_preview

    image_path, gt_path, out_path = demo_paths(out_dir)
    t = time.perf_counter()
    pred = res.labels[...]
    gt = zarr.open(gt_path, mode="r")[...]
    bs = tuple(zarr.open(out_path, mode="r").chunks)
    scores = match_objects(pred, gt, 0.5)
    seams = seam_report(pred, gt, bs)
    preview = None
    try:
        img = zarr.open(image_path, mode="r")
        preview = write_preview(res.labels, os.path.join(out_dir, "preview.png"), img, bs,
                                title=f"mpicellpose demo: synthetic nuclei, {scores['n_gt']} true objects, "
                                      f"F1 {scores['f1']:.3f}", n_objects=scores["n_pred"])
    except Exception as exc:  # matplotlib missing: the run itself is still valid
        log.warning("no preview: %s", exc)
    t_score = time.perf_counter() - t
    timings = dict(res.timings)
    nvox = float(np.prod(pred.shape))
    return {
        "ranks": n_ranks, "shape": list(pred.shape), "blocksize": list(bs),
        "f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
        "n_pred": scores["n_pred"], "n_gt": scores["n_gt"], "mean_matched_iou": scores["mean_matched_iou"],
        "seams": seams, "timings": timings, "generate_s": round(generate_s, 2), "score_s": round(t_score, 2),
        "seconds_per_megavoxel": per_megavoxel(timings, nvox),
        "normalization": res.stats.get("normalization"),
        "outputs": {"labels": out_path, "table": res.table_path, "preview": preview},
    }


def per_megavoxel(timings: dict, nvox: float) -> dict:
    """Seconds per megavoxel of output: under ``--pipeline flows`` the network is the flow step and the
    masks the segment phase; under ``--pipeline blocks`` the segment phase does both."""
    mvox = nvox / 1e6
    if "flows" in timings:
        parts = {"network": timings["flows"], "masks": timings.get("segment", 0.0)}
    else:
        parts = {"network_and_masks": timings.get("segment", 0.0)}
    parts["whole_pipeline"] = timings.get("total", 0.0)
    return {k: round(v / mvox, 3) for k, v in parts.items()}


def format_summary(report: dict, out_dir) -> str:
    """The demo's report (:func:`evaluate`) as the lines it prints."""
    shape, bs, seams, timings = report["shape"], tuple(report["blocksize"]), report["seams"], report["timings"]
    outputs = report["outputs"]
    preview = outputs["preview"]
    lines = [
        f"mpicellpose demo: {shape[0]}x{shape[1]}x{shape[2]} synthetic nuclei, blocks {bs}, "
        f"{report['ranks']} rank(s)",
        f"  objects: {report['n_pred']} found, {report['n_gt']} true; F1 (IoU 0.5) = {report['f1']:.3f} "
        f"(precision {report['precision']:.3f}, recall {report['recall']:.3f}, "
        f"mean IoU {report['mean_matched_iou']:.3f})",
        f"  cut by block faces: {seams['cut']} objects, {seams['rejoined']} rejoined correctly; "
        f"seam splits {seams['seam_splits']}, seam merges {seams['seam_merges']}, "
        f"seam fragments {seams['seam_fragments']}",
        "  time per phase: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
        "  seconds per megavoxel: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                 for k, v in report["seconds_per_megavoxel"].items()),
        f"  outputs: {outputs['labels']}, {outputs['table']}" + (f", {preview}" if preview else ""),
        f"  all demo files are in {out_dir}",
    ]
    return "\n".join(lines) + "\n"
