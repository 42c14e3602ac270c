"""The flows pipeline at cluster scale: a wall model for 128 ranks / 10^11 voxels and 1024 ranks /
10^12 voxels, from the planned grid and measured points (issue 23).

    .venv/bin/python benchmarks/flows_model.py [--fs-bytes benchmarks/results/...-fs-bytes.json]
                                               [--plan-scale benchmarks/results/...-plan-scale-1e6.json]
                                               [--gpu-mvox 5] [--fs-gbs 100] [--markdown]

Per target: cubes of the given voxels in 128^3 blocks, diameter 30 (overlap 60, flow halo 16), the
automatic flow box (what ``plan`` would choose), one rank per GPU.  Assumptions, stated:

* **network**: ``--gpu-mvox`` million output voxels per second per GPU for Cellpose's whole 3D
  network (three orientations) at 1 evaluation per voxel; the run needs ``flows_per_voxel`` (the
  box halo) of it (:func:`mpicellpose.grid.cost.network_cost`, on the real grid);
* **file system**: ``--fs-gbs`` GB/s for the whole job, every byte counted once.  Bytes per voxel:
  the planned model (:func:`mpicellpose.grid.cost.flows_io`, before compression), and the same with
  the compression ratios measured on synthetic nuclei (``--fs-bytes``: the input's and the labels'
  bytes on disk per voxel; the label scratch is compressed like the labels; the shells, half-precision
  flows, are taken as incompressible);
* **overlap**: on a GPU rank the next box's image is read in a thread while the GPU works
  (``--read-ahead``), its shell is written by a writer thread, the neighbours' shells are read and
  the label scratch written by the mask thread (``--masks-during-flows``), so those bytes overlap the
  network; the relabel pass (label scratch read, labels written) does not.  The table gives both
  the compression measured on synthetic nuclei and none (every label byte uncompressed, the worst
  case): the relabel pass is what the labels' compression decides;
* **the mask step** runs in a CPU thread beside the GPU and is hidden while it is faster than the
  network; it is not counted (its rate on a GPU node is not measured here);
* **bookkeeping per rank**: the plan received (``--plan-scale``: unpickled at 10^6 blocks, scaled to
  the target's blocks), the flows phase's bookkeeping (the same file), stitching, relabel and table
  (``docs/scale.md``'s fitted model without its contention term: 6.8 s at 10^9 objects and 1024
  ranks), and a start-up of 30 s (imports and the model; 7-25 s measured here).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mpicellpose.grid import geometry as geo  # noqa: E402
from mpicellpose.grid.boxes import auto_flow_box  # noqa: E402
from mpicellpose.grid.cost import network_cost  # noqa: E402

TARGETS = {"(a) 128 ranks, 1e11 voxels": (128, 1e11), "(b) 1024 ranks, 1e12 voxels": (1024, 1e12)}
STITCH_TABLE_S = 6.8     # docs/scale.md: merge+relabel+table CPU per rank at 1024 ranks, 1e9 objects
STARTUP_S = 30.0


def settings_for(voxels: float):
    side = int(round(voxels ** (1 / 3)))
    grid = geo.BlockGrid((side,) * 3, (128,) * 3, (60,) * 3)
    return SimpleNamespace(grid=grid, shape=grid.shape, flow_halo=16, flow_box=auto_flow_box(grid, 16),
                           pipeline="flows", eval_kwargs={"diameter": 30.0}, resolved_model=True)


def model(P, V, a, fs_points, plan_points) -> dict:
    s = settings_for(V)
    blocks = len(s.grid)
    kept = range(blocks)
    c = network_cost(s, kept, n_ranks=P)
    parts = c["fs_bytes_per_voxel_parts"]
    in_ratio = fs_points.get("input_ratio", 1.0)
    lab_ratio = fs_points.get("labels_ratio", 1.0)
    network = V * c["flows_per_voxel"] / (a.gpu_mvox * 1e6 * P)
    bw = a.fs_gbs * 1e9
    overlapped = V * (2 * in_ratio * (1 + parts["input_extra"] / 2) + parts["shells_read"] + parts["shells_written"]
                      + 4 * lab_ratio) / bw
    exposed = V * (4 * lab_ratio + 4 * lab_ratio) / bw
    scale = blocks / plan_points.get("blocks", blocks)
    book = (plan_points.get("unpickle_cpu_s", 0.0) + plan_points.get("flows_cpu_s", 0.0)) * scale + STITCH_TABLE_S
    hidden = max(0.0, overlapped - network)  # overlapped I/O longer than the network shows in the wall
    wall = network + hidden + exposed + book + STARTUP_S
    return {"ranks": P, "voxels": V, "blocks": blocks, "flow_box": s.flow_box, "flow_boxes": c["flow_boxes"],
            "flows_per_voxel": c["flows_per_voxel"], "fs_bytes_beyond_input_and_labels": c["fs_bytes_per_voxel"],
            "fs_bytes_total_per_voxel": round(2 * in_ratio * (1 + parts["input_extra"] / 2) + parts["shells_read"]
                                              + parts["shells_written"] + 12 * lab_ratio, 2),
            "scratch_peak_bytes": c["flow_scratch_peak_bytes"], "input_bytes": 2 * V,
            "files_per_directory": c["files_per_directory"],
            "network_s": round(network, 1), "io_overlapped_s": round(overlapped, 1), "io_exposed_s": round(exposed, 1),
            "bookkeeping_s": round(book, 1), "startup_s": STARTUP_S, "wall_s": round(wall, 1),
            "not_network_share": round(1 - network / wall, 3)}


def load_points(a):
    fs, plan = {}, {}
    if a.fs_bytes and os.path.exists(a.fs_bytes):
        rows = json.load(open(a.fs_bytes))["rows"]
        fs = {"input_ratio": max(r["input_bytes_per_voxel"] for r in rows) / 2.0,
              "labels_ratio": max(r["labels_bytes_per_voxel"] for r in rows) / 4.0}
    if a.plan_scale and os.path.exists(a.plan_scale):
        d = json.load(open(a.plan_scale))
        plan = {"blocks": d["blocks"], "unpickle_cpu_s": d["plan_unpickle_every_rank"]["cpu_s"],
                "flows_cpu_s": d["rank_flows_bookkeeping"]["cpu_s"]}
    return fs, plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    res = os.path.join(HERE, "results")
    p.add_argument("--fs-bytes", default=os.path.join(res, "2026-12-05-fs-bytes.json"))
    p.add_argument("--plan-scale", default=os.path.join(res, "2026-12-05-plan-scale-1e6.json"))
    p.add_argument("--gpu-mvox", type=float, default=5.0)
    p.add_argument("--fs-gbs", type=float, default=100.0)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    fs, plan = load_points(a)
    out = {}
    for name, (P, V) in TARGETS.items():
        out[name + ", compression as measured"] = model(P, V, a, fs, plan)
        out[name + ", uncompressed"] = model(P, V, a, {}, plan)
    if not a.markdown:
        print(json.dumps({"assumed": vars(a), "measured": {"fs": fs, "plan": plan}, "targets": out}, indent=1))
        return 0
    keys = ["blocks", "flow_box", "flows_per_voxel", "fs_bytes_beyond_input_and_labels", "fs_bytes_total_per_voxel",
            "scratch_peak_bytes", "input_bytes", "files_per_directory", "network_s", "io_overlapped_s", "io_exposed_s",
            "bookkeeping_s", "startup_s", "wall_s", "not_network_share"]
    print("| | " + " | ".join(out) + " |\n|---|" + "---|" * len(out))
    for k in keys:
        vals = [out[n][k] for n in out]
        vals = [f"{v / 2**40:.2f} TiB" if k.endswith("bytes") and isinstance(v, (int, float)) and v > 2**36 else v
                for v in vals]
        print(f"| {k} | " + " | ".join(str(v) for v in vals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
