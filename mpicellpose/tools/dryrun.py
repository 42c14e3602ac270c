"""What a run would do, without running it (``mpicellpose plan``): the plan of a configuration
(the same checks and decisions as ``segment``, nothing written), and the report about it: the
block grid, mask skipping, blocks per rank, overlap inflation, estimated memory per rank (and
per GPU for Cellpose 4), network work, scratch/output sizes, and warnings about risky settings."""
from __future__ import annotations

import os

import numpy as np

from ..cellpose.cellpose4 import CPSAM_NET, STANDIN_NET, gpu_memory_estimate
from ..grid import geometry as geo
from ..grid.cost import network_cost
from ..grid.boxes import BOX_BYTES_PER_VOXEL, largest_box_voxels
from ..runner import outputs
from ..runner.phases.plan import make_plan, open_volume
from ..runner.table import have_parquet
from ..runner.workdir import free_bytes
from .estimate import estimate_for


# Peak resident memory of one rank (bytes): a constant (Python, numpy, zarr, the MPI library; for
# Cellpose also torch, Cellpose and the model) plus bytes per voxel of the largest block's read
# region (the block as read, its float copy, the backend's working arrays: for Cellpose 3D the
# flows and probabilities of three orientations and the mask finding; the labels).  Fitted to the
# peak RSS (/usr/bin/time -v) of one-rank `segment` runs of one block of a uint16 volume on the
# CPU: the shipped model ('demo', Cellpose 3.1.1, torch 2.13 CPU) at 32^3, 64^3, 96^3, 128^3 and
# 192^3 voxels measured 854, 933, 1051, 1275 and 1672 MiB (this fit: within 8% of each); the
# threshold backend at 32^3 .. 192^3 measured 194 .. 387 MiB (within 3%).
# tests/test_plan_estimate.py checks the estimate against a run.
MEMORY_MODEL = {  # backend: (constant bytes, bytes per voxel of the read region)
    "cellpose": (915 * 2**20, 132),
    "threshold": (192 * 2**20, 29),
    "labels": (192 * 2**20, 29),
    "custom": (192 * 2**20, 40),
}


MEASURED_ITEMSIZE = 2  # the fits above are for one uint16 channel; other inputs add their difference


MEASURED_WEIGHTS = 13_323_142  # bytes of the shipped model's weights, part of the constant above


def memory_estimate(backend: str, read_voxels: int, itemsize: int = 2, channels: int = 1,
                    weights: int | None = None) -> dict:
    """Peak memory of one rank segmenting a block of ``read_voxels`` voxels (see MEMORY_MODEL);
    ``weights``: size of another model's weights file (counted twice: the file read, the network)."""
    const, per_voxel = MEMORY_MODEL.get(backend, MEMORY_MODEL["custom"])
    per_voxel += max(itemsize * channels - MEASURED_ITEMSIZE, 0)
    if backend == "cellpose" and weights:
        const += 2 * max(int(weights) - MEASURED_WEIGHTS, 0)
    return {"bytes": int(const + per_voxel * read_voxels), "constant": int(const), "per_voxel": int(per_voxel),
            "read_voxels": int(read_voxels)}


def with_flow_step(memory: dict, settings) -> dict:
    """Under ``--pipeline flows`` the flow and mask steps hold a flow box with its halo or overlap:
    the estimate is the larger of that and a block's (the box's from its arrays' sizes, not fitted)."""
    if settings.pipeline == "flows":
        vox = largest_box_voxels(settings.grid, settings.flow_box, settings.flow_halo)
        memory = dict(memory, flow_step_bytes=int(memory["constant"] + BOX_BYTES_PER_VOXEL * vox),
                      largest_box_voxels=int(vox))
        memory["bytes"] = max(memory["bytes"], memory["flow_step_bytes"])
    return memory


#: GPU memory assumed when ``--gpu-memory`` is not given (GiB): the smallest common data-centre GPU.
ASSUMED_GPU_GIB = 16.0


def cellpose4_network(cfg, model: dict):
    """The Cellpose 4 network a run loads (:data:`CPSAM_NET` or the stand-in's), None otherwise."""
    from ..cellpose.models import BUILTIN_V4, cellpose_version
    from ..cellpose.shipped import CP4_STANDIN_LOADER

    if cfg.backend != "cellpose":
        return None
    if model.get("loader") == CP4_STANDIN_LOADER:
        return STANDIN_NET
    if model.get("name") in BUILTIN_V4 or ((cellpose_version()[0] or 0) >= 4 and not model.get("loader")):
        return CPSAM_NET
    return None


