"""Train the tiny Cellpose 4 stand-in model shipped as ``models/demo_cp4_v1``.

Run as a script (needs Cellpose 4 and an importable torchvision, see docs/cellpose4.md)::

    python -m mpicellpose.training.cp4 --out DIR [--steps 2400] [--seed 0] [--lr 0.002] [--threads 1]

**What it is.** Cellpose 4's real model, ``cpsam`` (Cellpose-SAM), is a SAM ViT-L image encoder
(24 blocks, width 1024, 305M parameters, a 1.2 GB download) inside ``cellpose.vit.CPSAM``.  It
cannot be downloaded on offline machines and costs seconds per 256x256 tile on a CPU, so the
demo and the tests under Cellpose 4 use a *stand-in*: the same ``CPSAM`` class, built while
:func:`standin_encoder` replaces the ViT-L encoder by a reduced SAM ``ImageEncoderViT`` (width
64, 2 blocks, 2 heads, a 64-wide neck: 0.27M parameters), trained here from seeded random weights
on synthetic nuclei (:mod:`mpicellpose.synthetic`, :func:`training_set_v2`: slices, varied tiles and
zero-padded crops, so that the output depends little on how much of the 256x256 tile an image
fills) with Cellpose 4's own ``cellpose.train.train_seg``.  The defaults reproduce the shipped file
(2400 steps, one torch thread; the first stand-in was ``--steps 400 --lr 0.003 --data v1 --heads 1
--out-chans 256 --threads 2``).
Everything else (256x256 tiling, 3D over YX/ZY/ZX planes, flow dynamics) is Cellpose 4's code.
It segments the synthetic nuclei of the demo; it is **not** a substitute for ``cpsam`` on real
data and is never used for any model name other than ``demo``.

**How it loads.** ``CellposeModel(pretrained_model=PATH)`` always builds ViT-L, so the file
stores its encoder size under the extra key ``standin.config``; :func:`load_standin` reads it
and builds the ``CellposeModel`` inside :func:`standin_encoder`.  A plain
``CellposeModel(pretrained_model=PATH)`` refuses the file (``size mismatch for
encoder.pos_embed``); it never half-loads it.

**Scale.** The stand-in is trained at native scale on nuclei of mean diameter 16 voxels (stored
in the network's ``diam_mean``/``diam_labels``).  Cellpose 4 has no ``diam_mean`` argument: it
resizes by ``30 / diameter``.  :class:`mpicellpose.cellpose.segmenter.CellposeSegmenter` therefore passes
``diameter * 30 / 16`` to ``eval`` for this model only, so that ``--diameter D`` means "objects
are D voxels across", as for ``cpsam`` and for the Cellpose 3 demo model.

Writes ``<out>/demo_cp4_v1`` (state dict, floating tensors in float16; Cellpose loads them into
its float32 or bfloat16 network) and ``<out>/demo_cp4_v1.json`` (provenance: seeds, steps,
learning rate, data, timings, versions, sha256, validation F1 and eval times).

Only numpy is imported at module level; torch and cellpose are imported inside the functions.
What a run needs of the stand-in (its path, :func:`mpicellpose.cellpose.shipped.resolve_demo`, the
loader :func:`mpicellpose.cellpose.shipped.load_standin`) is in :mod:`mpicellpose.cellpose.shipped`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ..cellpose.shipped import CP4_MODEL_NAME as MODEL_NAME
from ..cellpose.shipped import CONFIG_KEY, CP4_DIAMETER, _import_cellpose, load_standin, standin_encoder
from ..synthetic.metrics import match_objects
from ..synthetic.nuclei import make_nuclei
from ..volumes.storage import plain_json, sha256_file
from .cp4_data import N_TILES, N_TRAIN_VOLUMES, SLICE_STRIDE, training_set, training_set_v2

logger = logging.getLogger(__name__)

#: Reduced SAM encoder of the stand-in (SAM ViT-L: 1024 wide, 24 blocks, 16 heads, neck 256).
ENCODER = {"embed_dim": 64, "depth": 2, "num_heads": 2, "out_chans": 64}
#: Mean nucleus diameter of the training data = the stand-in's native object size (voxels).
NATIVE_DIAMETER = 16.0
DEFAULT_STEPS = 2400
DEFAULT_LR = 2e-3
DEFAULT_DATA = "v2"
#: torch threads of the shipped model's training (float results depend on the thread count)
DEFAULT_THREADS = 1
DEFAULT_BATCH = 4
WEIGHT_DECAY = 1e-4

#: Held-out data (the same seeds as the Cellpose 3 demo model's validation).
VAL_2D = dict(shape=(256, 256), seed=9001)
VAL_3D = (dict(shape=(32, 64, 64), seed=9002), dict(shape=(64, 128, 128), seed=9002))
EVAL_NORMALIZE = {"normalize": True, "percentile": [1.0, 99.0]}


def build_net(config: Optional[dict] = None, seed: int = 0):
    """A seeded float32 ``cellpose.vit.CPSAM`` with the reduced encoder ``config``."""
    _import_cellpose()
    import torch
    from cellpose.vit import CPSAM

    torch.manual_seed(int(seed))
    with standin_encoder(**dict(config or ENCODER)):
        return CPSAM(dtype=torch.float32)


def save_net(net, path, config: Optional[dict] = None, half: bool = True,
             diameter: float = NATIVE_DIAMETER) -> None:
    """Save the state dict (+ ``standin.config``); floats in float16 when ``half``."""
    import torch

    config = dict(config or ENCODER)
    net.diam_mean.data = torch.full_like(net.diam_mean.data, float(diameter))
    net.diam_labels.data = torch.full_like(net.diam_labels.data, float(diameter))
    sd = {k: (v.detach().half() if half and v.is_floating_point() and k not in ("W2", "diam_mean", "diam_labels")
              else v.detach()) for k, v in net.state_dict().items()}
    sd[CONFIG_KEY] = torch.tensor([config["embed_dim"], config["depth"], config["num_heads"],
                                   config.get("out_chans", 256)])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, os.fspath(path))


def train_net(net, steps: int = DEFAULT_STEPS, seed: int = 0, batch_size: int = DEFAULT_BATCH,
              lr: float = DEFAULT_LR, data: str = DEFAULT_DATA, snapshot_dir=None, snapshot_every: int = 0) -> Dict:
    """Train ``net`` in place with ``cellpose.train.train_seg``; returns a record of the run."""
    _import_cellpose()
    import torch
    from cellpose import train

    t0 = time.perf_counter()
    if data == "v2":
        images, labels, desc = training_set_v2(seed, NATIVE_DIAMETER)
        normalize = {"normalize": False}
    elif data == "v1":
        images, labels = training_set(seed)
        desc = {"data": "v1", "n_volume_slices": len(images) - N_TILES, "slice_stride": SLICE_STRIDE}
        normalize = dict(EVAL_NORMALIZE)
    else:
        raise ValueError(f"data must be 'v1' or 'v2', got {data!r}")
    t_data = time.perf_counter() - t0
    torch.manual_seed(seed)
    np.random.seed(seed)
    net.rdrop = 0.0
    with contextlib.ExitStack() as stack:
        save_path = snapshot_dir or stack.enter_context(tempfile.TemporaryDirectory())
        Path(save_path).mkdir(parents=True, exist_ok=True)
        t0, c0 = time.perf_counter(), time.process_time()
        _, losses, _ = train.train_seg(
            net, train_data=images, train_labels=labels, normalize=normalize,
            batch_size=batch_size, nimg_per_epoch=batch_size, n_epochs=int(steps),
            learning_rate=lr, weight_decay=WEIGHT_DECAY, rescale=False, scale_range=0.4,
            min_train_masks=1, save_path=save_path, save_every=int(snapshot_every) or 10 ** 9,
            save_each=bool(snapshot_every), model_name="standin")
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    losses = np.asarray(losses, dtype=float)
    return dict({"steps": int(steps), "batch_size": int(batch_size), "nimg_per_epoch": int(batch_size),
                 "n_epochs_cellpose": int(steps), "optimizer": "AdamW (cellpose.train.train_seg default)",
                 "lr_schedule": "cellpose.train.train_seg's: linear warm-up over 10 steps, constant, then "
                                "halved every 10 steps over the last 100 (n > 300) or every 5 over the last 50",
                 "learning_rate": lr, "weight_decay": WEIGHT_DECAY, "rescale": False, "scale_range": 0.4,
                 "rdrop": 0.0, "normalize": normalize, "n_images": len(images)}, **desc,
                **{"data_s": round(t_data, 1), "train_s": round(dt, 1), "train_cpu_s": round(dc, 1),
                   "first_loss": float(np.mean(losses[:5])), "final_loss": float(np.mean(losses[-10:])),
                   "loss_every_100": [round(float(np.mean(losses[i:i + 100])), 4)
                                      for i in range(0, len(losses), 100)]})


def segment(model, image: np.ndarray, *, batch_size: int = 8, **eval_kwargs) -> np.ndarray:
    """Whole-image ``eval`` of a stand-in at its native scale (2D, or 3D with ``do_3D``)."""
    ek = dict(normalize=dict(EVAL_NORMALIZE), batch_size=batch_size, diameter=CP4_DIAMETER)
    if image.ndim == 3:
        ek.update(do_3D=True, z_axis=0)
    ek.update(eval_kwargs)
    return np.asarray(model.eval(image, **ek)[0])


def validate(model, sizes3d: Sequence[dict] = VAL_3D) -> Dict:
    """F1 (IoU 0.5) and eval times on held-out synthetic 2D and 3D images."""
    out = {}
    img, gt = make_nuclei(**VAL_2D)
    t0 = time.perf_counter()
    lab = segment(model, img)
    out["val_2d"] = {"generator": dict(VAL_2D), "eval_s": round(time.perf_counter() - t0, 2),
                     "scores": match_objects(lab, gt, 0.5)}
    out["val_3d"] = []
    for spec in sizes3d:
        img, gt = make_nuclei(**spec)
        t0 = time.perf_counter()
        lab = segment(model, img)
        out["val_3d"].append({"generator": dict(spec), "eval_s": round(time.perf_counter() - t0, 2),
                              "scores": match_objects(lab, gt, 0.5)})
    return out


def load_weights(net, path) -> None:
    """Put a stand-in file's weights (float16 on disk) into the float32 network ``net``."""
    import torch

    sd = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    sd.pop(CONFIG_KEY, None)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})


