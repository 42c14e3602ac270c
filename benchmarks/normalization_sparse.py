"""Global vs per-block normalisation where part of the volume holds no nuclei (background only).

Per-block normalisation stretches each block's own percentiles to [0, 1]; a block with only
background then shows its noise at full contrast.  Run:  python benchmarks/normalization_sparse.py
"""
import json
import sys
import tempfile
import time

import numpy as np

from mpicellpose import distributed_eval
from mpicellpose.synthetic.metrics import match_objects
from mpicellpose.synthetic.nuclei import make_nuclei


def main(out_json=None):
    img, gt = make_nuclei((64, 96, 96), seed=5)
    empty_z = slice(32, 64)
    rng = np.random.default_rng(1)
    bg = np.median(img[gt == 0])
    noise = rng.normal(bg, max(1.0, img[gt == 0].std()), size=img[empty_z].shape)
    img[empty_z] = np.clip(noise, 0, None).astype(img.dtype)
    gt = gt.copy()
    gt[empty_z] = 0
    from mpicellpose.synthetic.labels import split_disconnected

    gt = split_disconnected(gt)
    results = {}
    for norm in ("global", "block"):
        d = tempfile.mkdtemp()
        t = time.time()
        lab, _ = distributed_eval(img, (32, 96, 96), f"{d}/l.zarr", model_kwargs={"pretrained_model": "demo"},
                                  eval_kwargs={"diameter": 16}, overlap=8, normalize=norm, threads=2)
        pred = lab[...]
        s = match_objects(pred, gt, 0.5)
        results[norm] = {"f1": round(s["f1"], 4), "fp": s["fp"], "fn": s["fn"], "n_pred": s["n_pred"],
                         "n_gt": s["n_gt"], "objects_in_empty_half": int(len(np.unique(pred[empty_z])) - 1),
                         "seconds": round(time.time() - t, 1)}
        print(norm, results[norm], flush=True)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
