"""Idle share of the segment phase with a 10x block-cost skew: static vs dynamic hand-out (issue 13).

    .venv/bin/python benchmarks/skew.py [--ranks 4 8] [--unit 0.1] [--json FILE]

The volume (32 x 64 x 128, blocks of 16^3: 64 blocks) is *tissue* on a 4x coarser map: the
first 30 % along y is all tissue (dense), the rest holds tissue in 10 % of its coarse voxels
(sparse); half of the tissue voxels are foreground.  The backend
(:class:`tests.segmenters.SkewedSleep`) thresholds and sleeps ``unit`` x clip(20 x foreground
fraction, 1, 10): a dense block costs 10x a sparse one.  Dense tissue is spatially coherent,
so the static schedule (contiguous runs in grid order) gives some ranks only dense blocks.

Each configuration runs under ``mpiexec -n N`` (this script's ``--worker`` mode): ``static``;
``dynamic`` without a mask (the cost estimate is the read volume only, so the order is the
grid order here); ``dynamic+mask`` with the coarse tissue map as ``--mask`` (the cost estimate
is read voxels x kept fraction, so dense blocks go first).  Every rank reports the seconds it
spent in its blocks (read, backend, numbering, scratch chunk and record) and the segment
phase's wall; idle share = 1 - sum(busy) / (ranks x wall of the segment phase, slowest rank).
Labels must be byte-identical across all configurations.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SHAPE, BLOCK, COARSE = (32, 64, 128), 16, 4


def make_volume(out_dir, seed=0):
    """(input path, mask path): the tissue map (coarse) and the image (uint8, 200 = foreground)."""
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    rng = np.random.default_rng(seed)
    cshape = tuple(s // COARSE for s in SHAPE)
    tissue = rng.random(cshape) < 0.1
    tissue[:, : int(round(0.3 * cshape[1])), :] = True             # the dense 30 %, spatially coherent
    full = np.repeat(np.repeat(np.repeat(tissue, COARSE, 0), COARSE, 1), COARSE, 2)
    image = np.where(full & (rng.random(SHAPE) < 0.5), 200, 0).astype(np.uint8)
    inp, mask = os.path.join(out_dir, "input.zarr"), os.path.join(out_dir, "mask.zarr")
    numpy_array_to_zarr(inp, image, BLOCK)
    numpy_array_to_zarr(mask, tissue.astype(np.uint8), cshape)
    return inp, mask


def worker(a) -> int:
    from mpi4py import MPI

    from mpicellpose.config import RunConfig
    from mpicellpose.runner.driver import run
    from mpicellpose.runner.phases import segment
    from segmenters import SkewedSleep

    busy = {"s": 0.0, "blocks": 0, "first": None, "last": None}
    seg_image, rec_block, phase = segment.segment_image, segment.record_block, segment.segment_phase
    started = {}

    def timed_segment(*args, **kw):
        started["t"] = time.time()
        busy["first"] = busy["first"] or started["t"]
        return seg_image(*args, **kw)

    def timed_record(*args, **kw):
        out = rec_block(*args, **kw)
        busy["last"] = time.time()
        busy["s"] += busy["last"] - started.pop("t")
        busy["blocks"] += 1
        return out

    def timed_phase(*args, **kw):
        busy["enter"] = time.time()
        out = phase(*args, **kw)
        busy["leave"] = time.time()
        return out

    segment.segment_image, segment.record_block, segment.segment_phase = timed_segment, timed_record, timed_phase
    comm = MPI.COMM_WORLD
    cfg = RunConfig(input=a.input, output=a.output, blocksize=BLOCK, backend=SkewedSleep(unit=a.unit),
                    mask=a.mask or None, schedule=a.schedule, work_dir=a.output + ".work", normalize="none")
    res = run(cfg, comm)
    rec = {"rank": comm.Get_rank(), "busy_s": busy["s"], "blocks": busy["blocks"], "slept_s": SkewedSleep.slept,
           "segment_s": res.timings["segment"], "enter": busy["enter"], "leave": busy["leave"],
           "first": busy["first"], "last": busy["last"]}
    with open(f"{a.output}.rank{comm.Get_rank():04d}.json", "w") as f:
        json.dump(rec, f)
    return 0


def labels_hash(path) -> str:
    import zarr

    return hashlib.sha256(np.ascontiguousarray(zarr.open(path, mode="r")[...]).tobytes()).hexdigest()[:16]


def launch(n, schedule, use_mask, inp, mask, out_dir, unit, timeout=600) -> dict:
    name = f"{schedule}{'+mask' if use_mask else ''}"
    out = os.path.join(out_dir, f"out-{n}-{name.replace('+', '-')}.zarr")
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [exe if os.path.exists(exe) else "mpiexec", "-n", str(n), sys.executable, os.path.abspath(__file__),
           "--worker", "--input", inp, "--output", out, "--schedule", schedule, "--unit", str(unit)]
    if use_mask:
        cmd += ["--mask", mask]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        return {"ranks": n, "schedule": name, "rc": proc.returncode, "stderr": proc.stderr[-3000:]}
    recs = [json.load(open(p)) for p in sorted(glob.glob(out + ".rank*.json"))]
    wall = max(r["segment_s"] for r in recs)
    busy = [r["busy_s"] for r in recs]
    res = {"ranks": n, "schedule": name, "rc": 0, "segment_wall_s": round(wall, 3),
           "busy_s": [round(b, 3) for b in busy], "blocks": [r["blocks"] for r in recs],
           "slept_s": round(sum(r["slept_s"] for r in recs), 3),
           "idle_share": round(1.0 - sum(busy) / (n * wall), 4), "labels_sha": labels_hash(out)}
    # where the idle time is (seconds, summed over ranks): before the first block, between blocks, after the last
    t0, t1 = min(r["enter"] for r in recs), max(r["leave"] for r in recs)
    act = [r for r in recs if r["first"] is not None]
    res["idle_where_s"] = {"head": round(sum(r["first"] - t0 for r in act), 3),
                           "between": round(sum(r["last"] - r["first"] - r["busy_s"] for r in act), 3),
                           "tail": round(sum(t1 - r["last"] for r in act), 3),
                           "phase_wall_s": round(t1 - t0, 3)}
    shutil.rmtree(out, ignore_errors=True)
    for p in glob.glob(out + ".*"):
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--unit", type=float, default=0.1, help="seconds a sparse block sleeps (dense: 10x)")
    p.add_argument("--configs", nargs="+", default=["static", "dynamic", "dynamic+mask"])
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--mask", default="", help=argparse.SUPPRESS)
    p.add_argument("--schedule", default="dynamic", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    out_dir = tempfile.mkdtemp(prefix="mpicellpose-skew-")
    try:
        inp, mask = make_volume(out_dir)
        results = []
        for n in a.ranks:
            for c in a.configs:
                r = launch(n, c.split("+")[0], c.endswith("+mask"), inp, mask, out_dir, a.unit)
                results.append(r)
                print(json.dumps(r), flush=True)
        ok = [r for r in results if r["rc"] == 0]
        same = len({r["labels_sha"] for r in ok}) == 1
        print(f"\n{'ranks':>5} {'schedule':>14} {'wall s':>8} {'idle share':>10}  blocks per rank")
        for r in ok:
            print(f"{r['ranks']:>5} {r['schedule']:>14} {r['segment_wall_s']:>8.2f} {100 * r['idle_share']:>9.1f}%  "
                  f"{r['blocks']}")
        print(f"labels byte-identical across all runs: {same}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"shape": SHAPE, "blocksize": BLOCK, "unit": a.unit, "results": results,
                           "labels_identical": same}, f, indent=1)
        return 0 if same and len(ok) == len(results) else 1
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
