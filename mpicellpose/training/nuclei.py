"""Train the small demo Cellpose model shipped with mpicellpose.

Run as a script::

    python -m mpicellpose.training [--out DIR] [--steps N] [--seed S]

It generates synthetic 3D nuclei volumes (:func:`mpicellpose.synthetic.nuclei.make_nuclei`),
cuts 2D training images out of them along all three axes (Cellpose's 3D mode
runs the 2D network on YX, ZY and ZX planes, so all three orientations must
look familiar), trains a standard Cellpose 3 CPnet from random weights on the
CPU with :func:`cellpose.train.train_seg`, and writes

- ``<out>/demo_nuclei_v1``: the network weights (a torch state dict, stored in
  half precision to halve the file size; ``CellposeModel`` converts them back
  to float32 when loading), and
- ``<out>/demo_nuclei_v1.json``: provenance (generator settings, seeds,
  steps, learning rate, timings, versions, sha256 of the weights) and
  validation scores on held-out synthetic 2D and 3D images, plus 3D
  evaluation times per volume size.

The model works at native scale: training nuclei have a mean diameter of 16
voxels and the network's ``diam_mean`` is 16, so evaluating with
``diameter=16`` means no resizing at all.

Only ``cellpose``/``torch`` (the ``cellpose`` extra) are needed; they are
imported inside the functions.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..cellpose.shipped import DEMO_MODEL_FILE as MODEL_NAME
from ..cellpose.shipped import MODELS_DIR
from ..synthetic.metrics import match_objects
from ..synthetic.nuclei import make_nuclei
from ..volumes.storage import plain_json, sha256_file
from .nuclei_data import MEAN_DIAMETER, SLICE_STRIDE, TRAIN_VOLUMES, training_slices

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 160
DEFAULT_BATCH = 8
DEFAULT_LR = 0.005
DEFAULT_CROP = 128

#: Held-out data (seeds far from the training seeds).
VAL_2D = dict(shape=(256, 256), seed=9001)
VAL_3D = dict(shape=(128, 128, 128), seed=9002)
#: As the demo's ``--gradient`` volume: brightness falling to 1/4 along X.
VAL_3D_GRADIENT = dict(shape=(128, 128, 128), seed=9003, gradient=(2, 0.25, 1.0))
TIMING_SIZES = (96, 128, 160)
TIMING_SEED = 9100


def save_half_precision(src: Path, dst: Path, diam_labels: Optional[float] = None) -> None:
    """Re-save a Cellpose state dict with floating tensors in float16.

    Parameters
    ----------
    src, dst : pathlib.Path
        Input (float32 state dict saved by Cellpose) and output file.
    diam_labels : float, optional
        Value written into the ``diam_labels`` entry (the object size
        Cellpose assumes when ``eval`` gets neither ``diameter`` nor
        ``rescale``).
    """
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    if diam_labels is not None and "diam_labels" in state:
        state["diam_labels"] = torch.full_like(state["diam_labels"], float(diam_labels))
    half = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in state.items()}
    torch.save(half, dst)


def load_model(path, threads: Optional[int] = None):
    """Load Cellpose weights from a file path on the CPU.

    Cellpose 3 silently downloads ``cyto3`` when a given path does not
    exist, so the path is checked first.

    Parameters
    ----------
    path : str or pathlib.Path
        Weights file.
    threads : int, optional
        If given, ``torch.set_num_threads(threads)``.

    Returns
    -------
    cellpose.models.CellposeModel
    """
    import torch
    from cellpose import models

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Cellpose weights not found: {path}")
    if threads:
        torch.set_num_threads(int(threads))
    return models.CellposeModel(gpu=False, pretrained_model=str(path))


def segment(model, image: np.ndarray, diameter: float = MEAN_DIAMETER) -> np.ndarray:
    """Segment a 2D image or a 3D volume (``do_3D``) with a grayscale model.

    Parameters
    ----------
    model : cellpose.models.CellposeModel
        Loaded model.
    image : numpy.ndarray
        2D ``(Y, X)`` or 3D ``(Z, Y, X)`` single-channel image.
    diameter : float, optional
        Object diameter; the model's ``diam_mean`` gives no resizing.

    Returns
    -------
    numpy.ndarray
        Label image of the input's shape.
    """
    if image.ndim == 3:
        masks = model.eval(image, channels=[0, 0], z_axis=0, do_3D=True,
                           diameter=diameter)[0]
    else:
        masks = model.eval(image, channels=[0, 0], diameter=diameter)[0]
    return np.asarray(masks)


def validate(model, *, timing_sizes: Sequence[int] = TIMING_SIZES) -> Dict:
    """Scores on held-out synthetic images and 3D timings per volume size.

    Parameters
    ----------
    model : cellpose.models.CellposeModel
        Loaded model.
    timing_sizes : sequence of int
        Edge lengths of cubic volumes to time (each also scored).

    Returns
    -------
    dict
        ``val_2d`` and ``val_3d`` (generator settings and the
        :func:`~mpicellpose.synthetic.metrics.match_objects` result at IoU 0.5 with
        its time) and ``eval_3d_timing`` (one entry per size).
    """
    out: Dict = {}
    # warm-up: numba compiles Cellpose's dynamics on first use
    warm, _ = make_nuclei((32, 32, 32), seed=1)
    t0 = time.perf_counter()
    segment(model, warm)
    out["warmup_s"] = round(time.perf_counter() - t0, 2)

    for key, spec in (("val_2d", VAL_2D), ("val_3d", VAL_3D),
                      ("val_3d_gradient", VAL_3D_GRADIENT)):
        img, gt = make_nuclei(mean_diameter=MEAN_DIAMETER, **spec)
        t0 = time.perf_counter()
        pred = segment(model, img)
        dt = time.perf_counter() - t0
        res = match_objects(pred, gt, 0.5)
        res["eval_s"] = round(dt, 2)
        out[key] = {"generator": plain_json(spec), "scores": res}
        logger.info("%s %s: F1 %.4f (tp %d fp %d fn %d) in %.1f s", key,
                    spec["shape"], res["f1"], res["tp"], res["fp"], res["fn"], dt)

    out["eval_3d_timing"] = time_3d_eval(model, timing_sizes)
    return out


def time_3d_eval(model, sizes: Sequence[int] = TIMING_SIZES) -> List[Dict]:
    """Time (and score) ``do_3D`` evaluation of cubic synthetic volumes.

    Parameters
    ----------
    model : cellpose.models.CellposeModel
        Loaded model (warm: run once before, numba compiles on first use).
    sizes : sequence of int
        Edge lengths of the volumes.

    Returns
    -------
    list of dict
        Per size: ``shape``, generator ``seed``, ``seconds`` (the whole
        ``model.eval`` call: network on YX/ZY/ZX planes and 3D mask
        computation), the 1-minute ``load_average`` after the call, ``f1``,
        ``n_gt`` and ``n_pred``.
    """
    timings = []
    for n in sizes:
        spec = dict(shape=(n, n, n), seed=TIMING_SEED + n)
        img, gt = make_nuclei(mean_diameter=MEAN_DIAMETER, **spec)
        t0 = time.perf_counter()
        pred = segment(model, img)
        dt = time.perf_counter() - t0
        res = match_objects(pred, gt, 0.5)
        timings.append({"shape": [n, n, n], "seed": spec["seed"], "seconds": round(dt, 2),
                        "load_average": round(os.getloadavg()[0], 2),
                        "f1": res["f1"], "n_gt": res["n_gt"], "n_pred": res["n_pred"]})
        logger.info("3D eval %d^3: %.1f s, F1 %.4f", n, dt, res["f1"])
    return timings


def train_demo_model(out_dir, *, steps: int = DEFAULT_STEPS, seed: int = 0,
                     batch_size: int = DEFAULT_BATCH, learning_rate: float = DEFAULT_LR,
                     crop: int = DEFAULT_CROP, threads: int = 2,
                     timing_sizes: Sequence[int] = TIMING_SIZES,
                     name: str = MODEL_NAME) -> Dict:
    """Train, save (fp16) and validate the demo nuclei model.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Folder receiving ``<name>`` (weights) and ``<name>.json``.
    steps : int, optional
        Optimiser steps (one batch each).
    seed : int, optional
        Seed of torch/numpy and offset of the training-volume seeds.
    batch_size : int, optional
        Images per step.
    learning_rate : float, optional
        Peak AdamW learning rate (Cellpose's schedule: 10-step warm-up,
        halvings over the last steps).
    crop : int, optional
        Training patch size in pixels.
    threads : int, optional
        ``torch.set_num_threads``.
    timing_sizes : sequence of int, optional
        3D volume sizes timed and scored after training.
    name : str, optional
        File name of the weights.

    Returns
    -------
    dict
        The provenance record also written to ``<name>.json``.
    """
    import torch
    from cellpose import models
    from cellpose.version import version as cp_version

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    np.random.seed(seed)

    t0 = time.perf_counter()
    images, labels = training_slices(TRAIN_VOLUMES, seed=seed)
    t_data = time.perf_counter() - t0
    logger.info("%d training slices generated in %.1f s", len(images), t_data)

    model = models.CellposeModel(gpu=False, pretrained_model=False,
                                 diam_mean=MEAN_DIAMETER)
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        c1 = time.process_time()
        fp32_path, train_losses = _train_seg(model.net, images, labels, steps, batch_size, learning_rate, crop,
                                             tmp, name)
        t_train = time.perf_counter() - t1
        c_train = time.process_time() - c1
        logger.info("trained %d steps in %.1f s", steps, t_train)
        weights = out_dir / name
        save_half_precision(Path(fp32_path), weights, diam_labels=MEAN_DIAMETER)

    loaded = load_model(weights, threads=threads)
    val = validate(loaded, timing_sizes=timing_sizes)

    info = {
        "name": name,
        "file": weights.name,
        "format": "Cellpose 3 CPnet state dict (torch.save), float16 tensors",
        "load_with": "cellpose.models.CellposeModel(gpu=False, pretrained_model=<path>)",
        "eval_with": "model.eval(img, channels=[0, 0], diameter=16[, do_3D=True, z_axis=0])",
        "diam_mean": MEAN_DIAMETER,
        "diam_labels_note": ("diam_labels set to the 3D mean nucleus diameter (16): training "
                             "labels are 2D cross-sections, whose mean diameter is smaller, "
                             "and eval without diameter should not resize"),
        "sha256": sha256_file(weights),
        "size_bytes": weights.stat().st_size,
        "training": _training_record(steps, seed, batch_size, learning_rate, crop, threads, len(images),
                                     train_losses, (t_data, t_train, c_train)),
        "validation": val,
        "versions": {
            "cellpose": cp_version, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
        },
        "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
    }
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _train_seg(net, images, labels, steps, batch_size, learning_rate, crop, save_path, name):
    """(float32 weights file, losses): Cellpose's ``train_seg`` with the demo model's settings;
    one "epoch" is one batch, so ``n_epochs`` counts optimiser steps."""
    from cellpose import train

    fp32_path, train_losses, _ = train.train_seg(
        net, train_data=images, train_labels=labels, channels=[0, 0],
        normalize=True, batch_size=batch_size, nimg_per_epoch=batch_size,
        n_epochs=int(steps), learning_rate=learning_rate, weight_decay=1e-5,
        rescale=False, scale_range=0.4, bsize=crop, min_train_masks=1,
        save_path=save_path, save_every=10 ** 9, model_name=name)
    return fp32_path, train_losses


def _training_record(steps, seed, batch_size, learning_rate, crop, threads, n_slices, train_losses,
                     seconds) -> Dict:
    """The ``training`` entry of the provenance: the settings, the data, the final loss and the
    ``seconds`` (data, training, training CPU) of a :func:`train_demo_model` run."""
    t_data, t_train, c_train = seconds
    return {
        "command": f"python -m mpicellpose.training --steps {steps} --seed {seed}",
        "seed": seed, "steps": int(steps), "batch_size": batch_size,
        "n_epochs_cellpose": int(steps), "nimg_per_epoch": batch_size,
        "optimizer": "AdamW (cellpose.train.train_seg default)",
        "learning_rate": learning_rate, "weight_decay": 1e-5,
        "crop_px": crop, "scale_range": 0.4, "rescale": False,
        "n_slices": n_slices, "slice_stride": SLICE_STRIDE,
        "slice_axes": [0, 1, 2],
        "volumes": plain_json([dict(v, seed=v["seed"] + seed) for v in TRAIN_VOLUMES]),
        "mean_diameter": MEAN_DIAMETER,
        "final_train_loss": float(np.mean(train_losses[-10:])),
        "data_s": round(t_data, 1), "train_s": round(t_train, 1),
        "train_cpu_s": round(c_train, 1),
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "torch_threads": int(threads),
    }


def retime(out_dir, sizes: Sequence[int] = TIMING_SIZES, *, threads: int = 2,
           name: str = MODEL_NAME) -> Dict:
    """Time 3D evaluation of saved weights again and record it in their JSON.

    Timings taken while other processes load the machine are inflated; this
    re-measures them (e.g. on a quiet machine) without retraining. The entry
    is appended to the list ``eval_3d_retimed`` of ``<out_dir>/<name>.json``.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Folder holding ``<name>`` and ``<name>.json``.
    sizes : sequence of int, optional
        Cube edge lengths.
    threads : int, optional
        ``torch.set_num_threads``.
    name : str, optional
        Weights file name.

    Returns
    -------
    dict
        The appended entry (``timings``, ``torch_threads``, ``cpu_count``,
        ``load_average_before``, ``date``).
    """
    out_dir = Path(out_dir)
    model = load_model(out_dir / name, threads=threads)
    before = [round(v, 2) for v in os.getloadavg()]
    warm, _ = make_nuclei((32, 32, 32), seed=1)
    segment(model, warm)
    entry = {"timings": time_3d_eval(model, sizes), "torch_threads": int(threads),
             "cpu_count": os.cpu_count(), "load_average_before": before,
             "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta = out_dir / f"{name}.json"
    info = json.loads(meta.read_text())
    info.setdefault("eval_3d_retimed", []).append(entry)
    meta.write_text(json.dumps(info, indent=2) + "\n")
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m mpicellpose.training``)."""
    here = MODELS_DIR
    p = argparse.ArgumentParser(prog="python -m mpicellpose.training",
                                description="Train the demo nuclei Cellpose model on CPU.")
    p.add_argument("--out", default=str(here), help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--crop", type=int, default=DEFAULT_CROP, help="training patch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--timing-sizes", default=",".join(map(str, TIMING_SIZES)),
                   help="comma-separated cube sizes to time after training ('' for none)")
    p.add_argument("--name", default=MODEL_NAME)
    p.add_argument("--retime", action="store_true",
                   help="do not train: time 3D eval of the existing <out>/<name> weights again and "
                        "append the result to 'eval_3d_retimed' in <out>/<name>.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sizes = [int(s) for s in args.timing_sizes.split(",") if s.strip()]
    if args.retime:
        entry = retime(args.out, sizes, threads=args.threads, name=args.name)
        for t in entry["timings"]:
            print(f"3D eval {t['shape'][0]}^3: {t['seconds']} s, F1 {t['f1']:.4f}, "
                  f"load {t['load_average']}")
        return 0
    info = train_demo_model(args.out, steps=args.steps, seed=args.seed,
                            batch_size=args.batch_size, learning_rate=args.lr,
                            crop=args.crop, threads=args.threads, timing_sizes=sizes,
                            name=args.name)
    val = info["validation"]
    print(f"weights: {Path(args.out) / info['file']} ({info['size_bytes'] / 1e6:.1f} MB)")
    print(f"train: {info['training']['train_s']} s; "
          f"F1 2D {val['val_2d']['scores']['f1']:.4f}, 3D {val['val_3d']['scores']['f1']:.4f}")
    for t in val["eval_3d_timing"]:
        print(f"3D eval {t['shape'][0]}^3: {t['seconds']} s, F1 {t['f1']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
