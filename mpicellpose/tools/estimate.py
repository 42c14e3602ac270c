"""A rough wall-time estimate for a planned run (``mpicellpose plan``).

wall ~ start-up + (network + mask step + the rest) / the ranks that work at once, where

* **network**: the voxels the network evaluates for this plan (:func:`mpicellpose.grid.cost.network_voxels`,
  per orientation; a 3D Cellpose network runs three), at the network's resolution (Cellpose resizes
  by its diameter rule and the anisotropy), times the seconds per voxel of this device: either
  **measured** on the spot (``plan --measure``: the run's own model and settings on a small tile of
  the input, through the flow step's own call) or **calibrated** (:data:`CALIBRATED`, per device
  kind, measured once with the shipped model);
* **mask step**: voxels of the blocks' read regions (under ``--pipeline flows``: of the flow boxes'
  mask regions) times a calibrated cost per voxel;
* **the rest** (reading, stitching, writing labels and table): a calibrated cost per output voxel;
* **ranks at once**: on a GPU every rank has its own; on the CPU the ranks share this machine's
  cores (no more ranks than cores compute at a time, each with its share of the threads); never
  more than the plan has flow boxes or blocks.

A rough guide (within a factor of about 2 on this project's runs), for planning a cluster job, not
a promise: the first run's log gives the real rates ("seconds per megavoxel").
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from ..grid import geometry as geo
from ..grid.cost import network_voxels

#: Seconds per voxel, per device kind, for a Cellpose 3 network of the standard size (the shipped
#: 'demo' model; cyto3 and nuclei are the same network).  'network': per voxel and orientation at
#: the network's resolution, one rank; 'masks': per voxel of a block's read region; 'rest': per
#: output voxel (read, stitch, relabel, table); 'startup': seconds (import Cellpose, load the model).
CALIBRATED = {
    "cpu": {"network": 9.5e-6, "masks": 2.5e-6, "rest": 0.4e-6, "startup": 10.0, "threads": 1,
            "basis": "calibrated: the shipped model on one core of a 2-core x86 VM (AVX2), Cellpose 3.1, "
                     "torch 2.13 CPU: 10.2 and 9.1 s per megavoxel on 64^3 and 128^3 tiles"},
    "cuda": {"network": 0.2e-6, "masks": 0.0, "rest": 0.05e-6, "startup": 10.0, "threads": None,
             "basis": "calibrated: the shipped model on one NVIDIA H200 (docs/gpu.md, 256^3 demo: 0.663 s per "
                      "megavoxel for network and masks together)"},
}

#: Start-up seconds besides importing Cellpose and loading the model (Python, MPI, the plan).
STARTUP_BESIDES_MODEL = 3.0

#: Efficiency of each torch thread beyond the first on the CPU (2 threads ran 1.6x one).
THREAD_EFFICIENCY = 0.8


def device_kind(device: str) -> str:
    """'cuda' or 'cpu' (mps and others count as their nearest calibrated kind: cuda)."""
    return "cpu" if str(device).startswith("cpu") else "cuda"


def network_scale(settings, model: dict | None, ndim: int) -> float:
    """Network voxels per input voxel from Cellpose's resizing: (diam_mean / diameter)^ndim times
    the anisotropy in 3D (1 when the diameter is not given: Cellpose 3 then keeps the size)."""
    ek = settings.eval_kwargs or {}
    diameter = ek.get("diameter")
    diam_mean = float((model or {}).get("diam_mean") or 30.0)
    rescale = diam_mean / float(diameter) if diameter else 1.0
    aniso = float(ek.get("anisotropy") or 1.0) if ndim == 3 else 1.0
    return rescale ** ndim * aniso


def _model_info(plan) -> dict:
    """The model's card (diam_mean) when it is a shipped model with a card, else its resolution."""
    model = dict(plan.resolved_model or {})
    path = model.get("path")
    if path and os.path.isfile(str(path) + ".json"):
        import json

        with open(str(path) + ".json") as f:
            card = json.load(f)
        model.setdefault("diam_mean", card.get("diam_mean"))
    return model


