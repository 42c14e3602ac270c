"""Whole-volume Cellpose in one process: the quality oracle and the no-overhead baseline.

Run with the project venv (cellpose 3.1.1.x)::

    .venv/bin/python benchmarks/whole_volume.py --input IMG.zarr --output LABELS.zarr \\
        --model PATH --diameter 16 --threads 2 [--json RESULT.json]

Loads the whole image into memory, builds ``CellposeModel(gpu=False, pretrained_model=PATH)``
once and calls ``model.eval(image, channels=[0, 0], z_axis=0, do_3D=True, diameter=D)`` on it
(Cellpose's own normalisation: 1st/99th percentile of the whole volume), with
``torch.set_num_threads(--threads)``.  Writes the labels (zarr format 2, chunks of
``--chunks``) and prints one JSON line: ``import_s``, ``read_s``, ``model_load_s``,
``eval_s`` (Cellpose itself), ``write_s``, ``wall_s`` (this process from start to the end of
the write), ``n_labels``, ``vm_hwm_bytes`` (peak RSS) and ``error`` (recorded, not raised).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

T0 = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _bench_util import vm_hwm  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--diameter", type=float, default=16.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = {"tool": "whole-volume", "input": a.input, "model": a.model, "diameter": a.diameter,
           "threads": a.threads, "error": None}
    try:
        if not os.path.isfile(a.model):
            raise FileNotFoundError(f"model file not found: {a.model}")  # cellpose would download cyto3
        t = time.perf_counter()
        import numpy as np
        import torch
        import zarr
        from cellpose import models
        from _zarrcompat import create_v2
        torch.set_num_threads(a.threads)
        res["import_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        img = np.asarray(zarr.open(a.input, mode="r")[...])
        res["read_s"] = round(time.perf_counter() - t, 3)
        res["shape"] = list(img.shape)
        t = time.perf_counter()
        model = models.CellposeModel(gpu=False, pretrained_model=a.model)
        res["model_load_s"] = round(time.perf_counter() - t, 3)
        inner = {"network_s": 0.0, "masks_s": 0.0}

        def timed(name, key):  # split eval into network and masks (instance attributes)
            orig = getattr(model, name)

            def f(*args, **kw):
                t0 = time.perf_counter()
                try:
                    return orig(*args, **kw)
                finally:
                    inner[key] += time.perf_counter() - t0
            setattr(model, name, f)
        timed("_run_net", "network_s")
        timed("_compute_masks", "masks_s")
        t = time.perf_counter()
        masks = model.eval(img, channels=[0, 0], z_axis=0, do_3D=True, diameter=a.diameter)[0]
        res["eval_s"] = round(time.perf_counter() - t, 3)
        res.update({k: round(v, 3) for k, v in inner.items()})
        t = time.perf_counter()
        masks = np.asarray(masks).astype(np.uint32)
        create_v2(a.output, masks.shape, (a.chunks,) * masks.ndim, np.uint32)[...] = masks
        res["write_s"] = round(time.perf_counter() - t, 3)
        res["n_labels"] = int(len(np.unique(masks)) - (1 if (masks == 0).any() else 0))
    except BaseException as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        res["traceback_tail"] = traceback.format_exc()[-3000:]
    res["wall_s"] = round(time.perf_counter() - T0, 3)
    res["vm_hwm_bytes"] = vm_hwm()
    text = json.dumps(res)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
