"""``mpicellpose plan``: a dry run.  Validates everything ``segment`` would, writes nothing,
and reports the block grid, mask skipping, blocks per rank, overlap inflation, estimated
memory per rank and scratch/output sizes, with warnings about risky settings (the report is
:mod:`mpicellpose.tools.dryrun`'s; here: the options and the text)."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError, MpiCellposeError
from ..grid.boxes import BOX_BYTES_PER_VOXEL
from ..tools.dryrun import ASSUMED_GPU_GIB, dry_run, human_bytes
from ..tools.estimate import format_estimate
from .common import _group, _one_line, add_input_output, add_run_arguments, cli_message, config_from_args, exit_code


def format_report(r: dict) -> str:
    lines = [
        f"volume {tuple(r['volume'])} {r['dtype']}" + (f", {r['channels']} channels" if r["channels"] > 1 else ""),
        f"blocks {tuple(r['block_shape'])}"
        + (f" (--blocksize {','.join(map(str, r['blocksize']))} clipped to the volume)"
           if r["block_shape"] != r["blocksize"] else "")
        + f", overlap {tuple(r['overlap'])} per side, grid {tuple(r['grid'])} = {r['blocks']} blocks",
        f"  kept by the mask {r['blocks_kept']}, skipped {r['blocks_skipped_by_mask']}, "
        f"already done {r['blocks_done_earlier']}, to segment {r['blocks_to_segment']}",
        f"ranks {r['ranks']}: blocks per rank min {r['blocks_per_rank']['min']}, "
        f"mean {r['blocks_per_rank']['mean']}, max {r['blocks_per_rank']['max']}",
        f"overlap inflation {r['overlap_inflation']}x (voxels segmented / voxels written); stitching {r['stitch']}",
        f"memory per rank (estimate, CPU) {human_bytes(r['memory_per_rank_estimate_bytes'])}: "
        f"{human_bytes(r['memory_model']['constant'])} for Python, the libraries and the model + "
        f"{r['memory_model']['per_voxel']} B x {r['memory_model']['read_voxels']:,} voxels of the largest block "
        f"with its overlap" + (f"; the flow step {human_bytes(r['memory_model']['flow_step_bytes'])} "
                               f"(~{BOX_BYTES_PER_VOXEL} B x {r['memory_model']['largest_box_voxels']:,} voxels "
                               f"of the largest flow box with its overlap)" if "flow_step_bytes" in r["memory_model"] else ""),
        _scratch_line(r),
    ]
    lines += _gpu_lines(r)
    lines += _network_lines(r)
    p = r.get("precision")
    if p:
        lines.append(f"network precision {p['precision']}" + (f" ({p['why']})" if p["why"] else "")
                     + f"; bfloat16 on {p['device']}: {'native' if p['bf16_native'] else 'emulated'} ({p['bf16_why']})")
    lines += format_estimate(r.get("time_estimate"))
    lines.append("writes:")
    lines += [f"  {what}: {path}" for what, path in r["writes"]]
    if r.get("already_complete"):
        lines.append(f"{r['output']} is already complete with this configuration: segment would only say so "
                     "(pass --restart to compute it again)")
    if r.get("replaces"):
        lines.append(f"replaces (--overwrite): {r['replaces']}")
    if r.get("model"):
        lines.append(f"model {r['model'].get('name')} ({r['model'].get('path')})")
    for msg in r["warnings"]:
        lines.append(f"warning: {msg}")
    return "\n".join(lines) + "\n"


def _scratch_line(r: dict) -> str:
    """The work directory's and the output's sizes (the flow field included under --pipeline flows)."""
    net = r.get("network") or {}
    flows = net.get("flow_scratch_bytes", 0) if net.get("pipeline") == "flows" else 0
    work = r["scratch_bytes_max"] + flows
    return (f"work directory up to {human_bytes(work)}"
            + (f" (labels {human_bytes(r['scratch_bytes_max'])} + flow-box shells {human_bytes(flows)} at the "
               f"sweep's peak)" if flows else "")
            + f", output up to {human_bytes(r['output_bytes_max'])}, before compression")


def _gpu_lines(r: dict) -> list:
    g = r.get("gpu_memory_estimate")
    if not g:
        return []
    assumed = " (assumed)" if g["device_bytes_assumed"] else ""
    return [f"GPU memory per rank (estimate, Cellpose 4 {g['network']}, {g['precision']}, batch_size "
            f"{g['batch_size']}) {human_bytes(g['bytes'])}: weights {human_bytes(g['weights'])} + max(network "
            f"{human_bytes(g['tiles'])}, mask step {human_bytes(g['masks'])}) + CUDA "
            f"{human_bytes(g['cuda_overhead'])}; GPU {human_bytes(g['device_bytes'])}{assumed}"]


def _network_lines(r: dict) -> list:
    """What the network costs under each pipeline, and the flow field's size."""
    net = r.get("network") or {}
    if "flows_per_voxel" not in net:
        return []
    mark = {"flows": "", "blocks": ""}
    mark[net["pipeline"]] = " <- this run"
    free = r.get("work_dir_free_bytes")
    k, parts = net.get("flow_box", 1), net.get("fs_bytes_per_voxel_parts", {})
    return [f"network evaluations per output voxel: {net['flows_per_voxel']} with --pipeline flows (flow boxes "
            f"of {k} block(s) per side, in-plane halo {net['flow_halo']}){mark['flows']}, "
            f"{net['blocks_per_voxel']} with --pipeline blocks{mark['blocks']}",
            f"file system under --pipeline flows, beyond the input once and the labels once, before compression: "
            f"{net['fs_bytes_per_voxel']} B per output voxel (input halo {parts.get('input_extra')}, shells written "
            f"{parts.get('shells_written')}, read {parts.get('shells_read')}, label scratch "
            f"{parts.get('label_scratch')}); {net['flow_boxes']} flow box(es)",
            f"flow-box shells at the sweep's peak: {human_bytes(net['flow_scratch_bytes'])} in the work directory"
            + (f" ({human_bytes(free)} free there)" if free is not None else "")
            + f"; at most {net['files_per_directory']} entries in any directory there"]