def parallel_ranks(kind: str, n_ranks: int, cores: int | None = None) -> tuple:
    """(ranks computing at once, torch threads each): CPU ranks share this machine's cores."""
    if kind != "cpu":
        return max(1, n_ranks), None
    cores = cores or os.cpu_count() or 1
    at_once = max(1, min(n_ranks, cores))
    return at_once, max(1, cores // at_once)


def thread_speedup(threads) -> float:
    return 1.0 if not threads or threads <= 1 else 1.0 + THREAD_EFFICIENCY * (threads - 1)


def step_wall(total: float, units: int, at_once: int) -> float:
    """Wall of a step of ``total`` seconds in ``units`` equal pieces handed to ``at_once`` ranks."""
    units = max(int(units), 1)
    return total * math.ceil(units / at_once) / units


def _units(settings, kept) -> tuple:
    """(pieces of work of the network step, of the mask step, voxels the mask step segments): flow
    boxes under --pipeline flows, else blocks (None: the blocks' read regions)."""
    if settings.pipeline != "flows":
        return len(kept), len(kept), None
    from ..grid.boxes import BoxGrid

    boxes = BoxGrid(settings.grid, kept, settings.flow_box, settings.flow_halo)
    return len(boxes), len(boxes), int(geo.block_sizes(boxes.masks, boxes.linears, "read").sum())


def estimate(plan, n_ranks: int, device: str, measured: dict | None = None, cores: int | None = None) -> dict:
    """The estimate for ``plan`` (see the module): seconds per part, the wall, and the basis."""
    settings, kind = plan.settings, device_kind(device)
    nd = len(plan.shape)
    cal = CALIBRATED[kind]
    kept = list(plan.kept)
    scale = network_scale(settings, _model_info(plan), nd)
    net_vox = network_voxels(settings, kept, settings.pipeline) * (3 if nd == 3 else 1)
    read_vox = int(geo.block_sizes(settings.grid, kept, "read").sum()) if kept else 0
    core_vox = int(geo.block_sizes(settings.grid, kept).sum()) if kept else 0
    at_once, threads = parallel_ranks(kind, n_ranks, cores)
    if measured:   # measured with the threads a rank gets: per input voxel and orientation
        per_vox, basis = measured["seconds_per_voxel"], measured["basis"]
        network = net_vox * per_vox
    else:
        per_vox, basis = cal["network"] / thread_speedup(threads), cal["basis"]
        network = net_vox * scale * per_vox
    masks = read_vox * cal["masks"] / thread_speedup(threads)
    rest = core_vox * cal["rest"]
    startup = cal["startup"] if not measured else STARTUP_BESIDES_MODEL + measured["load_seconds"]
    net_units, mask_units, mask_vox = _units(settings, kept)
    if mask_vox is not None:
        masks = mask_vox * cal["masks"] / thread_speedup(threads)
    wall = (startup + step_wall(network, net_units, at_once) + step_wall(masks, mask_units, at_once)
            + rest / at_once)
    return {"wall_seconds": round(wall, 1), "network_seconds": round(network, 1), "mask_seconds": round(masks, 1),
            "rest_seconds": round(rest, 1), "startup_seconds": round(startup, 1), "ranks_at_once": at_once,
            "ranks": n_ranks, "threads_per_rank": threads, "device": kind, "network_voxels": int(net_vox),
            "network_units": net_units, "mask_units": mask_units,
            "network_scale": round(scale, 4), "seconds_per_network_voxel": per_vox,
            "basis": "measured" if measured else "calibrated", "basis_detail": basis}


def _tile(src, plan, edge: int):
    """A tile of about ``edge`` per spatial axis from the middle of the input (channel axis last)."""
    shape = plan.shape
    sl = [slice(max(0, n // 2 - edge // 2), max(0, n // 2 - edge // 2) + min(edge, n)) for n in shape]
    if plan.channel_axis is not None:
        sl.insert(plan.channel_axis, slice(None))
    img = np.asarray(src[tuple(sl)])
    return np.moveaxis(img, plan.channel_axis, -1) if plan.channel_axis is not None else img


def measure_network(cfg, plan, src, n_ranks: int, edge: int | None = None, cores: int | None = None) -> dict:
    """Seconds per input voxel and orientation of the run's own network on this device, timed on
    a tile from the middle of the input (the flow step's call, after a small warm-up); loads
    Cellpose and the model (about 10 s) and runs a few seconds of network."""
    from ..cellpose.backends import make_backend
    from ..cellpose.flowfield import compute_flows
    from ..cellpose.precision import run_device
    from ..runner.blocks import backend_eval_kwargs

    nd = len(plan.shape)
    device = run_device(cfg.device)
    kind = device_kind(device)
    _, threads = parallel_ranks(kind, n_ranks, cores)
    edge = edge or (64 if nd == 3 else 256)
    t0 = time.perf_counter()
    seg = make_backend("cellpose", model_kwargs=cfg.model_kwargs,
                       eval_kwargs=backend_eval_kwargs(plan.settings, None),
                       resolved=plan.settings.resolved_model, device=device, threads=threads, ndim=nd,
                       precision=plan.settings.precision)
    load = time.perf_counter() - t0
    tile = _tile(src, plan, edge).astype(np.float32)
    small = tile[tuple(slice(0, min(16, n)) for n in tile.shape[:nd])]
    compute_flows(seg, small, tuple(slice(None) for _ in range(nd)), nd)   # warm-up
    t1 = time.perf_counter()
    _, net_vox = compute_flows(seg, tile, tuple(slice(None) for _ in range(nd)), nd)
    dt = time.perf_counter() - t1
    vox = int(np.prod(tile.shape[:nd]))
    return {"seconds_per_voxel": dt / vox, "load_seconds": round(load, 1), "tile": list(tile.shape[:nd]),
            "seconds": round(dt, 2), "device": device, "threads": threads,
            "basis": f"measured now: the run's model on a {'x'.join(map(str, tile.shape[:nd]))} tile of the input on "
                     f"{device}" + (f" with {threads} thread(s)" if threads else "")
                     + f", {dt:.1f} s"}


def estimate_for(cfg, plan, src, n_ranks: int, measure: bool = False) -> dict | None:
    """The estimate of a Cellpose run (None for other backends), measured when asked."""
    from ..cellpose.precision import run_device

    if cfg.backend != "cellpose" or not plan.kept:
        return None
    model = plan.resolved_model or {}
    measured = measure_network(cfg, plan, src, n_ranks) if measure else None
    out = estimate(plan, n_ranks, run_device(cfg.device), measured)
    if not measured and model.get("name") not in ("demo", "cyto3", "cyto2", "cyto", "nuclei", None):
        out["warning"] = (f"the calibration is for Cellpose 3's standard network; model {model.get('name')!r} may "
                          f"cost differently (Cellpose 4's cpsam tens of times more): add --measure")
    return out


def format_estimate(e: dict | None) -> list:
    """The plan's lines about the estimate."""
    if not e:
        return []
    cpu = (f"; on this machine's CPU {e['ranks_at_once']} rank(s) compute at once, {e['threads_per_rank']} "
           f"thread(s) each" if e["threads_per_rank"] else "")
    lines = [f"estimated wall on {e['ranks']} rank(s): {_human(e['wall_seconds'])} ({e['basis']}, {e['device']}{cpu}): "
             f"start-up {_human(e['startup_seconds'])}, network {_human(e['network_seconds'])} in "
             f"{e['network_units']} piece(s), mask step {_human(e['mask_seconds'])} in {e['mask_units']} block(s), "
             f"the rest {_human(e['rest_seconds'])}, shared by the ranks",
             f"  basis: {e['seconds_per_network_voxel'] * 1e6:.3g} s per megavoxel of network work x "
             f"{e['network_voxels'] / 1e6:.3g} megavoxels (3 orientations in 3D"
             + (f", x{e['network_scale']:g} for Cellpose's resizing" if e["basis"] == "calibrated" else "")
             + f"); {e['basis_detail']}; a rough guide (within ~2x), not a promise"]
    if e.get("warning"):
        lines.append(f"  {e['warning']}")
    return lines


def _human(seconds: float) -> str:
    s = float(seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
