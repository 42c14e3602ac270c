"""``mpicellpose plan``: a dry run.  Validates everything ``segment`` would, writes nothing,
and reports the block grid, mask skipping, blocks per rank, overlap inflation, estimated
memory per rank and scratch/output sizes, with warnings about risky settings."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .. import geometry as geo
from .. import outputs
from ..errors import MpiCellposeError
from ..table import have_parquet
from .common import _group, _one_line, add_input_output, add_run_arguments, config_from_args

# bytes per voxel of a block's read region held at once, beyond the input itself:
# float32 copy, backend labels, local labels (uint32), and for Cellpose 3D the flows and
# cell probability of the three orientations (measured order of magnitude, see README)
WORK_BYTES_PER_VOXEL = {"cellpose": 40, "threshold": 13, "custom": 16}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} PB"


def plan_report(cfg, plan, src, n_ranks: int) -> dict:
    """Facts and warnings about a planned run (pure; reads nothing but metadata)."""
    grid = plan.grid
    shape = plan.shape
    nvox = int(np.prod(shape, dtype=np.int64))
    itemsize = np.dtype(src.dtype).itemsize
    nchan = 1 if plan.channel_axis is None else int(src.shape[plan.channel_axis])
    kept = plan.kept
    todo = [b for part in plan.segment_assignment for b in part]
    read_vox = sum(geo.box_size(grid.block(b).read) for b in kept)
    core_vox = sum(geo.box_size(grid.block(b).core) for b in kept)
    per_rank = [len(p) for p in plan.segment_assignment]
    biggest_read = max((geo.box_size(grid.block(b).read) for b in kept), default=0)
    backend = cfg.backend if isinstance(cfg.backend, str) else "custom"
    mem = biggest_read * (itemsize * nchan + WORK_BYTES_PER_VOXEL[backend])
    inflation = read_vox / core_vox if core_vox else 0.0
    out_bytes = nvox * 4
    report = {
        "volume": list(shape), "dtype": str(np.dtype(src.dtype)), "channels": nchan,
        "blocksize": list(plan.blocksize), "overlap": list(plan.overlap), "grid": list(grid.grid_shape),
        "blocks": len(grid), "blocks_kept": len(kept), "blocks_skipped_by_mask": len(grid) - len(kept),
        "blocks_done_earlier": len(plan.done), "blocks_to_segment": len(todo), "ranks": n_ranks,
        "blocks_per_rank": {"min": min(per_rank), "max": max(per_rank), "mean": round(float(np.mean(per_rank)), 2)},
        "overlap_inflation": round(inflation, 3), "stitch": plan.stitch_rule,
        "memory_per_rank_estimate_bytes": int(mem), "scratch_bytes_max": int(core_vox * 4),
        "output_bytes_max": int(out_bytes), "work_dir": plan.work_dir, "model": plan.resolved_model,
        "output": plan.output.array, "voxel_size": plan.voxel_size,
        "writes": [[what, path] for what, path in
                   outputs.written_paths(plan.output, plan.work_dir, have_parquet())],
        "replaces": plan.replaces,
        "warnings": [],
    }
    w = report["warnings"]
    if inflation > 2.5:
        w.append(f"blocks are small relative to the overlap: {inflation:.1f}x the output voxels are segmented; "
                 f"larger blocks (or a smaller overlap) waste less")
    if mem > 32 * 2**30:
        w.append(f"the largest block needs about {_human(mem)} per rank; smaller blocks lower the risk of "
                 "running out of memory")
    if n_ranks > len(todo) and todo:
        w.append(f"{n_ranks} ranks for {len(todo)} blocks: {n_ranks - len(todo)} rank(s) will idle")
    chunks = getattr(src, "chunks", None)
    if chunks:
        sp = [c for i, c in enumerate(chunks) if i != plan.channel_axis]
        if any(b % c for b, c in zip(plan.blocksize, sp)):
            w.append(f"blocksize {tuple(plan.blocksize)} is not a multiple of the input chunks {tuple(sp)}: "
                     "neighbouring blocks read the same chunks")
    return report


def format_report(r: dict) -> str:
    lines = [
        f"volume {tuple(r['volume'])} {r['dtype']}" + (f", {r['channels']} channels" if r["channels"] > 1 else ""),
        f"blocks {tuple(r['blocksize'])}, overlap {tuple(r['overlap'])} per side, grid {tuple(r['grid'])} = "
        f"{r['blocks']} blocks",
        f"  kept by the mask {r['blocks_kept']}, skipped {r['blocks_skipped_by_mask']}, "
        f"already done {r['blocks_done_earlier']}, to segment {r['blocks_to_segment']}",
        f"ranks {r['ranks']}: blocks per rank min {r['blocks_per_rank']['min']}, "
        f"mean {r['blocks_per_rank']['mean']}, max {r['blocks_per_rank']['max']}",
        f"overlap inflation {r['overlap_inflation']}x (voxels segmented / voxels written); stitching {r['stitch']}",
        f"memory per rank (estimate) {_human(r['memory_per_rank_estimate_bytes'])}; scratch up to "
        f"{_human(r['scratch_bytes_max'])}, output up to {_human(r['output_bytes_max'])} before compression",
    ]
    lines.append("writes:")
    lines += [f"  {what}: {path}" for what, path in r["writes"]]
    if r.get("replaces"):
        lines.append(f"replaces (--overwrite): {r['replaces']}")
    if r.get("model"):
        lines.append(f"model {r['model'].get('name')} ({r['model'].get('path')})")
    for msg in r["warnings"]:
        lines.append(f"warning: {msg}")
    return "\n".join(lines) + "\n"


def register(sub) -> None:
    p = sub.add_parser("plan", help="dry run: show the block grid, blocks per rank, memory and sizes",
                       description="Validate a segment command and report its plan without running it or "
                                   "writing anything (no GPU needed). It takes the same arguments as segment, "
                                   "plus --ranks and --json.",
                       epilog="example: mpicellpose plan stack.tif labels.zarr --blocksize 256 --ranks 8 "
                              "(then run the same arguments with mpirun ... mpicellpose segment)")
    g = _group(p, "plan report")
    g.add_argument("--ranks", type=int, default=1, metavar="N", help="number of ranks to plan for (default 1)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    add_input_output(p, "the labels array segment would create")
    add_run_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from ..phases.plan import make_plan, open_volume

    ranks = args.ranks
    try:
        if ranks < 1:
            raise ValueError(f"--ranks must be >= 1, got {ranks}")
        ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("ranks", "json")})
        cfg = config_from_args(ns)
        vol = open_volume(cfg)
        plan = make_plan(cfg, vol, ranks, prepare=False)
        report = plan_report(cfg, plan, vol.array, ranks)
    except (MpiCellposeError, ValueError, FileNotFoundError, OSError) as exc:
        sys.stderr.write(f"mpicellpose: error: {_one_line(exc)}\n")
        return 1
    sys.stdout.write(json.dumps(report, indent=1, default=str) + "\n" if args.json else format_report(report))
    return 0
