"""Scale series of the flows pipeline (issue 23): ``--pipeline flows`` with the stand-in network.

    nice -n 5 .venv/bin/python benchmarks/scale_flows.py [--shape Z Y X] [--blocksize 8] [--overlap 4]
                                                        [--flow-box 2] [--ranks 1 8 32 64] [--json FILE]

The volume: synthetic nuclei (``make_nuclei``, separated, mean diameter 6) over ``--shape``,
(176, 176, 176) by default: 22^3 = 10,648 blocks of 8^3.  Each N runs ``mpiexec -n N`` of this
script's ``--worker`` mode (one library ``run`` per rank, ``--model standin-flows``: the real
flow boxes (``--flow-box`` blocks per side), shells, Cellpose's ``_compute_masks``, faces, merge,
relabel, table; only the network is the stand-in of :mod:`mpicellpose.cellpose.standin`) and every
rank reports:

* the time per phase (``RunResult.timings``; the table shows the slowest rank's) and the rank's
  CPU seconds (``time.process_time``: on 2 oversubscribed cores the walls cannot fall with more
  ranks, the CPU each rank spends does);
* ``VmHWM`` (peak RSS) at the end;
* file-system bytes: ``/proc/self/io`` ``rchar``/``wchar`` (every read/write system call, page
  cache or not: what the run asks of the file system) and ``read_bytes``/``write_bytes`` (what reached
  the block device; on a machine with a large page cache the reads are mostly zero, so the table
  uses rchar/wchar).  The counters are taken after Cellpose, torch and the package are imported,
  so the start-up (loading libraries, the same at every N) is not counted; the run's own reading of
  the input, the flow field, the scratch, the records and the writing of all of them and the output
  are.
* the work directory and the output are kept until counted: the largest number of entries in one
  directory (``files_per_dir_max``) and the number of files.

Labels are compared across N by a hash of the output.  The JSON is written after every N.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _bench_util import machine_info, vm_hwm  # noqa: E402
from scale import labels_hash  # noqa: E402

IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes")


def proc_io() -> dict:
    with open("/proc/self/io") as f:
        vals = dict(line.split(":") for line in f if line.strip())
    return {k: int(vals[k]) for k in IO_KEYS}


def make_volume(path, shape, seed=1) -> int:
    from mpicellpose.synthetic.nuclei import make_nuclei
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    img, gt = make_nuclei(tuple(shape), seed=seed, mean_diameter=6.0, touching_fraction=0.0, min_gap=2.0,
                          intensity_jitter=0.0)
    numpy_array_to_zarr(path, img, (64, 64, 64))
    np.save(path + ".gt.npy", gt)
    return int(gt.max())


def worker(a) -> int:
    import cellpose.models  # noqa: F401 - imported before the counters start (start-up excluded)
    import torch  # noqa: F401
    from mpi4py import MPI

    from mpicellpose.config import RunConfig
    from mpicellpose.runner.driver import run

    comm = MPI.COMM_WORLD
    io0, t0 = proc_io(), time.perf_counter()
    c0 = time.process_time()
    res = run(RunConfig(input=a.input, output=a.output, blocksize=a.blocksize, overlap=a.overlap, pipeline="flows",
                        flow_box=a.flow_box, model_kwargs={"pretrained_model": "standin-flows"}, threads=1,
                        device="cpu", work_dir=a.output + ".work", keep_work=True), comm)
    io1 = proc_io()
    rec = {"rank": comm.Get_rank(), "wall_s": round(time.perf_counter() - t0, 3), "hwm": vm_hwm(),
           "cpu_s": round(time.process_time() - c0, 3), "cost": res.stats.get("cost", {}),
           "timings": res.timings, "n_objects": res.n_objects, "io": {k: io1[k] - io0[k] for k in IO_KEYS}}
    with open(f"{a.output}.rank{comm.Get_rank():04d}.json", "w") as f:
        json.dump(rec, f)
    return 0


def count_tree(path) -> dict:
    """Files, and the largest number of entries in one directory, under ``path``."""
    files, most, where = 0, 0, ""
    for d, dirs, fs in os.walk(path):
        files += len(fs)
        if len(dirs) + len(fs) > most:
            most, where = len(dirs) + len(fs), os.path.relpath(d, path)
    return {"files": files, "entries_per_dir_max": most, "where": where}


def launch(a, n, inp, out_dir, voxels) -> dict:
    out = os.path.join(out_dir, f"out{n}.zarr")
    for p in glob.glob(os.path.join(out_dir, f"out{n}.*")):
        os.remove(p) if os.path.isfile(p) else shutil.rmtree(p, ignore_errors=True)
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [exe, "-n", str(n), sys.executable, __file__, "--worker", "--input", inp, "--output", out,
           "--blocksize", str(a.blocksize), "--overlap", str(a.overlap), "--flow-box", str(a.flow_box)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    if proc.returncode:
        return {"ranks": n, "rc": proc.returncode, "stderr": proc.stderr[-3000:]}
    recs = [json.load(open(p)) for p in sorted(glob.glob(out + ".rank*.json"))]
    phases = list(recs[0]["timings"])
    hwm = np.array([r["hwm"] for r in recs], np.float64) / 2**20
    cpu = np.array([r["cpu_s"] for r in recs], np.float64)
    flows_s = np.array([r["timings"].get("flows", 0.0) for r in recs], np.float64)
    io = {k: np.array([r["io"][k] for r in recs], np.float64) for k in IO_KEYS}
    work, output = count_tree(out + ".work"), count_tree(out)
    res = {
        "ranks": n, "rc": 0, "launch_wall_s": round(time.time() - t0, 1), "objects": recs[0]["n_objects"],
        "phase_s_max": {k: round(max(r["timings"].get(k, 0) for r in recs), 2) for k in phases},
        "cpu_s_per_rank": {"min": round(cpu.min(), 2), "median": round(float(np.median(cpu)), 2),
                           "max": round(cpu.max(), 2), "sum": round(cpu.sum(), 2)},
        "wall_but_flows_s": round(float(max(r["wall_s"] for r in recs) - flows_s.max()), 2),
        "shell_bytes": {k: recs[0]["cost"].get(f"measured_shell_bytes_{k}") for k in ("written", "read")},
        "flow_boxes": recs[0]["cost"].get("flow_boxes"),
        "peak_rss_mib": {"min": round(hwm.min(), 1), "median": round(float(np.median(hwm)), 1),
                         "max": round(hwm.max(), 1)},
        "io_bytes_total": {k: int(v.sum()) for k, v in io.items()},
        "io_bytes_per_rank_max": {k: int(v.max()) for k, v in io.items()},
        "io_bytes_per_output_voxel": {k: round(float(v.sum()) / voxels, 2) for k, v in io.items()},
        "work_dir": work, "output": output, "labels_sha": labels_hash(out),
    }
    shutil.rmtree(out + ".work", ignore_errors=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--shape", type=int, nargs=3, default=(176, 176, 176))
    p.add_argument("--blocksize", type=int, default=8)
    p.add_argument("--overlap", type=int, default=4)
    p.add_argument("--flow-box", type=int, default=2)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--dir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    out_dir = a.dir or os.path.join("/tmp", "scale_flows")
    os.makedirs(out_dir, exist_ok=True)
    inp = os.path.join(out_dir, "in.zarr")
    shutil.rmtree(inp, ignore_errors=True)
    n_obj = make_volume(inp, a.shape)
    voxels = int(np.prod(a.shape))
    blocks = int(np.prod([-(-s // a.blocksize) for s in a.shape]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit.strip(),
           "machine": machine_info(), "python": platform.python_version(), "shape": list(a.shape),
           "blocksize": a.blocksize, "overlap": a.overlap, "flow_box": a.flow_box, "blocks": blocks, "true_objects": n_obj, "series": []}
    for n in a.ranks:
        r = launch(a, n, inp, out_dir, voxels)
        first = next((s for s in doc["series"] if s.get("rc") == 0), None)
        if r.get("rc") == 0 and first is not None:
            r["labels_identical_to_first"] = r["labels_sha"] == first["labels_sha"]
        doc["series"].append(r)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
