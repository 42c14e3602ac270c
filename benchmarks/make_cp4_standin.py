"""Offline stand-in for Cellpose 4's ``cpsam`` model (Cellpose-SAM), built from Cellpose's own class.

Cellpose 4.x (checked: 4.2.1.1) has a single network class, ``cellpose.vit.CPSAM``: a SAM
ViT-L image encoder (``segment_anything.sam_model_registry["vit_l"]``, 24 blocks, width 1024,
305M parameters) with 8x8 patches, all-global attention, a 1x1 readout conv and a fixed
transposed conv (``W2``) back to pixels.  ``CellposeModel(pretrained_model=PATH)`` always builds
that ViT-L and then calls ``load_state_dict(..., strict=False)``; the only check is that the
file contains a ``W2`` key.  There is no smaller backbone in the public API (the other
backbone, CPDINO, needs ``dinov3`` from GitHub, not on PyPI).

Two kinds of stand-in are written by this script:

``--kind full``
    The real architecture (ViT-L) with seeded random weights, saved as a plain state dict.
    Loads through the unmodified ``CellposeModel(gpu=False, pretrained_model=PATH)``; costs
    what cpsam costs (1.2 GB file in fp32, ~0.6 GB with ``--half``; one 256x256 tile takes
    seconds on a CPU).

``--kind tiny`` (default)
    The same CPSAM class with a reduced SAM encoder (default width 64, 2 blocks, 1 head:
    0.88M parameters, 4.3 MB file).  The file stores its encoder size under the extra key
    ``standin.config``; :func:`load_standin` reads it and swaps the encoder builder that
    ``CPSAM.__init__`` calls (``cellpose.vit.sam_model_registry["vit_l"]``) while the
    ``CellposeModel`` is built, so everything else (tiling at 256, 3D, dynamics, training)
    is Cellpose 4's own code.  A plain ``CellposeModel(pretrained_model=PATH)`` refuses
    the file loudly (size mismatch), it never half-loads it.
    With ``--train-steps N`` the tiny net is trained with ``cellpose.train.train_seg`` on
    synthetic nuclei from ``mpicellpose.synthetic`` so that it segments something.

Torchvision: PyPI's torchvision wheels are CUDA builds; next to the CPU torch wheel their
``_C.so`` does not load and ``import torchvision`` then dies with
``RuntimeError: operator torchvision::nms does not exist``.  Cellpose 4 needs only
torchvision's pure-Python parts, so :func:`ensure_torchvision_importable` defines the two
op schemas torchvision registers unguarded (``nms``, ``qnms``) before it is imported.
``--install-tv-shim`` writes a ``.pth`` hook into the running venv that does this
automatically on the first ``import torchvision`` (no cost for processes that never import
it).  See docs/cellpose4.md.

Examples (Python with cellpose 4 installed as described in docs/cellpose4.md)::

    python benchmarks/make_cp4_standin.py --install-tv-shim
    python benchmarks/make_cp4_standin.py --out /tmp/cp4/tiny.pt --seed 0 --check
    python benchmarks/make_cp4_standin.py --out /tmp/cp4/tiny_trained.pt --train-steps 400 --lr 3e-3 --check
    python benchmarks/make_cp4_standin.py --kind full --half --out /tmp/cp4/full.pt --check

Timings and memory are printed as JSON lines.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: reduced encoder used by ``--kind tiny`` (SAM ViT-L is 1024 wide, 24 blocks, 16 heads)
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 1}
CONFIG_KEY = "standin.config"

_TV_LIB = None  # keeps the torch.library.Library alive

_SHIM_MODULE = '''"""Written by mpicellpose benchmarks/make_cp4_standin.py --install-tv-shim.

Before the first ``import torchvision`` define the op schemas torchvision registers fake
kernels for without checking that its C++ extension loaded (PyPI torchvision is a CUDA
build and does not load beside the CPU torch wheel). Costs nothing until torchvision is
imported.
"""
import importlib.abc
import sys

_LIB = None


def ensure():
    global _LIB
    import torch
    try:
        torch.ops.torchvision.nms
        return
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            ensure()
        return None


if not any(type(f).__name__ == "_Hook" for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
'''


def ensure_torchvision_importable() -> None:
    """Let ``import torchvision`` (pure-Python parts) succeed beside a CPU-only torch.

    Harmless when torchvision's compiled ops load (nothing is defined then).  Must run
    before the first ``import torchvision`` / ``import cellpose``.
    """
    global _TV_LIB
    import torch

    if "torchvision" in sys.modules or _TV_LIB is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - raises if the op is not registered
        return
    except (AttributeError, RuntimeError):
        pass
    # does the real extension load? then torchvision registers everything itself
    try:
        import importlib.util
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            so = Path(list(spec.submodule_search_locations)[0]) / "_C.so"
            if so.exists():
                torch.ops.load_library(str(so))
                return
    except (OSError, ImportError):
        pass
    _TV_LIB = torch.library.Library("torchvision", "DEF")
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def install_torchvision_shim(site_packages: str | None = None) -> Path:
    """Write ``_cp4_tvshim.py`` and ``_cp4_tvshim.pth`` into the running venv's site-packages."""
    import sysconfig
    sp = Path(site_packages or sysconfig.get_paths()["purelib"])
    (sp / "_cp4_tvshim.py").write_text(_SHIM_MODULE)
    (sp / "_cp4_tvshim.pth").write_text("import _cp4_tvshim\n")
    return sp / "_cp4_tvshim.pth"


