"""Seeded Cellpose 4 networks for benchmarks: the full-size ``cpsam`` architecture (ViT-L, random
weights) or a reduced-encoder stand-in, without downloading anything.

The tiny stand-in that ships (``mpicellpose/models/demo_cp4_v1``) is trained by
``python -m mpicellpose.training.cp4`` (the code that used to live here); this script keeps what
the benchmarks need beside it:

``--kind full [--half]``
    The real ``cellpose.vit.CPSAM`` (SAM ViT-L, 305M parameters) with seeded random weights, saved
    as a plain state dict (1.2 GB fp32, 581 MB with ``--half``).  It loads through the unmodified
    ``CellposeModel(pretrained_model=PATH)`` and costs what ``cpsam`` costs: use it to time Cellpose 4
    per GPU or CPU (its labels are meaningless).
``--kind tiny``
    An untrained stand-in of any encoder size (``--embed-dim/--depth/--heads/--out-chans``), loaded with
    :func:`mpicellpose.cellpose.shipped.load_standin`.

Needs Cellpose 4 with an importable torchvision (see docs/cellpose4.md; ``.ci/cellpose4-venv.sh``).

    python benchmarks/make_cp4_standin.py --kind full --half --out /tmp/cp4/full.pt --check
    python benchmarks/make_cp4_standin.py --kind tiny --embed-dim 128 --heads 4 --out /tmp/cp4/t.pt --check
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpicellpose.training import cp4 as training_cp4  # noqa: E402
from mpicellpose.cellpose import shipped  # noqa: E402


def _maxrss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def make_full(path, seed: int = 0, half: bool = False) -> dict:
    """Seeded ViT-L CPSAM saved so that a plain ``CellposeModel(pretrained_model=path)`` loads it."""
    shipped._import_cellpose()
    import torch
    from cellpose.vit import CPSAM

    torch.manual_seed(int(seed))
    t0 = time.perf_counter()
    net = CPSAM(dtype=torch.float32)
    sd = {k: (v.half() if half and v.is_floating_point() and k != "W2" else v) for k, v in net.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, os.fspath(path))
    return {"kind": "full", "params": int(sum(p.numel() for p in net.parameters())),
            "build_s": round(time.perf_counter() - t0, 1)}


def load(path, use_bfloat16=False):
    from cellpose import models

    if shipped.read_standin_config(path) is not None:
        return shipped.load_standin(path, use_bfloat16=use_bfloat16)
    return models.CellposeModel(gpu=False, pretrained_model=os.fspath(path), use_bfloat16=use_bfloat16)


def check(path, sizes3d=((32, 64, 64),), use_bfloat16=False):
    """Load, then time 2D 256x256 and 3D evals of synthetic nuclei (JSON lines)."""
    from mpicellpose.synthetic.nuclei import make_nuclei

    t0 = time.perf_counter()
    model = load(path, use_bfloat16)
    print(json.dumps({"step": "load", "s": round(time.perf_counter() - t0, 2), "maxrss_mb": _maxrss_mb()}), flush=True)
    for shape in [(256, 256)] + [tuple(s) for s in sizes3d]:
        img, _ = make_nuclei(shape, seed=9001)
        t0 = time.perf_counter()
        masks = training_cp4.segment(model, img)
        print(json.dumps({"step": f"eval{len(shape)}d", "shape": list(shape), "s": round(time.perf_counter() - t0, 2),
                          "n_masks": int(masks.max()), "maxrss_mb": _maxrss_mb()}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/cp4/standin.pt")
    ap.add_argument("--kind", choices=["tiny", "full"], default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embed-dim", type=int, default=training_cp4.ENCODER["embed_dim"])
    ap.add_argument("--depth", type=int, default=training_cp4.ENCODER["depth"])
    ap.add_argument("--heads", type=int, default=training_cp4.ENCODER["num_heads"])
    ap.add_argument("--out-chans", type=int, default=training_cp4.ENCODER["out_chans"], help="width of SAM's neck")
    ap.add_argument("--half", action="store_true", help="store float tensors as fp16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="load it and time 2D/3D eval")
    ap.add_argument("--bf16", action="store_true", help="check with use_bfloat16=True")
    ap.add_argument("--size3d", default="32,64,64", help="Z,Y,X of the 3D check volume(s); ';' separates several")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.kind == "full":
        info = make_full(a.out, a.seed, a.half)
    else:
        cfg = {"embed_dim": a.embed_dim, "depth": a.depth, "num_heads": a.heads, "out_chans": a.out_chans}
        net = training_cp4.build_net(cfg, a.seed)
        training_cp4.save_net(net, a.out, cfg, half=a.half)
        info = {"kind": "tiny", "config": cfg, "params": int(sum(p.numel() for p in net.parameters()))}
    info.update(file=os.fspath(a.out), size_mb=round(os.path.getsize(a.out) / 2 ** 20, 1), maxrss_mb=_maxrss_mb())
    print(json.dumps(info), flush=True)
    if a.check:
        check(a.out, [tuple(int(v) for v in s.split(",")) for s in a.size3d.split(";") if s], a.bf16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
