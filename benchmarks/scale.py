"""Scale harness (issue 13): the same synthetic volume on 1, 8, 32 ... ranks (oversubscribed).

    .venv/bin/python benchmarks/scale.py [--edge 240 | --shape Z Y X] [--blocksize 24] [--ranks 1 8 32 64]
                                         [--backend labels|threshold] [--out DIR] [--json FILE]
                                         [--profile DIR] [--latency]

The volume holds 2x2x2 cubes on a period-3 lattice, ``(edge / 3)^3`` objects, placed so that
(for a blocksize divisible by 3) a layer of cubes straddles every block face: those are cut
and stitched (``labels``: each cube carries its own global
label, as a per-block segmentation from another tool would; ``threshold``: a binary image).
Each N runs under ``mpiexec -n N`` (this script's ``--worker`` mode, one library ``run`` per
rank) and every rank reports:

* ``VmHWM`` (peak RSS) after each phase: the phase that raised it is the one that set the peak;
* the time per phase (``RunResult.timings``);
* the largest payload it sent to one rank in a labelled collective of the MPI gateway
  (the data of every ``alltoall``, hence every round of the chunked ``alltoall_arrays``, ``gather``, ``allgather``,
  ``bcast``, ``scatter``; numpy ``nbytes`` summed, small objects counted as their pickle).
  The face-view stream between neighbours is bounded by ``MPICELLPOSE_EXCHANGE_BYTES``.

Printed per N: objects, per-phase time (slowest rank), per-rank peak RSS (min / median / max,
rank 0's excess over the median), the largest message, and whether the labels are
byte-identical to the first N's.  Short runs only on a laptop: edge 240 with 24^3 blocks is
512k objects and 1000 blocks; ``--shape 648 648 648 --blocksize 72`` is 10.2M objects (the JSON
is written after every N, so a long series that is stopped keeps what it measured).

``--profile DIR`` dumps a cProfile per rank and phase, timed in CPU seconds, under
``DIR/ranks<N>/``; ``--latency`` only times a labelled barrier and a small ``alltoall_arrays``
on each N.
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _bench_util import vm_hwm  # noqa: E402

PHASES = ("block_counts", "match_faces", "merge", "relabel_phase", "table_phase", "finish_phase")


def make_volume(path, edge, blocksize, backend):
    """The lattice of 2x2x2 cubes over ``edge`` (an int: a cube of that side, or a (z, y, x) shape);
    returns the number of objects."""
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    shape = (edge,) * 3 if np.isscalar(edge) else tuple(int(e) for e in edge)
    axes = []
    for n in shape:
        g = np.arange(n) - (2 if blocksize % 3 == 0 else 0)   # then a cube straddles every block face
        axes.append(((g % 3) < 2, g // 3 - g.min() // 3))
    (on_z, cz), (on_y, cy), (on_x, cx) = axes
    ny, nx = int(cy.max()) + 1, int(cx.max()) + 1
    on = on_z[:, None, None] & on_y[None, :, None] & on_x[None, None, :]
    if backend == "labels":   # built in uint32 (the labels fit): one volume of 4 bytes a voxel, not 8
        zy = (cz[:, None] * ny + cy[None, :]).astype(np.uint32) * np.uint32(nx)
        arr = zy[:, :, None] + (cx.astype(np.uint32) + np.uint32(1))[None, None, :]
        arr[~on] = 0
    else:
        arr = on.astype(np.uint8) * 200
    numpy_array_to_zarr(path, arr, blocksize)
    return int(np.prod([np.unique(c[o]).size for o, c in axes]))


def _size(obj) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (list, tuple)):
        return sum(_size(o) for o in obj)
    if isinstance(obj, dict) and len(obj) > 64:
        return sum(_size(k) + _size(v) for k, v in obj.items())
    try:
        return len(pickle.dumps(obj, protocol=5))
    except Exception:  # noqa: BLE001 - not picklable here: not measured
        return 0


def _hooks(state, profile=None):
    """Measure the gateway's collectives and take VmHWM after each phase; ``profile``: a folder
    where each rank dumps a cProfile of each phase (``<phase>.rank<r>.prof``)."""
    from mpicellpose.comm.mailbox import Mailbox
    from mpicellpose.runner.phases import faces, finish, merge, relabel, table

    def biggest(name, fn):
        @functools.wraps(fn)
        def wrapped(self, obj, *a, **kw):
            if name == "alltoall":
                sizes = [_size(o) for i, o in enumerate(obj) if i != self.rank]
                n = max(sizes, default=0)
                state["bytes"] += sum(sizes)
            elif name == "bcast" or name == "scatter":
                n = (max(_size(o) for o in obj) if name == "scatter" else _size(obj)) if self.rank == 0 else 0
            else:
                n = _size(obj)
            if name != "alltoall":
                state["bytes"] += n
            state["calls"] += 1
            label = f"{name}: {a[0] if a else kw.get('label')}"
            if n > state["largest"][0]:
                state["largest"] = (n, label)
            if ("merge" in label or "merging" in label) and n > state["largest_merge"][0]:
                state["largest_merge"] = (n, label)
            return fn(self, obj, *a, **kw)
        return wrapped

    # the data of every alltoall (also each round of alltoall_arrays) goes through _alltoall_data
    Mailbox._alltoall_data = biggest("alltoall", Mailbox._alltoall_data)
    for name in ("gather", "allgather", "bcast", "scatter", "allreduce_sum"):
        setattr(Mailbox, name, biggest(name, getattr(Mailbox, name)))
    for mod in (merge, faces, relabel, table, finish):
        for ph in PHASES:
            fn = getattr(mod, ph, None)
            if fn is None or getattr(fn, "_scaled", False):
                continue

            def timed(*a, _fn=fn, _ph=ph, **kw):
                prof = None
                if profile:
                    import cProfile
                    prof = cProfile.Profile(time.process_time)   # CPU seconds, not the waits
                    prof.enable()
                t0, c0, cpu0 = time.perf_counter(), state["calls"], time.process_time()
                try:
                    out = _fn(*a, **kw)
                finally:
                    if prof is not None:
                        prof.disable()
                        from mpi4py import MPI
                        prof.dump_stats(os.path.join(profile, f"{_ph}.rank{MPI.COMM_WORLD.Get_rank():04d}.prof"))
                state["hwm"][_ph] = vm_hwm()
                state["fn_s"][_ph] = round(time.perf_counter() - t0, 3)
                state["fn_cpu"][_ph] = round(time.process_time() - cpu0, 3)
                state["fn_collectives"][_ph] = state["calls"] - c0
                return out
            timed._scaled = True
            setattr(mod, ph, timed)


def worker(a) -> int:
    from mpi4py import MPI

    from mpicellpose.comm.mailbox import Mailbox
    from mpicellpose.config import RunConfig
    from mpicellpose.runner.driver import run

    state = {"largest": (0, ""), "largest_merge": (0, ""), "hwm": {}, "fn_s": {}, "fn_cpu": {}, "fn_collectives": {},
             "calls": 0, "bytes": 0}
    _hooks(state, a.profile)
    comm = MPI.COMM_WORLD
    hwm0 = vm_hwm()
    t0 = time.perf_counter()
    res = run(RunConfig(input=a.input, output=a.output, blocksize=a.blocksize, backend=a.backend,
                        backend_kwargs={"threshold": 100} if a.backend == "threshold" else {},
                        work_dir=a.output + ".work", normalize="none" if a.backend == "labels" else "global"), comm)
    wall = time.perf_counter() - t0
    rec = {"rank": comm.Get_rank(), "size": comm.Get_size(), "wall_s": round(wall, 3), "hwm_start": hwm0,
           "hwm_end": vm_hwm(), "hwm_after": state["hwm"], "fn_s": state["fn_s"], "fn_cpu": state["fn_cpu"],
           "cpu_s": round(time.process_time(), 2),
           "fn_collectives": state["fn_collectives"], "timings": res.timings, "n_objects": res.n_objects,
           "n_merged": res.n_merged, "largest_message": state["largest"][0], "largest_where": state["largest"][1],
           "largest_merge_message": state["largest_merge"][0], "bytes_sent": state["bytes"],
           "message_budget": getattr(Mailbox, "MESSAGE_BYTES", None)}
    with open(f"{a.output}.rank{comm.Get_rank():04d}.json", "w") as f:
        json.dump(rec, f)
    return 0


def latency_worker(a) -> int:
    """Time the gateway's collectives alone: a labelled barrier and an ``alltoall_arrays`` of 10
    rows per rank, 20 each (``--latency``)."""
    from mpi4py import MPI

    from mpicellpose.comm import Mailbox, dup

    box = Mailbox(dup(MPI.COMM_WORLD))
    box.barrier("start")
    out = {"ranks": box.size}
    for kind in ("barrier", "alltoall_arrays"):
        t, c = time.perf_counter(), time.process_time()
        for i in range(20):
            if kind == "barrier":
                box.barrier(f"barrier {i}")
            else:
                box.alltoall_arrays([(np.arange(10),)] * box.size, f"rows {i}")
        wall, cpu = (time.perf_counter() - t) / 20, (time.process_time() - c) / 20
        cpu_all = box.allreduce_sum(cpu, "CPU")
        out[kind] = {"wall_ms": round(wall * 1e3, 1), "cpu_all_ranks_ms": round(cpu_all * 1e3, 1)}
    if box.rank == 0:
        print(json.dumps(out), flush=True)
    return 0


def labels_hash(path) -> str:
    import zarr

    z = zarr.open(path, mode="r")
    return hashlib.sha256(np.ascontiguousarray(z[...]).tobytes()).hexdigest()[:16]


def launch(a, n, inp, out_dir) -> dict:
    out = os.path.join(out_dir, f"out{n}.zarr")
    for p in glob.glob(os.path.join(out_dir, f"out{n}.*")):   # a fresh run, not a resume of an earlier one
        os.remove(p) if os.path.isfile(p) else shutil.rmtree(p, ignore_errors=True)
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [exe if os.path.exists(exe) else "mpiexec", "-n", str(n), sys.executable, __file__, "--worker",
           "--input", inp, "--output", out, "--blocksize", str(a.blocksize), "--backend", a.backend]
    if a.profile:
        prof = os.path.join(a.profile, f"ranks{n}")
        os.makedirs(prof, exist_ok=True)
        cmd += ["--profile", prof]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    wall = time.time() - t0
    if proc.returncode:
        return {"ranks": n, "rc": proc.returncode, "stderr": proc.stderr[-3000:]}
    recs = [json.load(open(p)) for p in sorted(glob.glob(out + ".rank*.json"))]
    hwm = np.array([r["hwm_end"] for r in recs], np.float64) / 2**20
    phases = sorted({k for r in recs for k in r["timings"]}, key=list(recs[0]["timings"]).index)
    res = {
        "ranks": n, "rc": 0, "launch_wall_s": round(wall, 1), "objects": recs[0]["n_objects"],
        "merged": recs[0]["n_merged"],
        "phase_s_max": {k: round(max(r["timings"].get(k, 0) for r in recs), 2) for k in phases},
        "step_s_max": {k: round(max(r["fn_s"].get(k, 0) for r in recs), 2) for k in recs[0]["fn_s"]},
        "step_collectives": recs[0]["fn_collectives"],
        "peak_rss_mib": {"min": round(hwm.min(), 1), "median": round(float(np.median(hwm)), 1),
                         "max": round(hwm.max(), 1), "rank0": round(hwm[0], 1),
                         "rank0_over_median": round(hwm[0] / np.median(hwm), 3)},
        "per_rank_peak_rss_mib": [round(x, 1) for x in hwm],
        "peak_set_in": _peak_phase(recs),
        "largest_message_bytes": max(r["largest_message"] for r in recs),
        "largest_message_where": max(recs, key=lambda r: r["largest_message"])["largest_where"],
        "largest_merge_message_bytes": max(r.get("largest_merge_message", 0) for r in recs),
        "labels_sha": labels_hash(out),
        "rss_start_mib_median": round(float(np.median([r["hwm_start"] for r in recs])) / 2**20, 1),
        "step_s": _spread({k: [r["fn_s"].get(k, 0.0) for r in recs] for k in recs[0]["fn_s"]}, 3),
        "rss_after_step_mib": _spread({k: [r["hwm_after"].get(k, 0) / 2**20 for r in recs]
                                       for k in recs[0]["hwm_after"]}, 1),
        "bytes_sent_per_rank": _spread({"all": [r["bytes_sent"] for r in recs]}, 0)["all"],
        # CPU seconds per rank: what each rank computes (on 2 cores the wall of many ranks is the sum)
        "step_cpu_s": _spread({k: [r["fn_cpu"].get(k, 0.0) for r in recs] for k in recs[0]["fn_cpu"]}, 3),
        "run_cpu_s": _spread({"all": [r["cpu_s"] for r in recs]}, 2)["all"],
        "merge_relabel_table_cpu_s": round(max(sum(r["fn_cpu"].get(k, 0) for k in ("merge", "relabel_phase",
                                                                                   "table_phase")) for r in recs), 2),
        "merge_relabel_table_s": round(max(sum(r["fn_s"].get(k, 0) for k in ("merge", "relabel_phase", "table_phase"))
                                           for r in recs), 2),
        # CPU seconds of merge + relabel + table summed over all ranks (on 2 cores: wall >= this / 2)
        "merge_relabel_table_cpu_total_s": round(sum(r["fn_cpu"].get(k, 0) for r in recs
                                                     for k in ("merge", "relabel_phase", "table_phase")), 2),
    }
    shutil.rmtree(out + ".work", ignore_errors=True)
    return res


def _spread(per_step: dict, digits: int) -> dict:
    """Per step: median, max, sum and rank 0's value over the ranks, and rank 0 over the median."""
    out = {}
    for k, v in per_step.items():
        v = np.asarray(v, np.float64)
        med = float(np.median(v))
        out[k] = {"median": round(med, digits), "max": round(float(v.max()), digits),
                  "sum": round(float(v.sum()), digits),
                  "rank0": round(float(v[0]), digits),
                  "rank0_over_median": round(float(v[0]) / med, 2) if med > 0 else None}
    return out