@contextlib.contextmanager
def standin_encoder(embed_dim: int, depth: int, num_heads: int):
    """While active, ``CPSAM()`` builds a reduced SAM encoder instead of ViT-L.

    ``CPSAM.__init__`` calls ``sam_model_registry["vit_l"](None).image_encoder``; the
    registry is a module-level dict shared with ``segment_anything``, so the entry is
    swapped and restored.  Image size (1024) and patch size (16) stay as in SAM because
    CPSAM derives its 8x8-patch, 32x32-token position embedding from them.
    """
    from functools import partial
    from types import SimpleNamespace

    import torch
    from segment_anything.modeling import ImageEncoderViT
    import cellpose.vit as cvit

    def build(checkpoint=None):
        enc = ImageEncoderViT(
            depth=int(depth), embed_dim=int(embed_dim), img_size=1024, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=int(num_heads),
            patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(),
            window_size=14, out_chans=256)
        return SimpleNamespace(image_encoder=enc)

    reg = cvit.sam_model_registry
    old = reg["vit_l"]
    reg["vit_l"] = build
    try:
        yield
    finally:
        reg["vit_l"] = old


def _read_config(path):
    import torch
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if CONFIG_KEY not in sd:
        return None
    e, d, h = (int(v) for v in sd[CONFIG_KEY].tolist())
    return {"embed_dim": e, "depth": d, "num_heads": h}


def load_standin(path, gpu: bool = False, use_bfloat16: bool = False):
    """``CellposeModel`` for a file written by :func:`make_standin` (tiny or full)."""
    ensure_torchvision_importable()
    from cellpose import models

    path = os.fspath(path)
    if not os.path.isfile(path):  # Cellpose would silently try to download cpsam_v2
        raise FileNotFoundError(path)
    cfg = _read_config(path)
    ctx = standin_encoder(**cfg) if cfg else contextlib.nullcontext()
    with ctx:
        return models.CellposeModel(gpu=gpu, pretrained_model=path, use_bfloat16=use_bfloat16)


def build_net(config=None, seed: int = 0):
    """A seeded ``cellpose.vit.CPSAM`` (float32); ``config=None`` means the real ViT-L."""
    ensure_torchvision_importable()
    import torch
    from cellpose.vit import CPSAM

    torch.manual_seed(int(seed))
    ctx = standin_encoder(**config) if config else contextlib.nullcontext()
    with ctx:
        net = CPSAM(dtype=torch.float32)
    return net


def save_net(net, path, config=None, half: bool = False) -> None:
    import torch
    sd = {k: (v.half() if half and v.is_floating_point() and k != "W2" else v)
          for k, v in net.state_dict().items()}
    if config:
        sd[CONFIG_KEY] = torch.tensor([config["embed_dim"], config["depth"], config["num_heads"]])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)


def _synthetic_training_set(seed: int):
    sys.path.insert(0, str(REPO))
    from mpicellpose.synthetic import make_nuclei, split_disconnected
    from mpicellpose.training import TRAIN_VOLUMES, training_slices
    import numpy as np

    images, labels = training_slices(TRAIN_VOLUMES[:2], seed=seed, stride=14)
    for i in range(8):  # full 256x256 tiles, the size CPSAM is trained on
        img, lab = make_nuclei((256, 256), seed=500 + seed + i, density=0.15 + 0.03 * i,
                               touching_fraction=0.3)
        images.append(img.astype(np.float32))
        labels.append(split_disconnected(lab))
    return images, labels


