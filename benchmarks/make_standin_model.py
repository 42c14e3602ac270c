"""Write a stand-in Cellpose 3 model (a CPnet with seeded random weights) to a file.

Until the project ships its trained model (``mpicellpose/models/demo_nuclei_v1``) the
benchmarks need *some* Cellpose-3 weights that load offline through
``CellposeModel(pretrained_model=PATH)``.  Random weights give meaningless (but
deterministic) segmentations; they cost the same time per voxel as trained ones,
which is what a throughput benchmark needs.

Saving and reloading by path matters: ``CellposeModel(pretrained_model=False)``
keeps ``net_ortho`` unset and 3D evaluation then fails with AttributeError.

``diam_mean`` is stored inside the weights; giving ``--diameter`` equal to it at
evaluation time means ``rescale == 1`` (no resampling of the volume).

A plain random CPnet outputs an almost constant, negative cell probability, so it finds
no object at all (and the reference raises on a volume without any object).  The stand-in
therefore multiplies the output layer by ``--output-scale`` (default 100: the random
features correlate ~0.77 with the foreground of synthetic nuclei) and, unless
``--no-calibrate``, shifts the cell-probability bias so that on a seeded synthetic
calibration image the predicted foreground fraction equals the true one.  In 3D
(``do_3D``) that yields a few masks per nucleus-sized region; in 2D the random flows fail
Cellpose's flow-error check, so 2D runs need ``flow_threshold=0`` to get masks.

Run with any Python that has cellpose 3.x and torch, e.g.::

    benchmarks/.venv-reference/bin/python benchmarks/make_standin_model.py \
        --out benchmarks/work/standin_cp3 --diam-mean 16 --seed 0
"""
from __future__ import annotations

import argparse
import os
import sys


def make_standin(path: str, diam_mean: float = 16.0, seed: int = 0, nchan: int = 2,
                 cellprob_bias: float = 0.0, output_scale: float = 100.0,
                 calibrate: bool = True) -> str:
    """Create and save a seeded random CPnet (the standard Cellpose 3 architecture).

    Parameters
    ----------
    path : str
        File to write (parent folders are created).
    diam_mean : float
        Mean diameter stored in the weights.
    seed : int
        Torch seed; equal seeds give identical weights.
    nchan : int
        Input channels of the net (Cellpose 3 default: 2).
    cellprob_bias : float
        Constant added to the bias of the cell-probability output channel (after calibration).
    output_scale : float
        Factor applied to the weights and biases of the last (output) convolution.
    calibrate : bool
        Shift the cell-probability bias so that the predicted foreground fraction on a
        seeded synthetic 2D image (``make_volume.simple_nuclei``) matches the true one.

    Returns
    -------
    str
        The absolute path written.
    """
    import torch
    from cellpose.resnet_torch import CPnet

    torch.manual_seed(seed)
    net = CPnet([nchan, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True,
                diam_mean=float(diam_mean))
    # net.output is Sequential(BatchNorm, ReLU, Conv2d) producing (dY, dX, cellprob)
    last = [m for m in net.output.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight *= float(output_scale)
        last.bias *= float(output_scale)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if calibrate:
        import numpy as np
        from cellpose import models
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from make_volume import simple_nuclei

        img, lab = simple_nuclei((256, 256), seed=seed, diameter=diam_mean, density=0.3)
        net.save_model(path)
        model = models.CellposeModel(gpu=False, pretrained_model=path)
        _, flows, _ = model.eval(img, diameter=diam_mean, channels=[0, 0])
        thr = float(np.percentile(flows[2], 100.0 * (1.0 - (lab > 0).mean())))
        with torch.no_grad():
            last.bias[2] -= thr
    if cellprob_bias:
        with torch.no_grad():
            last.bias[2] += float(cellprob_bias)
    net.save_model(path)
    return path


def check_loads(path: str) -> float:
    """Load ``path`` through CellposeModel exactly as the reference does; return diam_mean."""
    from cellpose import models

    model = models.CellposeModel(gpu=False, pretrained_model=path)
    if str(model.pretrained_model) != path:
        raise RuntimeError(f"CellposeModel did not load {path} (got {model.pretrained_model})")
    return float(model.diam_mean)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--diam-mean", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cellprob-bias", type=float, default=0.0)
    p.add_argument("--output-scale", type=float, default=100.0)
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the reload check")
    a = p.parse_args(argv)
    path = make_standin(a.out, a.diam_mean, a.seed, cellprob_bias=a.cellprob_bias,
                        output_scale=a.output_scale, calibrate=not a.no_calibrate)
    if not a.no_check:
        dm = check_loads(path)
        print(f"wrote {path} (loads through CellposeModel, diam_mean={dm:g})")
    else:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