def cellpose4_memory(cfg, plan, net, read_voxels: int, gpu_gib) -> tuple:
    """(GPU estimate, warning or None) for a Cellpose 4 network at the run's batch size and precision."""
    default = net is not STANDIN_NET  # the stand-in loads in fp32, cpsam in Cellpose 4's bf16
    bf16 = bool(cfg.model_kwargs.get("use_bfloat16", default if plan.precision is None else plan.precision == "bfloat16"))
    batch = int(plan.eval_kwargs.get("batch_size") or 8)
    gpu = gpu_memory_estimate(net, read_voxels, batch, bf16)
    limit = float(gpu_gib if gpu_gib is not None else ASSUMED_GPU_GIB) * 2**30
    gpu["device_bytes"] = int(limit)
    gpu["device_bytes_assumed"] = gpu_gib is None
    if gpu["bytes"] <= limit:
        return gpu, None
    said = f"{gpu_gib:g} GiB (--gpu-memory)" if gpu_gib is not None else \
        f"{ASSUMED_GPU_GIB:g} GiB (assumed; give --gpu-memory)"
    fix = ("smaller blocks (the mask step needs ~28-54 B per voxel of a block with its overlap)"
           if gpu["peak_step"] == "masks" else
           f"a smaller batch_size (--eval-kwargs '{{\"batch_size\": {max(1, batch // 2)}}}')")
    return gpu, (f"Cellpose 4 {net['name']} needs about {human_bytes(gpu['bytes'])} of GPU memory per rank "
                 f"({gpu['precision']} weights {human_bytes(gpu['weights'])}, {batch} tiles per batch "
                 f"{human_bytes(gpu['tiles'])}, mask step of the largest block {human_bytes(gpu['masks'])}, CUDA "
                 f"{human_bytes(gpu['cuda_overhead'])}) but a GPU has {said}: use {fix}")


def human_bytes(n: float) -> str:
    """``n`` bytes for a reader: ``512 B``, ``1.5 KB``, ... ``2.0 PB``."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} PB"


def plan_report(cfg, plan, src, n_ranks: int, gpu_memory=None, kind: str | None = None) -> dict:
    """Facts and warnings about a planned run (pure; reads nothing but metadata).  ``gpu_memory``:
    GiB per GPU, for the Cellpose 4 GPU estimate (default :data:`ASSUMED_GPU_GIB`); ``kind``: the
    input's kind (:func:`mpicellpose.volumes.readers.input_kind`)."""
    grid = plan.grid
    shape = plan.shape
    nvox = int(np.prod(shape, dtype=np.int64))
    nchan = 1 if plan.channel_axis is None else int(src.shape[plan.channel_axis])
    kept = plan.kept
    todo = [b for part in plan.segment_assignment for b in part]
    read_vox = sum(geo.box_size(grid.block(b).read) for b in kept)
    core_vox = sum(geo.box_size(grid.block(b).core) for b in kept)
    per_rank = [len(p) for p in plan.segment_assignment]
    biggest_read = max((geo.box_size(grid.block(b).read) for b in kept), default=0)
    backend = cfg.backend if isinstance(cfg.backend, str) else "custom"
    memory, net4 = _rank_memory(cfg, plan, src, backend, nchan, biggest_read)
    mem = memory["bytes"]
    inflation = read_vox / core_vox if core_vox else 0.0
    out_bytes = nvox * 4
    report = {
        "volume": list(shape), "dtype": str(np.dtype(src.dtype)), "channels": nchan,
        "blocksize": list(plan.blocksize), "overlap": list(plan.overlap), "grid": list(grid.grid_shape),
        "block_shape": [min(b, n) for b, n in zip(plan.blocksize, shape)],
        "blocks": len(grid), "blocks_kept": len(kept), "blocks_skipped_by_mask": len(grid) - len(kept),
        "blocks_done_earlier": len(plan.done), "blocks_to_segment": len(todo), "ranks": n_ranks,
        "blocks_per_rank": {"min": min(per_rank), "max": max(per_rank), "mean": round(float(np.mean(per_rank)), 2)},
        "overlap_inflation": round(inflation, 3), "stitch": plan.stitch_rule,
        "memory_per_rank_estimate_bytes": int(mem), "memory_model": memory, "scratch_bytes_max": int(core_vox * 4),
        "output_bytes_max": int(out_bytes), "work_dir": plan.work_dir, "model": plan.resolved_model,
        "output": plan.output.array, "voxel_size": plan.voxel_size,
        "writes": [[what, path] for what, path in
                   outputs.written_paths(plan.output, plan.work_dir, have_parquet())],
        "replaces": plan.replaces,
        "already_complete": _already_complete(cfg, plan),
        "network": network_cost(plan.settings, kept, cellpose=backend == "cellpose"),
        "precision": precision_facts(cfg, plan) if backend == "cellpose" else None,
        "work_dir_free_bytes": free_bytes(plan.work_dir),
        "warnings": [],
    }
    if net4 is not None:
        report["gpu_memory_estimate"], warning = cellpose4_memory(cfg, plan, net4, biggest_read, gpu_memory)
        if warning:
            report["warnings"].append(warning)
    report["warnings"] += _warnings(plan, report, src, inflation, n_ranks, len(todo), backend, net4, kind)
    return report


