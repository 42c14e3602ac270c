"""The network's precision and batch size: speed, and how far the labels move.

Two measurements with the shipped Cellpose 3 model (or ``--model``), one process:

1. **network throughput**: Cellpose's own forward call (``core._forward``, what ``eval`` runs per
   batch of tiles) on ``--plane``-sized tiles, for every batch size in ``--batches`` and every
   precision (float32 = Cellpose's path untouched; bfloat16/float16 = ``mpicellpose.cellpose.precision``'s
   autocast wrapper), in mega-pixels of network input per second;
2. **labels**: whole-volume ``eval`` of a synthetic volume (``--shape``) in each precision, object F1
   (IoU 0.5) and mean matched IoU against float32, and F1 against the synthetic truth.

    .venv/bin/python benchmarks/precision.py [--device cpu|cuda] [--threads 1] [--json OUT]

Prints one JSON document (and writes it with ``--json``).  Throughput is the fastest of ``--repeats``
calls (other processes only add time); run it on a quiet machine all the same.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _load(model_path, precision, device):
    from mpicellpose.cellpose.segmenter import CellposeSegmenter

    return CellposeSegmenter({"pretrained_model": model_path}, {}, device=device, precision=precision, ndim=3)


def throughput(seg, plane, batches, repeats, device):
    import torch
    from cellpose import core

    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        x = rng.normal(size=(b, 2, plane, plane)).astype(np.float32)
        core._forward(seg.model.net, x)  # warm-up (oneDNN / cuDNN picks its kernels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            core._forward(seg.model.net, x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = min(times)  # the least disturbed call: other processes only ever add time
        out[str(b)] = {"s_per_batch_min": round(dt, 4), "s_per_batch_median": round(float(np.median(times)), 4),
                       "Mpx_per_s": round(b * plane * plane / dt / 1e6, 3)}
    return out


def labels(seg, img):
    t0 = time.perf_counter()
    masks = seg.segment(img)
    return np.asarray(masks), time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plane", type=int, default=112, help="tile edge in pixels (112: an 80-voxel block + halo, "
                                                          "padded as Cellpose pads; 224: Cellpose 3's full tile)")
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--precisions", default=None, help="default: float32,bfloat16 (+float16 on a GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per batch size (the fastest is reported)")
    p.add_argument("--shape", default="96,96,96", help="volume for the label comparison (Z,Y,X)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    precisions = (a.precisions.split(",") if a.precisions else
                  ["float32", "bfloat16"] + (["float16"] if a.device.startswith("cuda") else []))
    batches = [int(b) for b in a.batches.split(",")]
    from mpicellpose.synthetic.metrics import match_objects
    from mpicellpose.synthetic.nuclei import make_nuclei

    shape = tuple(int(s) for s in a.shape.split(","))
    img, truth = make_nuclei(shape, seed=1, density=0.3)
    res = {"command": "python benchmarks/precision.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads, "device": a.device,
                       "torch": torch.__version__, "loadavg": list(os.getloadavg())},
           "plane": a.plane, "throughput": {}, "labels": {}}
    ref = None
    for prec in precisions:
        seg = _load(a.model, prec, a.device)
        res["throughput"][prec] = throughput(seg, a.plane, batches, a.repeats, a.device)
        masks, dt = labels(seg, img)
        row = {"eval_s": round(dt, 2), "objects": int(masks.max()),
               "f1_vs_truth": round(match_objects(masks, truth, 0.5)["f1"], 4)}
        if ref is None:
            ref = masks
        else:
            m = match_objects(masks, ref, 0.5)
            row.update({"f1_vs_float32": round(m["f1"], 4), "mean_iou_vs_float32": round(m["mean_matched_iou"], 4),
                        "voxels_differing_from_float32": int(((masks > 0) != (ref > 0)).sum())})
        res["labels"][prec] = row
        print(json.dumps({prec: {"throughput": res["throughput"][prec], "labels": row}}), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