def train_net(net, steps: int, seed: int = 0, batch_size: int = 4, lr: float = 1e-3):
    import numpy as np
    import tempfile
    import torch
    from cellpose import train

    images, labels = _synthetic_training_set(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    net.rdrop = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _, losses, _ = train.train_seg(
            net, train_data=images, train_labels=labels, normalize={"normalize": True},
            batch_size=batch_size, nimg_per_epoch=batch_size, n_epochs=int(steps),
            learning_rate=lr, weight_decay=1e-4, rescale=False, scale_range=0.4,
            min_train_masks=1, save_path=tmp, save_every=10 ** 9, model_name="standin")
        dt = time.perf_counter() - t0
    return {"train_s": round(dt, 1), "steps": int(steps), "n_images": len(images),
            "first_loss": float(np.mean(losses[:5])), "final_loss": float(np.mean(losses[-10:]))}


def make_standin(path, kind: str = "tiny", seed: int = 0, config=None, half: bool = False,
                 train_steps: int = 0, lr: float = 1e-3):
    config = None if kind == "full" else dict(config or TINY)
    t0 = time.perf_counter()
    net = build_net(config, seed)
    info = {"kind": kind, "config": config, "seed": seed,
            "params": int(sum(p.numel() for p in net.parameters())),
            "build_s": round(time.perf_counter() - t0, 1)}
    if train_steps:
        info["training"] = train_net(net, train_steps, seed=seed, lr=lr)
    save_net(net, path, config, half=half)
    info["file"] = os.fspath(path)
    info["size_mb"] = round(os.path.getsize(path) / 2 ** 20, 1)
    return info


def _maxrss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def check(path, sizes3d=((32, 64, 64),), size2d=(256, 256), use_bfloat16=False, f1=True):
    """Load through CellposeModel, eval 2D and 3D synthetic nuclei, print timings/F1."""
    import numpy as np
    sys.path.insert(0, str(REPO))
    from mpicellpose.synthetic import make_nuclei
    from mpicellpose.metrics import match_objects

    out = []
    t0 = time.perf_counter()
    model = load_standin(path, use_bfloat16=use_bfloat16)
    out.append({"step": "load", "s": round(time.perf_counter() - t0, 2), "maxrss_mb": _maxrss_mb(),
                "bf16": use_bfloat16})
    norm = {"normalize": True, "percentile": [1.0, 99.0]}
    img, lab = make_nuclei(size2d, seed=9001)
    t0 = time.perf_counter()
    masks, flows, styles = model.eval(img, normalize=dict(norm), batch_size=8)
    rec = {"step": "eval2d", "shape": list(img.shape), "s": round(time.perf_counter() - t0, 2),
           "n_masks": int(masks.max()), "n_true": int(lab.max()), "maxrss_mb": _maxrss_mb()}
    if f1:
        rec["f1"] = round(match_objects(masks, lab)["f1"], 3)
    out.append(rec)
    print(json.dumps(rec), flush=True)
    for shp in sizes3d:
        img, lab = make_nuclei(tuple(shp), seed=9002)
        t0 = time.perf_counter()
        masks, flows, styles = model.eval(img, do_3D=True, z_axis=0, normalize=dict(norm),
                                          batch_size=8, flow3D_smooth=0, niter=200)
        rec = {"step": "eval3d", "shape": list(img.shape), "dtype": str(img.dtype),
               "s": round(time.perf_counter() - t0, 2), "n_masks": int(masks.max()),
               "n_true": int(lab.max()), "masks_shape": list(masks.shape),
               "maxrss_mb": _maxrss_mb()}
        if f1:
            rec["f1"] = round(match_objects(masks, lab)["f1"], 3)
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/cp4/standin_tiny.pt")
    ap.add_argument("--kind", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embed-dim", type=int, default=TINY["embed_dim"])
    ap.add_argument("--depth", type=int, default=TINY["depth"])
    ap.add_argument("--heads", type=int, default=TINY["num_heads"])
    ap.add_argument("--half", action="store_true", help="store float tensors as fp16")
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate for --train-steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="load it and time 2D/3D eval")
    ap.add_argument("--check-only", action="store_true", help="do not (re)build --out")
    ap.add_argument("--bf16", action="store_true", help="check with use_bfloat16=True")
    ap.add_argument("--size3d", default="32,64,64", help="Z,Y,X of the 3D check volume(s); ';' separates several")
    ap.add_argument("--install-tv-shim", action="store_true",
                    help="write the torchvision import hook into this venv and exit")
    a = ap.parse_args(argv)

    if a.install_tv_shim:
        print(install_torchvision_shim())
        return 0
    import torch
    torch.set_num_threads(a.threads)
    ensure_torchvision_importable()
    if not a.check_only:
        cfg = {"embed_dim": a.embed_dim, "depth": a.depth, "num_heads": a.heads}
        info = make_standin(a.out, kind=a.kind, seed=a.seed, config=cfg, half=a.half,
                            train_steps=a.train_steps, lr=a.lr)
        info["maxrss_mb"] = _maxrss_mb()
        print(json.dumps(info), flush=True)
    if a.check or a.check_only:
        sizes = [tuple(int(v) for v in s.split(",")) for s in a.size3d.split(";") if s]
        check(a.out, sizes3d=sizes, use_bfloat16=a.bf16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