def register(sub) -> None:
    p = sub.add_parser("plan", help="dry run: show the block grid, blocks per rank, memory and sizes",
                       description="Validate a segment command and report its plan without running it or "
                                   "writing anything (no GPU needed). It takes the same arguments as segment, "
                                   "plus --ranks and --json.",
                       epilog="example: mpicellpose plan stack.tif labels.zarr --blocksize 256 --ranks 8 "
                              "(then run the same arguments with mpirun ... mpicellpose segment)")
    g = _group(p, "plan report")
    g.add_argument("--ranks", type=int, default=None, metavar="N",
                   help="number of ranks to plan for (default: the number of processes the launcher started, "
                        "1 without mpirun/srun)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                   help=f"memory of one GPU, for the Cellpose 4 (cpsam) GPU estimate and its warning (default: "
                        f"{ASSUMED_GPU_GIB:g}, assumed)")
    g.add_argument("--measure", action="store_true",
                   help="time the network on a small tile of the input with the run's model on this device "
                        "(about 10-30 s) for the wall-time estimate, instead of the calibrated rates")
    add_input_output(p, "the labels array segment would create")
    add_run_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    """Plan once whatever the launcher: under mpirun/srun rank 0 plans and prints, the other
    ranks wait (without spinning) and return its exit code."""
    from .. import comm as mpi

    world = mpi.world()
    if world.Get_size() == 1:
        return _plan_and_print(args, 1)
    comm = mpi.dup(world)
    try:
        box = mpi.Mailbox(comm)
        rc = _plan_and_print(args, box.size) if box.rank == 0 else None
        return int(box.bcast(rc, "plan: rank 0's answer"))
    finally:
        mpi.free(comm)


def _plan_and_print(args, launched: int) -> int:
    ranks = args.ranks if args.ranks is not None else launched
    ns = args
    try:
        if ranks < 1:
            raise ConfigError(f"--ranks must be >= 1, got --ranks {ranks}")
        ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("ranks", "json", "gpu_memory", "measure")})
        report = dry_run(config_from_args(ns), ranks, getattr(args, "gpu_memory", None), getattr(args, "measure", False))
    except (MpiCellposeError, ValueError, FileNotFoundError, OSError) as exc:
        sys.stderr.write(f"mpicellpose: error: {cli_message(exc, ns)}\n")
        return exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - the other ranks wait for rank 0's answer
        sys.stderr.write(f"mpicellpose: error: {type(exc).__name__}: {_one_line(exc)}\n")
        return 1
    sys.stdout.write(json.dumps(report, indent=1, default=str) + "\n" if args.json else format_report(report))
    sys.stdout.flush()
    return 0