def _rank_memory(cfg, plan, src, backend: str, nchan: int, biggest_read: int) -> tuple:
    """(:func:`memory_estimate` of the largest block, with the flow step's; the Cellpose 4 network
    the run loads or None)."""
    itemsize = np.dtype(src.dtype).itemsize
    model = plan.resolved_model or {}
    weights = os.path.getsize(model["path"]) if model.get("path") and os.path.isfile(model["path"]) else None
    net4 = cellpose4_network(cfg, model)
    if net4 is CPSAM_NET and weights is None:  # to be downloaded: the fp32 file
        weights = 4 * CPSAM_NET["parameters"]
    return with_flow_step(memory_estimate(backend, biggest_read, itemsize, nchan, weights), plan.settings), net4


def _warnings(plan, report, src, inflation: float, n_ranks: int, n_todo: int, backend: str, net4,
              kind=None) -> list:
    """The warnings about risky settings, after the Cellpose 4 GPU memory's."""
    w = []
    mem, model = report["memory_per_rank_estimate_bytes"], plan.resolved_model or {}
    if inflation > 2.5:
        what = (f"the mask step works on {inflation:.1f}x the output voxels (the network on "
                f"{report['network']['flows_per_voxel']}x)" if plan.pipeline == "flows" else
                f"{inflation:.1f}x the output voxels are segmented")
        w.append(f"blocks are small relative to the overlap: {what}; larger blocks (or a smaller overlap) waste less")
    if mem > 32 * 2**30:
        w.append(f"the largest block needs about {human_bytes(mem)} per rank; smaller blocks lower the risk of "
                 "running out of memory")
    if backend == "cellpose" and model.get("name") != "demo" and net4 is None:
        w.append("the memory estimate was measured with the shipped model (Cellpose 3); other models may need more "
                 "(Cellpose 4's cpsam much more): check a first run's peak memory")
    if n_ranks > n_todo and n_todo:
        w.append(f"more ranks than blocks: {n_ranks} ranks for {n_todo} block(s) to segment, so "
                 f"{n_ranks - n_todo} rank(s) will idle (they wait for the others and the run finishes, but "
                 f"their memory and GPUs are wasted); use at most {n_todo} rank(s), or a smaller --blocksize "
                 f"to give every rank work")
    net = report["network"]
    boxes = net.get("flow_boxes", 0)
    if plan.pipeline == "flows" and n_todo and n_ranks > boxes >= 1 and not n_ranks > n_todo:
        w.append(f"more ranks than flow boxes: {n_ranks} ranks for {boxes} flow box(es) of {net.get('flow_box')} "
                 f"block(s) per side, so {n_ranks - boxes} rank(s) will idle in the flow and mask steps; "
                 f"--flow-box 1 gives more boxes (the network then sees a halo where they meet), or use fewer ranks")
    free = report["work_dir_free_bytes"]
    if plan.pipeline == "flows" and free is not None and net["flow_scratch_bytes"] > free:
        w.append(f"the flow-box shells need {human_bytes(net['flow_scratch_bytes'])} in the work directory but its file "
                 f"system has {human_bytes(free)} free: segment will refuse; choose --work-dir elsewhere or --pipeline "
                 f"blocks")
    chunks = getattr(src, "chunks", None)
    if chunks and kind in (None, "array", "zarr", "ome-zarr", "hdf5", "n5"):  # a TIFF's pages are not the user's choice
        sp = [c for i, c in enumerate(chunks) if i != plan.channel_axis]
        if any(b % c for b, c in zip(plan.blocksize, sp)):
            w.append(f"blocksize {tuple(plan.blocksize)} is not a multiple of the input chunks {tuple(sp)}: "
                     "neighbouring blocks read the same chunks")
    return w


def precision_facts(cfg, plan) -> dict:
    """The network's precision for this run, why, and whether the device computes bfloat16 natively."""
    from ..cellpose.models import cellpose_version
    from ..cellpose.precision import bf16_support, model_precision, run_device

    device = run_device(cfg.device)
    native, why = bf16_support(device)
    own = model_precision(cellpose_version()[0], plan.resolved_model, cfg.model_kwargs)
    return {"precision": plan.precision or own, "why": plan.precision_why, "device": device,
            "bf16_native": native, "bf16_why": why}


def _already_complete(cfg, plan) -> bool:
    """OUTPUT is the finished output of this very configuration: segment would do nothing."""
    return outputs.finished_marker(plan.output, cfg.restart, plan.run_id) is not None


def dry_run(cfg, n_ranks: int, gpu_memory=None, measure: bool = False) -> dict:
    """The report (:func:`plan_report`) of the plan ``segment`` would make for ``cfg`` on ``n_ranks``
    ranks: every check of a run, nothing written, nothing segmented; with its wall-time estimate
    (``measure``: the network timed on a tile of the input, see :mod:`mpicellpose.tools.estimate`)."""
    vol = open_volume(cfg)
    plan = make_plan(cfg, vol, n_ranks, prepare=False)
    report = plan_report(cfg, plan, vol.array, n_ranks, gpu_memory, vol.kind)
    report["time_estimate"] = estimate_for(cfg, plan, vol.array, n_ranks, measure)
    return report
