"""File-system bytes per output voxel of both pipelines, side by side (issue 23).

    nice -n 5 .venv/bin/python benchmarks/fs_bytes.py [--ranks 2] [--json FILE]

What is counted: ``/proc/self/io`` ``rchar + wchar`` of every rank (every read and write system
call: what the run asks of the file system, page cache or not), from after the libraries are
imported to the end of the run, summed over the ranks.  Two volumes of the same kind (synthetic
nuclei, diameter 16, the stand-in network ``standin-flows``) are run with the same settings: the
difference of their counts divided by the difference of their voxels is the cost per added
output voxel, so what does not grow with the volume (the plan, the model, the logs) cancels.  From
that the bytes of reading the input once and writing the labels once (each array's size on disk,
also as a difference) are taken away: what is left is what the pipeline itself moves (flow
field or shells, label scratch, records, the image read more than once).

The configurations: 64^3 and 128^3 blocks, each under ``--pipeline blocks`` and ``--pipeline
flows`` with the automatic flow box (which on these volumes spans the volume, so no shell is
written), and under ``flows`` with boxes small enough that shells are exchanged (``--flow-box``
2 for 64^3 blocks, 1 for 128^3), so the shells' cost is measured, not only avoided.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _bench_util import machine_info  # noqa: E402
from scale_flows import IO_KEYS, count_tree, proc_io  # noqa: E402

SIZES = ((256, 256, 256), (320, 256, 256))
CONFIGS = ((64, "blocks", None), (64, "flows", None), (64, "flows", 2),
           (128, "blocks", None), (128, "flows", None), (128, "flows", 1))


def make_volume(path, shape, seed=5) -> None:
    from mpicellpose.synthetic.nuclei import make_nuclei
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    img, _ = make_nuclei(tuple(shape), seed=seed, mean_diameter=16.0, touching_fraction=0.0, min_gap=3.0,
                         intensity_jitter=0.0)
    numpy_array_to_zarr(path, img, (64, 64, 64))


def worker(a) -> int:
    import cellpose.models  # noqa: F401 - imported before the counters start
    import torch  # noqa: F401
    from mpi4py import MPI

    from mpicellpose.config import RunConfig
    from mpicellpose.runner.driver import run

    comm = MPI.COMM_WORLD
    io0, t0 = proc_io(), time.perf_counter()
    res = run(RunConfig(input=a.input, output=a.output, blocksize=a.blocksize, pipeline=a.pipeline,
                        flow_box=a.flow_box, eval_kwargs={"diameter": 16.0},
                        model_kwargs={"pretrained_model": "standin-flows"}, threads=1, device="cpu",
                        work_dir=a.output + ".work"), comm)
    io1 = proc_io()
    rec = {"rank": comm.Get_rank(), "wall_s": round(time.perf_counter() - t0, 3), "n_objects": res.n_objects,
           "io": {k: io1[k] - io0[k] for k in IO_KEYS}, "cost": res.stats.get("cost", {})}
    with open(f"{a.output}.rank{comm.Get_rank():04d}.json", "w") as f:
        json.dump(rec, f)
    return 0


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def one_run(a, inp, out, bs, pipeline, fbox) -> dict:
    for p in glob.glob(out[:-len(".zarr")] + ".*"):
        os.remove(p) if os.path.isfile(p) else shutil.rmtree(p, ignore_errors=True)
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [exe, "-n", str(a.ranks), sys.executable, __file__, "--worker", "--input", inp, "--output", out,
           "--blocksize", str(bs), "--pipeline", pipeline] + (["--flow-box", str(fbox)] if fbox else [])
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    if proc.returncode:
        raise SystemExit(f"{cmd}: rc {proc.returncode}\n{proc.stderr[-3000:]}")
    recs = [json.load(open(p)) for p in sorted(glob.glob(out + ".rank*.json"))]
    rw = sum(r["io"]["rchar"] + r["io"]["wchar"] for r in recs)
    cost = recs[0]["cost"]
    return {"rw": rw, "wall": round(time.time() - t0, 1), "out_bytes": dir_bytes(out), "objects": recs[0]["n_objects"],
            "flow_box": cost.get("flow_box"), "planned_fs_bytes_per_voxel": cost.get("fs_bytes_per_voxel"),
            "measured_shell_bytes": (cost.get("measured_shell_bytes_written", 0) or 0)
            + (cost.get("measured_shell_bytes_read", 0) or 0), "output_tree": count_tree(out)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--pipeline", default="flows")
    p.add_argument("--flow-box", type=int, default=None)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--dir", default="/tmp/mpicellpose-fs-bytes")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    os.makedirs(a.dir, exist_ok=True)
    inputs = []
    for shape in SIZES:
        path = os.path.join(a.dir, "in_" + "x".join(map(str, shape)) + ".zarr")
        if not os.path.exists(path):
            make_volume(path, shape)
        inputs.append((path, int(shape[0]) * shape[1] * shape[2], dir_bytes(path)))
    rows = []
    for bs, pipeline, fbox in CONFIGS:
        runs = [one_run(a, inp, os.path.join(a.dir, f"out{i}.zarr"), bs, pipeline, fbox) for i, (inp, _, _) in
                enumerate(inputs)]
        dv = inputs[1][1] - inputs[0][1]
        d_in, d_out = inputs[1][2] - inputs[0][2], runs[1]["out_bytes"] - runs[0]["out_bytes"]
        per = (runs[1]["rw"] - runs[0]["rw"]) / dv
        row = {"blocksize": bs, "pipeline": pipeline, "flow_box": runs[1]["flow_box"], "ranks": a.ranks,
               "rw_bytes_per_added_voxel": round(per, 2), "input_bytes_per_voxel": round(d_in / dv, 2),
               "labels_bytes_per_voxel": round(d_out / dv, 2),
               "beyond_input_and_labels": round(per - d_in / dv - d_out / dv, 2),
               "planned_fs_bytes_per_voxel": runs[1]["planned_fs_bytes_per_voxel"],
               "shell_bytes_per_voxel": round(runs[1]["measured_shell_bytes"] / inputs[1][1], 2),
               "objects": [r["objects"] for r in runs], "wall_s": [r["wall"] for r in runs]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'blocks':>7} {'pipeline':>8} {'box':>4} {'B/voxel beyond input+labels':>28} {'planned':>8} {'walls s':>14}")
    for r in rows:
        print(f"{r['blocksize']:>5}^3 {r['pipeline']:>8} {str(r['flow_box'] or '-'):>4} "
              f"{r['beyond_input_and_labels']:>28} {str(r['planned_fs_bytes_per_voxel'] or '-'):>8} "
              f"{str(r['wall_s']):>14}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine_info(), "sizes": SIZES, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