def train_demo_cp4_model(out_dir, *, steps: int = DEFAULT_STEPS, seed: int = 0, lr: float = DEFAULT_LR,
                         batch_size: int = DEFAULT_BATCH, threads: int = DEFAULT_THREADS, name: str = MODEL_NAME,
                         validate_bf16: bool = True, init=None, encoder: Optional[dict] = None,
                         data: str = DEFAULT_DATA, snapshot_every: int = 0, command: Optional[str] = None,
                         init_made_by: Optional[str] = None) -> Dict:
    """Build (or start from the weights ``init``), train, save (fp16), reload through
    :func:`load_standin`, validate, write the JSON."""
    from importlib.metadata import version

    _import_cellpose()  # fails early with the install hint
    import torch

    torch.set_num_threads(int(threads))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = dict(ENCODER, **(encoder or {}))
    net = build_net(encoder, seed)
    if init is not None:
        load_weights(net, init)
    n_params = int(sum(p.numel() for p in net.parameters()))
    training = train_net(net, steps, seed=seed, batch_size=batch_size, lr=lr, data=data,
                         snapshot_dir=(out_dir / "snapshots") if snapshot_every else None,
                         snapshot_every=snapshot_every)
    path = out_dir / name
    save_net(net, path, encoder, half=True)
    logger.info("saved %s; validating", path)
    val = {"float32": validate(load_standin(path))}
    if validate_bf16:
        val["bfloat16"] = validate(load_standin(path, use_bfloat16=True), sizes3d=VAL_3D[:1])
    info = {
        "name": name, "file": name,
        "format": "Cellpose 4 CPSAM state dict (torch.save) with a reduced SAM encoder; float16 tensors "
                  "(W2, diam_mean, diam_labels float32); extra key 'standin.config' = [embed_dim, depth, num_heads, "
                  "out_chans]",
        "what": "offline stand-in for Cellpose 4's cpsam: cellpose.vit.CPSAM with a tiny SAM ImageEncoderViT, "
                "trained on synthetic nuclei; for the demo and tests only, not for real data",
        "load_with": "mpicellpose.cellpose.shipped.load_standin(path[, use_bfloat16=False, gpu=False, device=None])",
        "eval_with": "model.eval(img, diameter=30, normalize={'normalize': True, 'percentile': [1, 99]}"
                     "[, do_3D=True, z_axis=0]) for 16-voxel nuclei (Cellpose 4 resizes by 30/diameter)",
        "encoder": dict(encoder, img_size=1024, patch_size=16, use_rel_pos=True),
        "params": n_params, "native_diameter": NATIVE_DIAMETER,
        "sha256": sha256_file(path), "size_bytes": os.path.getsize(path),
        "training": _training_record(training, command, steps, seed, lr, batch_size, threads, data, encoder, init,
                                     init_made_by),
        "validation": plain_json(val),
        "versions": {"cellpose": version("cellpose"), "torch": torch.__version__,
                     "torchvision": _version_or_none("torchvision"),
                     "segment_anything": _version_or_none("segment_anything"),
                     "numpy": np.__version__, "python": platform.python_version()},
        "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
        "date": time.strftime("%Y-%m-%d"),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _training_record(training, command, steps, seed, lr, batch_size, threads, data, encoder, init,
                     init_made_by) -> Dict:
    """The ``training`` entry of the provenance: :func:`train_net`'s record, the command that
    reproduces the run, where its initial weights came from, and (``--data v1``) its volumes."""
    from . import nuclei_data as cp3_training

    return dict(training, command=command or (
                    f"python -m mpicellpose.training.cp4 --out DIR --steps {steps} --seed {seed} --lr {lr} "
                    f"--batch-size {batch_size} --threads {threads} --data {data} "
                    f"--embed-dim {encoder['embed_dim']} --depth {encoder['depth']} "
                    f"--heads {encoder['num_heads']} --out-chans {encoder['out_chans']}"
                    + (f" --init {init}" if init else "")),
                init=None if init is None else {"file": os.path.basename(os.fspath(init)),
                                                "sha256": sha256_file(init), "made_by": init_made_by},
                seed=seed, torch_threads=int(threads),
                **({} if data != "v1" else dict(
                    volumes=plain_json([dict(v, seed=v["seed"] + seed)
                                        for v in cp3_training.TRAIN_VOLUMES[:N_TRAIN_VOLUMES]]),
                    tiles={"shape": [256, 256], "n": N_TILES, "seeds": f"500+seed+i, i<{N_TILES}",
                           "density": "0.15+0.03*i", "touching_fraction": 0.3})),
                load_average_after=[round(v, 2) for v in os.getloadavg()])


def _version_or_none(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m mpicellpose.training.cp4``)."""
    p = argparse.ArgumentParser(prog="python -m mpicellpose.training.cp4",
                                description="Train the tiny Cellpose 4 stand-in demo model on CPU.")
    p.add_argument("--out", required=True, help="output folder (the shipped copy is mpicellpose/models)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads (default %(default)s)")
    p.add_argument("--name", default=MODEL_NAME)
    p.add_argument("--no-bf16-check", action="store_true", help="skip the bfloat16 validation")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from these stand-in weights (fine-tuning) instead of seeded random ones")
    p.add_argument("--data", choices=["v1", "v2"], default=DEFAULT_DATA,
                   help="training set: v1 (two volumes + 8 tiles, the first stand-in's) or v2 (four volumes, "
                        "24 varied tiles, zero-padded crops; see training_set_v2)")
    p.add_argument("--embed-dim", type=int, default=ENCODER["embed_dim"])
    p.add_argument("--depth", type=int, default=ENCODER["depth"])
    p.add_argument("--heads", type=int, default=ENCODER["num_heads"])
    p.add_argument("--out-chans", type=int, default=ENCODER["out_chans"], help="width of SAM's neck")
    p.add_argument("--init-made-by", default=None, metavar="TEXT",
                   help="how the --init file was made (recorded in the provenance)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="also keep float32 snapshots every N steps in OUT/snapshots (Cellpose's save_each)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    info = train_demo_cp4_model(args.out, steps=args.steps, seed=args.seed, lr=args.lr,
                                batch_size=args.batch_size, threads=args.threads, name=args.name,
                                validate_bf16=not args.no_bf16_check, init=args.init, data=args.data,
                                encoder={"embed_dim": args.embed_dim, "depth": args.depth,
                                         "num_heads": args.heads, "out_chans": args.out_chans},
                                snapshot_every=args.snapshot_every, init_made_by=args.init_made_by)
    val = info["validation"]["float32"]
    print(f"weights: {Path(args.out) / info['file']} ({info['size_bytes'] / 1e6:.2f} MB), "
          f"train {info['training']['train_s']} s, loss {info['training']['first_loss']:.3f} -> "
          f"{info['training']['final_loss']:.3f}")
    print(f"F1 2D {val['val_2d']['scores']['f1']:.3f}; 3D " + ", ".join(
        f"{'x'.join(map(str, v['generator']['shape']))} {v['scores']['f1']:.3f} ({v['eval_s']} s)"
        for v in val["val_3d"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