def _peak_phase(recs):
    """Per rank, the phase after which VmHWM had reached its final value."""
    out = {}
    for r in recs:
        seen = [(ph, v) for ph, v in r["hwm_after"].items()]
        where = next((ph for ph, v in seen if v >= r["hwm_end"]), "before stitching (segment)")
        out[where] = out.get(where, 0) + 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edge", type=int, default=240)
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="a box instead of the --edge cube")
    p.add_argument("--blocksize", type=int, default=24)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--backend", choices=("labels", "threshold"), default="labels")
    p.add_argument("--out", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--json", default=None)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="dump a cProfile per rank and phase under DIR/ranks<N>/ (slows the phases a little)")
    p.add_argument("--latency", action="store_true",
                   help="only time a labelled barrier and a small alltoall_arrays on each --ranks (no volume)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return latency_worker(a) if a.latency else worker(a)
    if a.latency:
        exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for n in a.ranks:
            subprocess.run([exe if os.path.exists(exe) else "mpiexec", "-n", str(n), sys.executable, __file__,
                            "--worker", "--latency"], env=env, timeout=a.timeout, check=True)
        return 0
    out_dir = a.out or tempfile.mkdtemp(prefix="mpicellpose-scale-")
    os.makedirs(out_dir, exist_ok=True)
    inp = os.path.join(out_dir, "input.zarr")
    shape = tuple(a.shape) if a.shape else (a.edge,) * 3
    n_obj = make_volume(inp, shape, a.blocksize, a.backend)
    n_blocks = int(np.prod([-(-e // a.blocksize) for e in shape]))
    print(f"volume {shape}, blocks {a.blocksize}^3 ({n_blocks}), {n_obj} objects, backend {a.backend}", flush=True)
    results, first = [], None
    for n in a.ranks:
        r = launch(a, n, inp, out_dir)
        if r["rc"] == 0:
            first = first or r["labels_sha"]
            r["labels_identical"] = r["labels_sha"] == first
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.json:   # after every N: a long series interrupted keeps what it measured
            with open(a.json, "w") as f:
                json.dump({"shape": shape, "blocks": n_blocks, "blocksize": a.blocksize, "backend": a.backend,
                           "objects": n_obj, "results": results}, f, indent=1)
    if a.out is None:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
