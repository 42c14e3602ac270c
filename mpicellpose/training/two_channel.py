"""Train the small two-channel (cytoplasm + nucleus) Cellpose 3 model shipped as
``models/demo_cyto2ch_v1``.

Run as a script (Cellpose 3)::

    python -m mpicellpose.training.two_channel --out DIR [--steps 300] [--seed 0]

**What it is.** A Cellpose 3 ``CPnet`` (the network of ``cyto3``: 2 input channels, Cellpose's
``channels=[cytoplasm, nucleus]``), but 4x narrower (``nbase`` :data:`NBASE`: 0.42M
parameters, ~0.9 MB in float16, against 6.6M) and without the style vector (:data:`STYLE_ON`),
trained from seeded random weights on synthetic
cells with a cytoplasm stain and a nuclear stain (:func:`mpicellpose.synthetic.cells.make_cells`)
with Cellpose's own ``cellpose.train.train_seg(channels=[1, 2])``.  It exists so that the
two-channel path (``--channel-axis``/``--channel C,N``, per-channel normalisation) is tested
with a real network that uses both channels, offline and in seconds.  It is not a model for
real data.  The one-channel demo model cannot stand in: trained with an empty second channel,
it finds nothing once that channel holds a nuclear stain.

**How it loads.** ``CellposeModel`` always builds the full-width ``CPnet``, so
:func:`mpicellpose.cellpose.shipped.load_small` builds a ``CellposeModel`` without weights and puts the narrow network,
loaded from the file, in its place (``--model demo_cyto2ch`` does this through
``resolve_model()['loader']``).  A plain ``CellposeModel(pretrained_model=PATH)`` refuses the
file (``size mismatch``).

Only numpy is imported at module level; torch and cellpose inside the functions.
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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..cellpose.shipped import CYTO2CH_MODEL_NAME as MODEL_NAME
from ..cellpose.shipped import CYTO2CH_SELECT_NAME as SELECT_NAME
from ..cellpose.shipped import NBASE, STYLE_ON, build_narrow_cpnet, demo_cyto2ch_path, load_small
from ..synthetic.cells import CELL_DIAMETER, make_cells
from ..synthetic.labels import split_disconnected
from ..synthetic.metrics import match_objects
from ..volumes.storage import plain_json, sha256_file

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 300
DEFAULT_LR = 0.01
DEFAULT_BATCH = 8
DEFAULT_CROP = 96
WEIGHT_DECAY = 1e-5
SLICE_STRIDE = 12
#: Training volumes (``seed`` offset by the run's seed) and 2D images.
TRAIN_VOLUMES: Tuple[Dict, ...] = (
    dict(shape=(72, 96, 96), seed=31),
    dict(shape=(72, 96, 96), seed=32, density=0.45, touching_fraction=0.7, nuclear_scale=2.0, noise=0.06),
)
TRAIN_2D: Tuple[Dict, ...] = tuple(dict(shape=(128, 128), seed=40 + i, nuclear_scale=(3.0, 10.0)[i % 2])
                                   for i in range(8))
VAL_2D = dict(shape=(192, 192), seed=9201)
VAL_3D = dict(shape=(48, 96, 96), seed=9202)


def save_net(net, path, nbase: Sequence[int] = NBASE, diameter: float = CELL_DIAMETER) -> None:
    """Save the state dict in float16, with ``nbase`` and the diameter."""
    import torch

    sd = {k: (v.detach().half() if v.is_floating_point() else v.detach()) for k, v in net.state_dict().items()}
    sd["diam_mean"] = torch.full((1,), float(diameter))
    sd["diam_labels"] = torch.full((1,), float(diameter))
    sd["nbase"] = torch.tensor(list(nbase))
    sd["style_on"] = torch.tensor(int(bool(getattr(net, "style_on", True))))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, os.fspath(path))


def training_set(seed: int = 0, stride: int = SLICE_STRIDE) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(2, Y, X) float32 images and their cell labels: slices of 3D volumes along all axes + 2D images."""
    images, labels = [], []
    for spec in TRAIN_VOLUMES:
        img, cells, _ = make_cells(**dict(spec, seed=spec["seed"] + seed))
        for axis in range(3):
            for pos in range(stride // 2, cells.shape[axis], stride):
                images.append(np.take(img, pos, axis=axis + 1).astype(np.float32))
                labels.append(split_disconnected(np.take(cells, pos, axis=axis)))
    for spec in TRAIN_2D:
        img, cells, _ = make_cells(**dict(spec, seed=spec["seed"] + seed))
        images.append(img.astype(np.float32))
        labels.append(cells)
    return images, labels


def segment(model, image: np.ndarray, **eval_kwargs) -> np.ndarray:
    """Labels of a (2, [Z,] Y, X) image (channel 0 cytoplasm, 1 nucleus), per-image percentiles."""
    kw = dict(channels=[1, 2], channel_axis=0, diameter=CELL_DIAMETER)
    if image.ndim == 4:
        kw.update(z_axis=1, do_3D=True)
    kw.update(eval_kwargs)
    return np.asarray(model.eval(image, **kw)[0])


def validate(model) -> Dict:
    """Object F1 (IoU 0.5) on held-out 2D and 3D images, and with the channels given the wrong way round."""
    out = {}
    for key, spec in (("2d", VAL_2D), ("3d", VAL_3D)):
        img, cells, _ = make_cells(**spec)
        t0 = time.perf_counter()
        pred = segment(model, img)
        out[key] = {"shape": list(spec["shape"]), "seed": spec["seed"], "n_true": int(cells.max()),
                    "n_pred": int(pred.max()), "f1": round(float(match_objects(pred, cells, 0.5)["f1"]), 3),
                    "eval_s": round(time.perf_counter() - t0, 2)}
        if key == "2d":
            swapped = segment(model, img[::-1].copy())
            out["2d_channels_swapped_f1"] = round(float(match_objects(swapped, cells, 0.5)["f1"]), 3)
    return out


def train_demo_cyto2ch(out_dir, *, steps: int = DEFAULT_STEPS, seed: int = 0, lr: float = DEFAULT_LR,
                       batch_size: int = DEFAULT_BATCH, crop: int = DEFAULT_CROP, threads: int = 2) -> Dict:
    """Train, save (float16) and validate; returns the provenance written to ``<out>/<name>.json``."""
    import torch
    from cellpose import train
    from cellpose.version import version as cp_version

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(threads))
    np.random.seed(seed)
    t0 = time.perf_counter()
    images, labels = training_set(seed)
    t_data = time.perf_counter() - t0
    net = build_narrow_cpnet(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        t1, c1 = time.perf_counter(), time.process_time()
        fp32, losses, _ = train.train_seg(
            net, train_data=images, train_labels=labels, channels=[1, 2], normalize=True,
            batch_size=batch_size, nimg_per_epoch=batch_size, n_epochs=int(steps), learning_rate=lr,
            weight_decay=WEIGHT_DECAY, rescale=False, scale_range=0.4, bsize=crop, min_train_masks=1,
            save_path=tmp, save_every=10 ** 9, model_name=MODEL_NAME)
        t_train, c_train = time.perf_counter() - t1, time.process_time() - c1
        net.load_state_dict(torch.load(fp32, map_location="cpu", weights_only=True))
    weights = out_dir / MODEL_NAME
    save_net(net, weights)
    val = validate(load_small(weights))
    info = {
        "name": MODEL_NAME, "select_with": f"--model {SELECT_NAME} (Cellpose 3)",
        "format": "Cellpose 3 CPnet state dict, float16, plus 'nbase'; load with "
                  "mpicellpose.cellpose.shipped.load_small",
        "nbase": list(NBASE), "style_on": STYLE_ON, "parameters": int(sum(p.numel() for p in net.parameters())),
        "diam_mean": CELL_DIAMETER, "channels": "[cytoplasm, nucleus] = Cellpose 3 channels=[1, 2]",
        "sha256": sha256_file(weights), "size_bytes": weights.stat().st_size,
        "training": {
            "command": f"python -m mpicellpose.training.two_channel --steps {steps} --seed {seed} --lr {lr}",
            "seed": seed, "steps": int(steps), "batch_size": batch_size, "learning_rate": lr,
            "weight_decay": WEIGHT_DECAY, "crop_px": crop, "scale_range": 0.4, "rescale": False,
            "n_images": len(images), "volumes": plain_json(list(TRAIN_VOLUMES)), "images_2d": plain_json(list(TRAIN_2D)),
            "slice_stride": SLICE_STRIDE, "loss_first": float(np.mean(losses[:10])),
            "loss_last": float(np.mean(losses[-10:])), "data_s": round(t_data, 1), "train_s": round(t_train, 1),
            "train_cpu_s": round(c_train, 1), "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "torch_threads": int(threads),
        },
        "validation": val,
        "versions": {"cellpose": cp_version, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    (out_dir / f"{MODEL_NAME}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpicellpose.training.two_channel", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(demo_cyto2ch_path().parent), help="output folder (default: the package's)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = train_demo_cyto2ch(args.out, steps=args.steps, seed=args.seed, lr=args.lr, threads=args.threads)
    print(json.dumps({"validation": info["validation"], "train_s": info["training"]["train_s"],
                      "loss": [info["training"]["loss_first"], info["training"]["loss_last"]]}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
