"""Every benchmark against the reference, in one command.

Run with the project venv's Python from the repository root::

    .venv/bin/python benchmarks/run_all.py [--quick] [--repeats 3] [--sections 1,2,3,4,5]

It creates the reference venv (``setup_reference_env.sh``) if it is missing, and calls the
reference (``cellpose.contrib.distributed_segmentation`` from the cellpose 3.1.1.3 wheel)
only through ``benchmarks/.venv-reference/bin/python`` subprocesses.  Same data, model,
blocksize, overlap and number of workers/ranks for both tools, in the same invocation.
Every subprocess has a timeout; a failure is recorded in the results, never fatal.

Sections (see ``docs/benchmarks.md`` for what each one measures and why):

1. end to end: whole-volume Cellpose (one process), the reference (2 dask workers), mpicellpose
   (``mpiexec -n 2 ... segment``): wall time, phases, peak RSS per rank, non-Cellpose share;
2. seam quality: object F1 vs ground truth and vs whole-volume Cellpose, seam splits/merges,
   on the end-to-end case and on a dense (touching) case;
3. merge at scale, no inference: ``make_blocks.py`` grids, our labels backend at 1, 2, 4 ranks
   vs ``reference_merge.py``, both checked against the exact truth;
4. per-rank peak memory vs volume size (labels backend, same blocksize, 8x the volume);
5. communication: bytes each rank sends in the stitch phase, measured, and a geometric model
   (validated against the measurements) for 128 ranks on 4000 x 10000 x 10000;
6. GPU: not measured here.

Writes ``benchmarks/results/<YYYY-MM-DD>-<tag>.{md,json,png}`` and prints the tables.
Scratch goes to ``benchmarks/work/run_all/`` (ignored by git).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _bench_util import last_json_line, machine_info, mem_available, proc_stats, run_cmd  # noqa: E402
from mpicellpose.volumes.storage import sha256_file  # noqa: E402

GiB = float(1 << 30)
MiB = float(1 << 20)

# --------------------------------------------------------------------------- cases
FULL = dict(
    e2e=dict(shape=(160, 160, 160), blocksize=80, overlap=32, seed=1, diameter=16,
             touching_fraction=0.3, density=0.25),
    dense=dict(shape=(160, 160, 160), blocksize=80, overlap=32, seed=2, diameter=16,
               touching_fraction=0.8, density=0.35),
    # (grid, block, diameter, gap): 8^3 = the reference's documented trouble size;
    # 16^3 with small objects: >= 10^6 objects, 4096 blocks
    merge=[dict(grid=8, block=32, diameter=12.0, gap=2.0),
           dict(grid=16, block=48, diameter=4.0, gap=1.0, big=True)],
    merge_ranks=(1, 2, 4),
    memory=dict(block=64, grids=(4, 8), ranks=2),
    e2e_timeout=3600, merge_timeout=5400,
)
QUICK = dict(
    e2e=dict(shape=(48, 96, 96), blocksize=48, overlap=32, seed=1, diameter=16,
             touching_fraction=0.3, density=0.25),
    dense=dict(shape=(48, 96, 96), blocksize=48, overlap=32, seed=2, diameter=16,
               touching_fraction=0.8, density=0.35),
    merge=[dict(grid=4, block=32, diameter=12.0, gap=2.0)],
    merge_ranks=(1, 2),
    memory=dict(block=32, grids=(2, 4), ranks=2),
    e2e_timeout=1800, merge_timeout=1200,
)
RANKS = 2          # workers / ranks for the end-to-end comparison (one per core here)

TARGETS = {
    "wall_ratio": 0.7,            # ours wall <= 0.7 x reference
    "non_cellpose_share": 0.05,   # of our wall
    "seam_error_ratio": 0.2,      # our seam errors <= 1/5 of the reference's
    "f1_vs_whole": 0.99,
    "merge_speedup": 10.0,
    "memory_ratio": 1.1,
}


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mmm(xs):
    """(min, median, max) of the non-None values, or None."""
    xs = [float(x) for x in xs if x is not None]
    return (min(xs), statistics.median(xs), max(xs)) if xs else None


def fmt_mmm(t, digits=1, scale=1.0, unit=""):
    if not t:
        return "n/a"
    a, m, b = (v * scale for v in t)
    if abs(b - a) < 10 ** (-digits) / 2:
        return f"{m:.{digits}f}{unit}"
    return f"{m:.{digits}f}{unit} ({a:.{digits}f}-{b:.{digits}f})"


class LoadMonitor:
    """Load averages every ``interval`` s for the whole invocation (other agents share the CPU)."""

    def __init__(self, interval=15.0):
        self.samples = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self.interval = interval

    def start(self):
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), *os.getloadavg()))
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._t.join()
        self.samples.append((time.time(), *os.getloadavg()))
        one = [s[1] for s in self.samples]
        return {"load1_min": min(one), "load1_mean": round(sum(one) / len(one), 2), "load1_max": max(one),
                "samples": len(one), "interval_s": self.interval}


def other_cpu_users(our_pid):
    """Processes (not ours) that used CPU recently: a 3 s /proc/stat utime+stime diff."""
    def snap():
        out = {}
        for pid, name, rest in proc_stats():
            try:
                out[pid] = (int(rest[11]) + int(rest[12]), name)
            except (ValueError, IndexError):
                continue
        return out
    a = snap()
    time.sleep(3)
    b = snap()
    hz = os.sysconf("SC_CLK_TCK")
    users = []
    for pid, (t1, name) in b.items():
        if pid == our_pid or pid not in a:
            continue
        cpu = (t1 - a[pid][0]) / hz / 3.0
        if cpu > 0.05:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
            except OSError:
                cmd = name
            users.append({"pid": pid, "cpu_cores": round(cpu, 2), "cmd": cmd})
    return sorted(users, key=lambda u: -u["cpu_cores"])


# --------------------------------------------------------------------------- environment
class Env:
    def __init__(self, args):
        self.args = args
        self.py = sys.executable
        bindir = os.path.dirname(self.py)
        self.mpiexec = os.path.join(bindir, "mpiexec")
        if not os.path.exists(self.mpiexec):
            self.mpiexec = shutil.which("mpiexec") or "mpiexec"
        self.ref_venv = os.environ.get("REFERENCE_VENV", os.path.join(HERE, ".venv-reference"))
        self.ref_py = os.path.join(self.ref_venv, "bin", "python")
        self.work = os.path.abspath(args.work)
        os.makedirs(self.work, exist_ok=True)
        self.nice = args.nice
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
        env.setdefault("MPLCONFIGDIR", os.path.join(self.work, ".mpl"))
        self.env1 = env                                   # one thread per process
        env2 = dict(env)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env2[k] = str(RANKS)
        self.env_whole = env2                             # whole-volume: all cores, one process
        self.errors = []

    def err(self, where, msg):
        self.errors.append({"where": where, "error": str(msg)[:2000]})
        log(f"ERROR in {where}: {str(msg)[:500]}")

    def run(self, cmd, *, timeout, log_path, env=None, **kw):
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        return run_cmd(cmd, timeout=timeout, env=env or self.env1, cwd=ROOT, log_path=log_path,
                       nice=self.nice, **kw)


def ensure_reference(env: Env):
    info = {"venv": env.ref_venv}
    if not os.path.exists(env.ref_py):
        log("reference venv missing: running setup_reference_env.sh (a few minutes)")
        r = run_cmd(["bash", os.path.join(HERE, "setup_reference_env.sh"), env.ref_venv], timeout=3600,
                    cwd=ROOT, log_path=os.path.join(env.work, "logs", "setup_reference_env"), sample=False)
        info["setup"] = {k: r.get(k) for k in ("rc", "wall_s", "error")}
    r = run_cmd([env.ref_py, "-c", "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in "
                 "('cellpose','torch','zarr','dask','distributed','numpy')}))"], timeout=120, sample=False)
    info["versions"] = last_json_line(r.get("stdout_tail"))
    info["ok"] = r["rc"] == 0 and info["versions"] is not None
    if not info["ok"]:
        env.err("reference venv", r.get("error") or r.get("stderr_tail"))
    return info


def ensure_model(env: Env):
    """The shipped demo model if it exists, else the stand-in (random CPnet) - said so."""
    if env.args.model:
        path = os.path.abspath(env.args.model)
        kind = "given"
    else:
        from mpicellpose.cellpose.shipped import demo_model_path
        path = str(demo_model_path())
        kind = "demo_nuclei_v1 (shipped, trained)"
        if not os.path.isfile(path):
            path = os.path.join(HERE, "work", "standin_cp3")
            kind = "STAND-IN (random-weights CPnet from make_standin_model.py; demo model not shipped yet)"
            if not os.path.isfile(path):
                log("creating the stand-in model")
                r = env.run([env.ref_py, os.path.join(HERE, "make_standin_model.py"), "--out", path,
                             "--diam-mean", "16"], timeout=1800, log_path=os.path.join(env.work, "logs", "standin"))
                if r["rc"] != 0:
                    env.err("stand-in model", r.get("error"))
    info = {"path": path, "kind": kind, "exists": os.path.isfile(path)}
    if info["exists"]:
        info["sha256"] = sha256_file(path)
        info["bytes"] = os.path.getsize(path)
    return info


def versions_ours():
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for n in ("numpy", "scipy", "zarr", "numcodecs", "mpi4py", "mpich", "torch", "cellpose"):
        try:
            out[n] = md.version(n)
        except Exception:  # noqa: BLE001
            out[n] = None
    try:
        import mpicellpose
        out["mpicellpose"] = mpicellpose.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mpicellpose"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        out["mpicellpose_dir_modified_vs_commit"] = bool(dirty)
    except Exception:  # noqa: BLE001
        pass
    return out


# --------------------------------------------------------------------------- data
def make_case_volume(env: Env, name, case):
    """image.zarr + truth.zarr (zarr format 2, chunks = blocksize) from make_nuclei."""
    from _zarrcompat import create_v2
    from mpicellpose.synthetic.nuclei import make_nuclei
    d = os.path.join(env.work, name)
    meta_path = os.path.join(d, "volume.json")
    key = {k: list(v) if isinstance(v, tuple) else v for k, v in case.items()}
    if os.path.exists(meta_path):
        old = json.load(open(meta_path))
        if old.get("case") == key:
            return d, old
    t = time.perf_counter()
    img, gt = make_nuclei(tuple(case["shape"]), seed=case["seed"], mean_diameter=case["diameter"],
                          touching_fraction=case["touching_fraction"], density=case["density"])
    os.makedirs(d, exist_ok=True)
    chunks = (case["blocksize"],) * len(case["shape"])
    create_v2(os.path.join(d, "image.zarr"), img.shape, chunks, img.dtype)[...] = img
    create_v2(os.path.join(d, "truth.zarr"), gt.shape, chunks, np.uint32)[...] = gt
    from mpicellpose.synthetic.labels import adjacent_label_pairs
    meta = {"case": key, "n_objects": int(gt.max()), "touching_pairs": int(len(adjacent_label_pairs(gt))),
            "foreground_fraction": round(float((gt > 0).mean()), 4), "seconds": round(time.perf_counter() - t, 2)}
    json.dump(meta, open(meta_path, "w"), indent=1)
    return d, meta


def make_blocks_dir(env: Env, grid, block, diameter, gap, seed=0):
    d = os.path.join(env.work, f"blocks_g{grid}_b{block}_d{diameter:g}_gap{gap:g}")
    meta_path = os.path.join(d, "meta.json")
    if os.path.exists(meta_path) and os.path.exists(os.path.join(d, "truth.npz")):
        meta = json.load(open(meta_path))
        if meta.get("grid") == [grid] * 3 and meta.get("block") == [block] * 3 and meta.get("seed") == seed:
            meta["reused"] = True
            return d, meta
    shutil.rmtree(d, ignore_errors=True)
    log(f"make_blocks grid {grid}^3 block {block}^3 diameter {diameter} gap {gap}")
    r = env.run([env.py, os.path.join(HERE, "make_blocks.py"), "--out", d, "--grid", str(grid), "--block", str(block),
                 "--diameter", str(diameter), "--gap", str(gap), "--seed", str(seed)],
                timeout=env.cfg["merge_timeout"], log_path=os.path.join(env.work, "logs", f"make_blocks_g{grid}"))
    if r["rc"] != 0 or not os.path.exists(meta_path):
        env.err(f"make_blocks g{grid}", r.get("error"))
        return d, None
    meta = json.load(open(meta_path))
    meta["generate_wall_s"] = r["wall_s"]
    return d, meta


# --------------------------------------------------------------------------- our runs
def read_rank_jsons(json_dir):
    out = []
    for p in sorted(glob.glob(os.path.join(json_dir, "rank-*.json"))):
        try:
            out.append(json.load(open(p)))
        except (OSError, json.JSONDecodeError) as exc:
            out.append({"error": f"unreadable {p}: {exc}"})
    return out


def run_ours(env: Env, ranks, cli_args=None, library=None, *, json_dir, timeout, label):
    shutil.rmtree(json_dir, ignore_errors=True)
    cmd = [env.mpiexec, "-n", str(ranks), env.py, os.path.join(HERE, "ours_runner.py"), "--json-dir", json_dir]
    if library is not None:
        cmd += ["--library", json.dumps(library)]
    else:
        cmd += ["--"] + [str(a) for a in cli_args]
    load = os.getloadavg()[0]
    r = env.run(cmd, timeout=timeout, log_path=os.path.join(json_dir, "mpiexec"))
    ranks_info = read_rank_jsons(json_dir)
    rec = {"wall_s": r["wall_s"], "rc": r["rc"], "error": r["error"], "load1_at_start": round(load, 2),
           "cpu_s": tree_cpu_s(r),
           "ranks": ranks, "per_rank": ranks_info, "tree_memory": r.get("memory")}
    if r["error"] or len(ranks_info) != ranks or any(x.get("error") for x in ranks_info):
        msg = r["error"] or "; ".join(str(x.get("error")) for x in ranks_info if x.get("error")) \
            or f"{len(ranks_info)} rank reports of {ranks}"
        rec["error"] = msg
        env.err(label, f"{msg} | stderr: {r.get('stderr_tail', '')[-800:]}")
    r0 = next((x for x in ranks_info if x.get("rank") == 0), {})
    rec["timings"] = r0.get("timings")
    rec["n_objects"] = r0.get("n_objects")
    rec["hwm_per_rank"] = [x.get("vm_hwm_bytes") for x in sorted(ranks_info, key=lambda x: x.get("rank", 0))]
    rec["hwm_before_run_per_rank"] = [x.get("vm_hwm_before_run_bytes")
                                      for x in sorted(ranks_info, key=lambda x: x.get("rank", 0))]
    rec["comm_bytes_per_rank"] = [(x.get("stats") or {}).get("comm_bytes_sent")
                                  for x in sorted(ranks_info, key=lambda x: x.get("rank", 0))]
    return rec


def tree_cpu_s(r):
    """CPU seconds (user + system) of every sampled process of a run_cmd result (>= 20 MiB RSS)."""
    procs = (r.get("memory") or {}).get("processes") or []
    return round(sum(p.get("cpu_s") or 0.0 for p in procs), 2) if procs else None


def hook_s(rank_rec, key):
    return ((rank_rec.get("hooks") or {}).get(key) or {}).get("s", 0.0)


# --------------------------------------------------------------------------- section 1 + 2
def e2e_case(env: Env, name, case, repeats, whole_repeats):
    d, vmeta = make_case_volume(env, name, case)
    log(f"{name}: volume {case['shape']} with {vmeta['n_objects']} objects, blocksize {case['blocksize']}, "
        f"overlap {case['overlap']}, {repeats} repeat(s)")
    img = os.path.join(d, "image.zarr")
    model = env.model["path"]
    B, O, D = case["blocksize"], case["overlap"], case["diameter"]
    runs = {"whole": [], "reference": [], "ours": []}
    keep = {}
    to = env.cfg["e2e_timeout"]

    def whole(rep):
        out = os.path.join(d, f"whole_r{rep}.zarr")
        shutil.rmtree(out, ignore_errors=True)
        j = os.path.join(d, f"whole_r{rep}.json")
        load = os.getloadavg()[0]
        r = env.run([env.py, os.path.join(HERE, "whole_volume.py"), "--input", img, "--output", out, "--model", model,
                     "--diameter", str(D), "--threads", str(RANKS), "--chunks", str(B), "--json", j],
                    timeout=to, env=env.env_whole, log_path=os.path.join(d, "logs", f"whole_r{rep}"))
        res = last_json_line(r.get("stdout_tail")) or {}
        rec = {"wall_s": r["wall_s"], "error": r["error"] or res.get("error"), "load1_at_start": round(load, 2),
               "cpu_s": tree_cpu_s(r),
               **{k: res.get(k) for k in ("import_s", "read_s", "model_load_s", "eval_s", "network_s", "masks_s",
                                         "write_s", "n_labels", "vm_hwm_bytes")}}
        if rec["error"]:
            env.err(f"{name} whole r{rep}", rec["error"])
        runs["whole"].append(rec)
        return out

    def reference(rep):
        out = os.path.join(d, f"ref_r{rep}.zarr")
        shutil.rmtree(out, ignore_errors=True)
        j = os.path.join(d, f"ref_r{rep}.json")
        if os.path.exists(j):
            os.remove(j)
        load = os.getloadavg()[0]
        r = env.run([env.ref_py, os.path.join(HERE, "reference_runner.py"), "--input", img, "--output", out,
                     "--blocksize", str(B), "--workers", str(RANKS), "--threads", "1", "--model", model,
                     "--diameter", str(D), "--do-3d", "--no-count", "--json", j],
                    timeout=to, log_path=os.path.join(d, "logs", f"ref_r{rep}"))
        res = json.load(open(j)) if os.path.exists(j) else (last_json_line(r.get("stdout_tail")) or {})
        mem = res.get("memory") or {}
        workers = [p for p in mem.get("processes", []) if p.get("role") == "worker"]
        rerr = res.get("error")
        if isinstance(rerr, dict):
            rerr = f"{rerr.get('type')}: {rerr.get('message')}"
        rec = {"wall_s": r["wall_s"], "load1_at_start": round(load, 2), "error": r["error"] or rerr,
               "cpu_s": tree_cpu_s(r),
               "in_call_s": res.get("wall_s"), "phases": res.get("phases"), "n_boxes": res.get("n_boxes"),
               "worker_hwm": [max(w.get("vm_hwm_bytes") or 0, w.get("vm_hwm_at_end_bytes") or 0,
                                  w.get("peak_rss_sampled_bytes") or 0) for w in workers],
               "client_hwm": mem.get("client_peak_rss_bytes"),
               "tree_peak_total_rss": mem.get("peak_total_rss_sampled_bytes"),
               "worker_task_torch_threads": res.get("worker_task_torch_threads"),
               "side_effects": res.get("side_effects")}
        if rec["error"]:
            env.err(f"{name} reference r{rep}", rec["error"])
        runs["reference"].append(rec)
        return out

    def ours(rep, extra=(), tag="ours"):
        out = os.path.join(d, f"{tag}_r{rep}.zarr")
        for p in glob.glob(out.replace(".zarr", "") + "*"):
            if not p.endswith(".json"):
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        jd = os.path.join(d, f"{tag}_r{rep}")
        rec = run_ours(env, RANKS, ["segment", img, out, "--model", model, "--diameter", D, "--blocksize", B,
                                    "--overlap", O, "--threads", 1, "--log-dir", os.path.join(jd, "logs")]
                       + list(extra), json_dir=jd, timeout=to, label=f"{name} {tag} r{rep}")
        pr = sorted(rec["per_rank"], key=lambda x: x.get("rank", 0))
        rec["cellpose_s_per_rank"] = [hook_s(x, "backend") for x in pr]
        rec["read_s_per_rank"] = [hook_s(x, "read") for x in pr]
        rec["finish_s_per_rank"] = [hook_s(x, "finish") for x in pr]
        rec["cp_network_s_per_rank"] = [hook_s(x, "cp_network") for x in pr]
        rec["cp_masks_s_per_rank"] = [hook_s(x, "cp_masks") for x in pr]
        rec["agree_s_per_rank"] = [hook_s(x, "agree") for x in pr]
        rec["run_s_per_rank"] = [hook_s(x, "run") for x in pr]
        rec["t_import_per_rank"] = [x.get("t_run_start_s") for x in pr]   # start -> run(): imports, config
        rec["t_after_run_per_rank"] = [x.get("t_after_run_s") for x in pr]
        rec["process_s_per_rank"] = [x.get("process_s") for x in pr]
        t = rec.get("timings") or {}
        if rec["read_s_per_rank"] and rec["finish_s_per_rank"] and rec["wall_s"] and t:
            # the list of what is not Cellpose: I/O (read, write), stitch + numbering,
            # relabel, table, plus our normalisation sampling
            io = max(r + f for r, f in zip(rec["read_s_per_rank"], rec["finish_s_per_rank"]))
            rec["our_work_s"] = io + sum(t.get(k, 0.0) for k in ("normalize", "stitch", "relabel", "table"))
            rec["our_work_share"] = rec["our_work_s"] / rec["wall_s"]
            rec["startup_s"] = t.get("plan", 0.0) + t.get("model_load", 0.0)  # Cellpose import + model load
        if rec["cellpose_s_per_rank"] and rec["wall_s"]:
            cp = sum(rec["cellpose_s_per_rank"]) / len(rec["cellpose_s_per_rank"])
            rec["non_cellpose_share"] = (rec["wall_s"] - cp) / rec["wall_s"]
            tot = (rec.get("timings") or {}).get("total")
            if tot:
                rec["non_cellpose_share_in_call"] = (tot - cp) / tot
        try:
            import zarr
            attrs = dict(zarr.open(out, mode="r").attrs.get("mpicellpose", {}) or {})
            rec["output_timings"] = attrs.get("timings")
        except Exception as exc:  # noqa: BLE001
            rec["output_attrs_error"] = repr(exc)
        runs.setdefault(tag, []).append(rec)
        return out

    for rep in range(repeats):
        order = [("reference", reference), ("ours", ours)]
        if rep % 2:
            order.reverse()
        for tool, fn in order:
            log(f"{name} repeat {rep + 1}/{repeats}: {tool}")
            out = fn(rep)
            if rep == 0:
                keep[tool] = out
            elif os.path.exists(out):
                shutil.rmtree(out, ignore_errors=True)
        if rep < whole_repeats:
            log(f"{name} repeat {rep + 1}/{repeats}: whole-volume Cellpose")
            out = whole(rep)
            if rep == 0:
                keep["whole"] = out
            elif os.path.exists(out):
                shutil.rmtree(out, ignore_errors=True)
    if env.args.variants:
        # quality-only variant: our pipeline with the reference's per-block normalisation, to tell
        # normalisation effects from stitching effects
        log(f"{name}: variant ours --normalize block (quality only)")
        keep["ours_blocknorm"] = ours(0, ("--normalize", "block"), "ours_blocknorm")
    summary = summarize_e2e(runs)
    quality = seam_quality(env, name, d, case, keep)
    return {"case": {**{k: list(v) if isinstance(v, tuple) else v for k, v in case.items()}, **vmeta,
                     "n_blocks": int(np.prod([int(np.ceil(s / B)) for s in case["shape"]]))},
            "runs": runs, "summary": summary, "quality": quality}


def summarize_e2e(runs):
    s = {}
    for tool in ("whole", "reference", "ours"):
        rs = [r for r in runs[tool] if not r.get("error")]
        if not rs:
            continue
        t = {"wall_s": mmm([r["wall_s"] for r in rs]), "n_ok": len(rs), "n_failed": len(runs[tool]) - len(rs),
             "cpu_s": mmm([r.get("cpu_s") for r in rs]), "load1_at_start": mmm([r.get("load1_at_start") for r in rs])}
        if tool == "whole":
            t["eval_s"] = mmm([r.get("eval_s") for r in rs])
            t["network_s"] = mmm([r.get("network_s") for r in rs])
            t["masks_s"] = mmm([r.get("masks_s") for r in rs])
            t["peak_rss_bytes"] = mmm([r.get("vm_hwm_bytes") for r in rs])
        elif tool == "reference":
            t["in_call_s"] = mmm([r.get("in_call_s") for r in rs])
            for ph in ("import_s", "cluster_start_s", "segment_s", "merge_s", "relabel_s", "boxes_s",
                       "cluster_close_s"):
                t[ph] = mmm([(r.get("phases") or {}).get(ph) for r in rs])
            t["peak_rss_worker_bytes"] = mmm([max(r["worker_hwm"]) for r in rs if r.get("worker_hwm")])
            t["peak_rss_client_bytes"] = mmm([r.get("client_hwm") for r in rs])
            t["n_labels"] = rs[0].get("n_boxes")
        else:
            t["in_call_s"] = mmm([(r.get("timings") or {}).get("total") for r in rs])
            for ph in ("plan", "normalize", "model_load", "segment", "stitch", "relabel", "table"):
                t[ph] = mmm([(r.get("timings") or {}).get(ph) for r in rs])
            t["cellpose_s_mean_rank"] = mmm([sum(r["cellpose_s_per_rank"]) / len(r["cellpose_s_per_rank"])
                                             for r in rs if r.get("cellpose_s_per_rank")])
            for k in ("cp_network", "cp_masks"):
                t[f"{k}_s_mean_rank"] = mmm([sum(r[f"{k}_s_per_rank"]) / len(r[f"{k}_s_per_rank"])
                                             for r in rs if r.get(f"{k}_s_per_rank")])
            t["read_s_max_rank"] = mmm([max(r["read_s_per_rank"]) for r in rs if r.get("read_s_per_rank")])
            t["finish_s_max_rank"] = mmm([max(r["finish_s_per_rank"]) for r in rs if r.get("finish_s_per_rank")])
            t["import_s_max_rank"] = mmm([max(r["t_import_per_rank"]) for r in rs if r.get("t_import_per_rank")])
            t["launch_s"] = mmm([r["wall_s"] - max(r["process_s_per_rank"]) for r in rs
                                 if r.get("process_s_per_rank") and None not in r["process_s_per_rank"]])
            t["our_work_s"] = mmm([r.get("our_work_s") for r in rs])
            t["our_work_share"] = mmm([r.get("our_work_share") for r in rs])
            t["startup_s"] = mmm([r.get("startup_s") for r in rs])
            t["non_cellpose_share"] = mmm([r.get("non_cellpose_share") for r in rs])
            t["non_cellpose_share_in_call"] = mmm([r.get("non_cellpose_share_in_call") for r in rs])
            t["peak_rss_rank_bytes"] = mmm([max(r["hwm_per_rank"]) for r in rs if r.get("hwm_per_rank")])
            t["n_labels"] = rs[0].get("n_objects")
        s[tool] = t
    # ratios ours / reference, paired by repeat
    pairs = [(o, r) for o, r in zip(runs["ours"], runs["reference"]) if not o.get("error") and not r.get("error")]
    if pairs:
        s["wall_ratio_ours_over_ref"] = mmm([o["wall_s"] / r["wall_s"] for o, r in pairs])
        s["in_call_ratio_ours_over_ref"] = mmm([(o.get("timings") or {}).get("total", np.nan) / r["in_call_s"]
                                                for o, r in pairs if r.get("in_call_s")])
        s["cpu_ratio_ours_over_ref"] = mmm([o["cpu_s"] / r["cpu_s"] for o, r in pairs
                                            if o.get("cpu_s") and r.get("cpu_s")])
    wh = [w["wall_s"] for w in runs["whole"] if not w.get("error")]
    if wh and "ours" in s:
        s["ours_over_whole"] = s["ours"]["wall_s"][1] / med(wh)
    return s


def seam_quality(env: Env, name, d, case, keep):
    """F1 vs ground truth and vs whole-volume Cellpose, seam splits/merges (repeat 0 outputs)."""
    import zarr
    from mpicellpose.tools.demo import seam_report
    from mpicellpose.synthetic.metrics import match_objects
    q = {}
    try:
        gt = np.asarray(zarr.open(os.path.join(d, "truth.zarr"), mode="r")[...])
        preds = {}
        for tool in ("whole", "reference", "ours", "ours_blocknorm"):
            p = keep.get(tool)
            if p and os.path.exists(p):
                try:
                    preds[tool] = np.asarray(zarr.open(p, mode="r")[...])
                except Exception as exc:  # noqa: BLE001
                    env.err(f"{name} quality read {tool}", exc)
        bs = (case["blocksize"],) * gt.ndim
        for tool, pred in preds.items():
            e = {"n_labels": int(len(np.unique(pred)) - 1)}
            e["vs_truth"] = match_objects(pred, gt, 0.5)
            if tool != "whole" and "whole" in preds:
                e["vs_whole"] = match_objects(pred, preds["whole"], 0.5)
            e["seam"] = seam_report(pred, gt, bs)
            e["seam_errors"] = (e["seam"]["seam_splits"] + e["seam"]["seam_merges"]
                                + e["seam"].get("seam_fragments", 0))
            q[tool] = e
    except Exception as exc:  # noqa: BLE001
        env.err(f"{name} quality", f"{exc!r}\n{traceback.format_exc()[-1500:]}")
    return q


# --------------------------------------------------------------------------- section 3
def check_against_truth(blocks_dir, out_path):
    """Our merged labels vs make_blocks' exact truth: one final label per true object."""
    import zarr
    truth = np.load(os.path.join(blocks_dir, "truth.npz"))
    grid, block = tuple(int(x) for x in truth["grid"]), tuple(int(x) for x in truth["block"])
    offsets, piece_object = truth["offsets"], truth["piece_object"]
    local = zarr.open(os.path.join(blocks_dir, "local.zarr"), mode="r")
    out = zarr.open(out_path, mode="r")
    pairs = []
    for lin, bidx in enumerate(np.ndindex(*grid)):
        crop = tuple(slice(i * b, (i + 1) * b) for i, b in zip(bidx, block))
        loc = np.asarray(local[crop]).ravel()
        fin = np.asarray(out[crop]).ravel()
        if np.any((loc == 0) != (fin == 0)):
            return {"exact": False, "error": f"foreground differs in block {bidx}"}
        fg = loc > 0
        if not fg.any():
            continue
        obj = piece_object[offsets[lin] + loc[fg].astype(np.int64) - 1]
        key = np.unique(obj.astype(np.int64) << 32 | fin[fg].astype(np.int64))
        pairs.append(key)
    pairs = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
    objs, labs = pairs >> 32, pairs & 0xFFFFFFFF
    lab_per_obj = np.unique(objs, return_counts=True)[1]
    obj_per_lab = np.unique(labs, return_counts=True)[1]
    n_lab = int(np.unique(labs).size)
    return {"n_objects_truth": int(truth["n_objects"]), "n_labels": n_lab,
            "objects_split": int(np.sum(lab_per_obj > 1)), "labels_merging_objects": int(np.sum(obj_per_lab > 1)),
            "labels_compact_1_to_N": bool(n_lab == 0 or (labs.min() == 1 and labs.max() == n_lab)),
            "exact": bool(np.all(lab_per_obj == 1) and np.all(obj_per_lab == 1)
                          and n_lab == int(truth["n_objects"]))}


def same_labels(a_path, b_path, block):
    import zarr
    a, b = zarr.open(a_path, mode="r"), zarr.open(b_path, mode="r")
    if a.shape != b.shape:
        return False
    for idx in np.ndindex(*[int(np.ceil(s / block)) for s in a.shape]):
        sl = tuple(slice(i * block, (i + 1) * block) for i in idx)
        if not np.array_equal(a[sl], b[sl]):
            return False
    return True


def merge_section(env: Env, repeats):
    out = []
    for spec in env.cfg["merge"]:
        G, B = spec["grid"], spec["block"]
        big = spec.get("big", False)
        if big and env.args.skip_big_merge:
            out.append({"grid": G, "skipped": "--skip-big-merge"})
            continue
        if big:
            avail = mem_available()
            if avail < 16 * GiB:
                out.append({"grid": G, "skipped": f"MemAvailable {avail / GiB:.1f} GiB < 16 GiB"})
                log(f"merge {G}^3 skipped: MemAvailable {avail / GiB:.1f} GiB")
                continue
        d, meta = make_blocks_dir(env, G, B, spec["diameter"], spec["gap"])
        rec = {"grid": G, "block": B, "meta": meta, "ours": {}, "reference": []}
        if meta is None:
            rec["error"] = "make_blocks failed"
            out.append(rec)
            continue
        reps = 1 if big else repeats
        local = os.path.join(d, "local.zarr")
        outs = {}
        for R in env.cfg["merge_ranks"]:
            rec["ours"][R] = []
            for rep in range(reps):
                o = os.path.join(env.work, "merge_out", f"g{G}_n{R}.zarr")
                for p in glob.glob(o.replace(".zarr", "") + "*"):
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
                os.makedirs(os.path.dirname(o), exist_ok=True)
                log(f"merge {G}^3: ours, {R} rank(s), repeat {rep + 1}/{reps}")
                r = run_ours(env, R, ["segment", local, o, "--backend", "labels", "--blocksize", B,
                                      "--stitch", "touch", "--overwrite"],
                             json_dir=os.path.join(env.work, "merge_out", f"g{G}_n{R}_r{rep}"),
                             timeout=env.cfg["merge_timeout"], label=f"merge g{G} ours n{R} r{rep}")
                t = r.get("timings") or {}
                r["merge_s"] = sum(t.get(k, 0) for k in ("stitch", "relabel", "table")) if t else None
                r.pop("tree_memory", None)
                for x in r["per_rank"]:
                    x.pop("stats", None)
                rec["ours"][R].append(r)
            outs[R] = o
        # correctness: 1-rank output vs truth; other rank counts byte-identical to it
        try:
            R0 = env.cfg["merge_ranks"][0]
            rec["check"] = check_against_truth(d, outs[R0])
            rec["check"]["identical_across_ranks"] = {str(R): same_labels(outs[R0], outs[R], B)
                                                      for R in env.cfg["merge_ranks"][1:]}
        except Exception as exc:  # noqa: BLE001
            env.err(f"merge g{G} check", repr(exc))
        for R, o in outs.items():
            for p in glob.glob(o.replace(".zarr", "") + "*"):
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        # the reference's merge path
        for rep in range(reps):
            log(f"merge {G}^3: reference, repeat {rep + 1}/{reps}")
            j = os.path.join(env.work, "merge_out", f"ref_g{G}_r{rep}.json")
            if os.path.exists(j):
                os.remove(j)
            cmd = [env.ref_py, os.path.join(HERE, "reference_merge.py"), "--blocks", d, "--json", j,
                   "--relabel-workers", str(RANKS)]
            if big:
                cmd += ["--skip-boxes", "--relabel-sample", "16"]
            avail = mem_available()
            r = env.run(cmd, timeout=env.cfg["merge_timeout"], log_path=os.path.join(env.work, "logs", f"ref_merge_g{G}_r{rep}"),
                        max_total_rss=int(avail - 2 * GiB), min_available=int(1 * GiB))
            res = json.load(open(j)) if os.path.exists(j) else (last_json_line(r.get("stdout_tail")) or {})
            steps = res.get("steps") or {}
            rerr = res.get("error")
            if isinstance(rerr, dict):
                rerr = f"{rerr.get('type')}: {rerr.get('message')}"
            x = {"wall_s": r["wall_s"], "error": r["error"] or rerr,
                 "steps_s": {k: v.get("s") for k, v in steps.items()},
                 "steps_peak_rss": {k: v.get("peak_rss_bytes") for k, v in steps.items()},
                 "steps_peak_delta": {k: v.get("peak_rss_delta_bytes") for k, v in steps.items()},
                 "peak_rss_bytes": res.get("peak_rss_bytes"), "rss_after_import_bytes": res.get("rss_after_import_bytes"),
                 "tree_peak_total_rss": (r.get("memory") or {}).get("peak_total_rss_sampled_bytes"),
                 "label_range": res.get("label_range"), "table_bytes": res.get("table_bytes"),
                 "matrix_shape": res.get("matrix_shape"), "n_face_pairs": res.get("n_face_pairs"),
                 "merge_substeps_s": res.get("merge_substeps_s"), "truth": res.get("truth"),
                 "relabel_extrapolated_s": res.get("relabel_extrapolated_s"),
                 "relabel_s_per_chunk": res.get("relabel_s_per_chunk"),
                 "skipped_boxes": big, "faces_bytes": res.get("faces_bytes")}
            if x["error"]:
                env.err(f"merge g{G} reference r{rep}", x["error"])
            relabel = steps.get("relabel", {}).get("s")
            if relabel is None:
                relabel = res.get("relabel_extrapolated_s")
            parts = [steps.get("merge", {}).get("s"), steps.get("save", {}).get("s"), relabel]
            x["merge_s"] = sum(parts) + (steps.get("boxes", {}).get("s") or 0) if None not in parts else None
            rec["reference"].append(x)
        out.append(rec)
    return out


def summarize_merge(recs):
    rows = []
    for rec in recs:
        if rec.get("skipped") or rec.get("error"):
            rows.append({"grid": rec["grid"], "skipped": rec.get("skipped") or rec.get("error")})
            continue
        m = rec["meta"] or {}
        row = {"grid": rec["grid"], "block": rec["block"], "n_blocks": m.get("n_blocks"),
               "n_objects": m.get("n_objects"), "n_cut_objects": m.get("n_cut_objects"),
               "n_pieces": m.get("n_pieces"), "ours": {}}
        for R, rs in rec["ours"].items():
            ok = [r for r in rs if not r.get("error")]
            if not ok:
                row["ours"][R] = {"error": rs[0].get("error") if rs else "no run"}
                continue
            row["ours"][R] = {
                "merge_s": mmm([r["merge_s"] for r in ok]),
                "total_s": mmm([(r.get("timings") or {}).get("total") for r in ok]),
                "wall_s": mmm([r["wall_s"] for r in ok]),
                "segment_s": mmm([(r.get("timings") or {}).get("segment") for r in ok]),
                "stitch_s": mmm([(r.get("timings") or {}).get("stitch") for r in ok]),
                "relabel_s": mmm([(r.get("timings") or {}).get("relabel") for r in ok]),
                "table_s": mmm([(r.get("timings") or {}).get("table") for r in ok]),
                "peak_rss_rank_bytes": mmm([max(r["hwm_per_rank"]) for r in ok]),
                "peak_delta_rank_bytes": mmm([max(h - b for h, b in zip(r["hwm_per_rank"], r["hwm_before_run_per_rank"]))
                                              for r in ok if None not in r["hwm_before_run_per_rank"]]),
                "comm_bytes_per_rank": ok[0].get("comm_bytes_per_rank"),
            }
        refs = [r for r in rec["reference"] if not r.get("error") and r.get("merge_s")]
        if refs:
            row["reference"] = {
                "merge_s": mmm([r["merge_s"] for r in refs]),
                "merge_step_s": mmm([r["steps_s"].get("merge") for r in refs]),
                "prepare_s": mmm([r["steps_s"].get("prepare") for r in refs]),
                "relabel_s": mmm([r["steps_s"].get("relabel") or r.get("relabel_extrapolated_s") for r in refs]),
                "relabel_extrapolated": refs[0].get("relabel_extrapolated_s") is not None,
                "boxes_s": mmm([r["steps_s"].get("boxes") for r in refs]),
                "peak_rss_bytes": mmm([r.get("peak_rss_bytes") for r in refs]),
                "rss_after_import_bytes": refs[0].get("rss_after_import_bytes"),
                "label_range": refs[0].get("label_range"), "table_bytes": refs[0].get("table_bytes"),
                "truth": refs[0].get("truth"), "skipped_boxes": refs[0].get("skipped_boxes"),
            }
        elif rec["reference"]:
            row["reference"] = {"error": rec["reference"][0].get("error")}
        row["check"] = rec.get("check")
        if "reference" in row and "merge_s" in row["reference"]:
            for R, o in row["ours"].items():
                if o.get("merge_s"):
                    o["speedup_vs_ref"] = row["reference"]["merge_s"][1] / o["merge_s"][1]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- section 4
def memory_section(env: Env):
    spec = env.cfg["memory"]
    B, R = spec["block"], spec["ranks"]
    out = {"backend": "labels (make_blocks.py local.zarr, touch stitching)", "block": B, "ranks": R, "runs": []}
    for G in spec["grids"]:
        d, meta = make_blocks_dir(env, G, B, 12.0, 2.0)
        if meta is None:
            out["runs"].append({"grid": G, "error": "make_blocks failed"})
            continue
        o = os.path.join(env.work, "mem_out", f"g{G}.zarr")
        os.makedirs(os.path.dirname(o), exist_ok=True)
        log(f"memory: volume {G * B}^3 ({G}^3 blocks of {B}^3), {R} ranks, library call")
        r = run_ours(env, R, library={"input": os.path.join(d, "local.zarr"), "output": o, "backend": "labels",
                                      "blocksize": B, "stitch": "touch", "overwrite": True},
                     json_dir=os.path.join(env.work, "mem_out", f"g{G}_json"), timeout=env.cfg["merge_timeout"],
                     label=f"memory g{G}")
        for p in glob.glob(o.replace(".zarr", "") + "*"):
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        out["runs"].append({"grid": G, "volume": [G * B] * 3, "voxels": (G * B) ** 3, "n_objects": meta.get("n_objects"),
                            "n_cut_objects": meta.get("n_cut_objects"), "wall_s": r["wall_s"], "error": r.get("error"),
                            "hwm_per_rank": r["hwm_per_rank"], "hwm_before_run_per_rank": r["hwm_before_run_per_rank"],
                            "comm_bytes_per_rank": r["comm_bytes_per_rank"], "timings": r.get("timings"),
                            "shape": [G * B] * 3, "blocksize": B})
    ok = [x for x in out["runs"] if not x.get("error")]
    if len(ok) == 2:
        a, b = ok
        out["ratio_peak_rank"] = max(b["hwm_per_rank"]) / max(a["hwm_per_rank"])
        try:
            da = max(h - s for h, s in zip(a["hwm_per_rank"], a["hwm_before_run_per_rank"]))
            db = max(h - s for h, s in zip(b["hwm_per_rank"], b["hwm_before_run_per_rank"]))
            out["ratio_peak_delta_rank"] = db / da if da > 0 else None
        except TypeError:
            pass
    return out


# --------------------------------------------------------------------------- section 5
def predict_comm(shape, blocksize, overlap, rule, connectivity, depth, ranks, itemsize=4):
    """Bytes each rank sends in the stitch phase, from the driver's own (pure) geometry.

    Mirrors the run's stitch phase (``phases.faces``): blocks assigned contiguously in grid order by core size; for each
    face pair (a, b) with owners ra != rb, ra sends block a's view ``view_boxes(...)[offset]``
    (uint32) to rb.  Payload bytes only (pickle framing adds ~100 bytes per message).
    """
    from mpicellpose.runner import blocks
    from mpicellpose.runner.phases import faces
    from mpicellpose.grid import geometry as geo
    from mpicellpose.grid import partition
    grid = geo.BlockGrid(tuple(shape), blocksize, overlap)
    kept = list(range(len(grid)))
    weights = [geo.box_size(grid.block(b).core) for b in kept]
    owner = partition.owner_map(partition.assign_contiguous(kept, weights, ranks))
    sent = np.zeros(ranks, np.int64)
    faces_cross = 0
    view_cache = {}
    for a, b, o in faces.face_pairs(grid, kept, rule, connectivity):
        if owner[a] == owner[b]:
            continue
        faces_cross += 1
        if a not in view_cache:
            view_cache = {a: dict(blocks.view_boxes(grid, a, rule, connectivity, depth))}
        box = view_cache[a][o]
        sent[owner[a]] += geo.box_size(box) * itemsize
    return {"per_rank": sent.tolist(), "total": int(sent.sum()), "faces_crossing_ranks": faces_cross,
            "n_blocks": len(grid), "grid": list(grid.grid_shape)}


def comm_section(env: Env, e2e, merge_recs, mem):
    measured = []

    def add(label, rule, shape, blocksize, overlap, ranks, per_rank, depth=8):
        if not per_rank or None in per_rank:
            return
        try:
            pred = predict_comm(shape, blocksize, overlap, rule, 1, depth, ranks)["per_rank"]
        except Exception as exc:  # noqa: BLE001
            pred = None
            env.err("comm model", repr(exc))
        measured.append({"run": label, "rule": rule, "ranks": ranks, "shape": list(shape), "blocksize": blocksize,
                         "overlap": overlap, "measured_per_rank": per_rank, "model_per_rank": pred,
                         "model_matches": pred == per_rank})

    if e2e and e2e.get("runs", {}).get("ours"):
        c = e2e["case"]
        r0 = e2e["runs"]["ours"][0]
        add("end-to-end (cellpose, iou)", "iou", c["shape"], c["blocksize"], c["overlap"], RANKS,
            r0.get("comm_bytes_per_rank"))
    for rec in merge_recs or []:
        for R, rs in (rec.get("ours") or {}).items():
            if rs and not rs[0].get("error"):
                G, B = rec["grid"], rec["block"]
                add(f"merge {G}^3 blocks (labels, touch)", "touch", (G * B,) * 3, B, 0, int(R),
                    rs[0].get("comm_bytes_per_rank"))
    for run in (mem or {}).get("runs", []):
        if not run.get("error"):
            add(f"memory {run['grid']}^3 (library call)", "touch", run["shape"], run["blocksize"], 0,
                mem["ranks"], run["comm_bytes_per_rank"])
    # the 128-rank model (surface, not volume)
    big_shape = (4000, 10000, 10000)
    model = []
    for bs in (256, 512):
        for rule, ov, depth in (("iou", 60, 8), ("touch", 0, 8)):
            try:
                p = predict_comm(big_shape, bs, ov, rule, 1, depth, 128)
            except Exception as exc:  # noqa: BLE001
                env.err("comm model 128", repr(exc))
                continue
            per = np.array(p["per_rank"])
            model.append({"shape": list(big_shape), "blocksize": bs, "rule": rule, "overlap": ov,
                          "iou_depth": depth if rule == "iou" else None, "ranks": 128, "grid": p["grid"],
                          "n_blocks": p["n_blocks"], "faces_crossing_ranks": p["faces_crossing_ranks"],
                          "per_rank_max": int(per.max()), "per_rank_mean": float(per.mean()),
                          "total": p["total"],
                          "labels_volume_bytes": int(np.prod(big_shape)) * 4,
                          "input_volume_bytes_uint16": int(np.prod(big_shape)) * 2})
    return {"measured": measured, "model_128": model}


# --------------------------------------------------------------------------- report
def targets(res):
    t = []
    e = (res.get("e2e") or {}).get("summary") or {}
    if e.get("wall_ratio_ours_over_ref"):
        v = e["wall_ratio_ours_over_ref"][1]
        t.append({"target": "end-to-end wall: ours <= 0.7 x reference", "value": round(v, 3),
                  "met": v <= TARGETS["wall_ratio"]})
    if (e.get("ours") or {}).get("our_work_share"):
        v = e["ours"]["our_work_share"][1]
        t.append({"target": "not Cellpose (I/O, stitch, numbering, relabel, table) <= 5% of our wall",
                  "value": round(v, 4), "met": v <= TARGETS["non_cellpose_share"]})
    for case in ("e2e", "dense"):
        q = (res.get(case) or {}).get("quality") or {}
        if "ours" in q and "reference" in q:
            o, r = q["ours"]["seam_errors"], q["reference"]["seam_errors"]
            t.append({"target": f"{case}: our seam errors <= 1/5 of the reference's", "value": f"{o} vs {r}",
                      "met": o <= TARGETS["seam_error_ratio"] * r if r > 0 else o == 0})
        if "ours" in q and "vs_whole" in q["ours"]:
            v = q["ours"]["vs_whole"]["f1"]
            t.append({"target": f"{case}: our F1 vs whole-volume >= 0.99", "value": round(v, 4),
                      "met": v >= TARGETS["f1_vs_whole"]})
    for row in res.get("merge_summary") or []:
        o2 = (row.get("ours") or {}).get(RANKS) or (row.get("ours") or {}).get(str(RANKS)) or {}
        if o2.get("speedup_vs_ref"):
            t.append({"target": f"merge {row['grid']}^3: >= 10x faster than the reference ({RANKS} ranks)",
                      "value": round(o2["speedup_vs_ref"], 1), "met": o2["speedup_vs_ref"] >= TARGETS["merge_speedup"]})
        if row.get("check"):
            t.append({"target": f"merge {row['grid']}^3: exact against truth, identical at every rank count",
                      "value": f"exact={row['check'].get('exact')}, identical={row['check'].get('identical_across_ranks')}",
                      "met": bool(row["check"].get("exact")) and all((row["check"].get("identical_across_ranks") or {}).values())})
    m = res.get("memory") or {}
    if m.get("ratio_peak_rank"):
        t.append({"target": "peak RSS per rank, 8x volume / 1x volume <= 1.1", "value": round(m["ratio_peak_rank"], 3),
                  "met": m["ratio_peak_rank"] <= TARGETS["memory_ratio"]})
    return t


def mb(x):
    return "n/a" if x is None else f"{x / MiB:.0f}"


def render_md(res):
    L = []
    meta = res["meta"]
    L.append(f"# Benchmarks {meta['date']} ({meta['tag']}){' - QUICK' if meta['quick'] else ''}")
    L.append("")
    L.append(f"Command: `{meta['command']}`  ")
    mi = meta["machine"]
    L.append(f"Machine: {mi['cpu']}, {mi['cores']} cores, {mi['mem_total_bytes'] / GiB:.1f} GiB, {mi['platform']}; "
             f"no GPU used.  ")
    ld = meta.get("load") or {}
    L.append(f"Load average (1 min) during the run: min {ld.get('load1_min')}, mean {ld.get('load1_mean')}, "
             f"max {ld.get('load1_max')} on {mi['cores']} cores"
             + (" - **the machine was shared with other jobs; timings are noisy**" if (ld.get('load1_mean') or 0) > RANKS + 0.5 else "")
             + ".  ")
    if meta.get("other_cpu_users_at_start"):
        L.append("Other processes using CPU at the start: " + "; ".join(
            f"{u['cpu_cores']} core(s) `{u['cmd'][:60]}`" for u in meta["other_cpu_users_at_start"][:4]) + ".  ")
    mo = meta["model"]
    L.append(f"Model: {mo['kind']}: `{os.path.relpath(mo['path'], ROOT)}` (sha256 {str(mo.get('sha256'))[:12]}), "
             f"diameter 16 (= its diam_mean: no rescaling).  ")
    L.append(f"Versions: ours {json.dumps(meta['versions_ours'])}; reference venv "
             f"{json.dumps((meta.get('reference') or {}).get('versions'))}.  ")
    L.append(f"Repeats: {meta['repeats']} (values: median (min-max)). Duration {meta['duration_s'] / 60:.1f} min.")
    ru = meta.get("reused_from")
    if ru:
        L.append("")
        L.append(f"Sections {', '.join(ru['sections'])} come from an earlier invocation on the same machine "
                 f"(`{ru.get('command')}`, {ru.get('started')} to {ru.get('finished')}, results "
                 f"`{ru['file']}`); every comparison inside a section ran in one invocation on the same data.")
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | value | met |")
    L.append("|---|---|---|")
    for t in res.get("targets", []):
        L.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    L.append("")

    for key, title in (("e2e", "1. End to end"), ("dense", "2b. Dense tissue (quality case)")):
        e = res.get(key)
        if not e:
            continue
        c = e["case"]
        s = e["summary"]
        L.append(f"## {title}")
        L.append("")
        L.append(f"Synthetic nuclei {tuple(c['shape'])}, {c['n_objects']} objects ({c.get('touching_pairs')} touching "
                 f"pairs; touching_fraction {c['touching_fraction']}, density {c['density']}), blocksize {c['blocksize']}, "
                 f"overlap {c['overlap']} (= 2 x diameter) for both tools, {c['n_blocks']} blocks, {RANKS} workers/ranks "
                 f"with 1 torch thread each; whole-volume Cellpose: one process, {RANKS} threads.")
        L.append("")
        L.append("| system | command wall s | in-call s | CPU s, all processes | Cellpose s (per rank) | peak RSS per process/rank MiB | labels | load avg at start |")
        L.append("|---|---|---|---|---|---|---|---|")
        w, r, o = s.get("whole", {}), s.get("reference", {}), s.get("ours", {})
        if w:
            L.append(f"| whole-volume Cellpose (1 process) | {fmt_mmm(w['wall_s'])} | - | {fmt_mmm(w.get('cpu_s'))} | "
                     f"{fmt_mmm(w.get('eval_s'))} | "
                     f"{fmt_mmm(w.get('peak_rss_bytes'), 0, 1 / MiB)} | {(e['quality'].get('whole') or {}).get('n_labels', 'n/a')} | "
                     f"{fmt_mmm(w.get('load1_at_start'))} |")
        if r:
            L.append(f"| reference (dask, {RANKS} workers) | {fmt_mmm(r['wall_s'])} | {fmt_mmm(r.get('in_call_s'))} | "
                     f"{fmt_mmm(r.get('cpu_s'))} | n/a | "
                     f"workers {fmt_mmm(r.get('peak_rss_worker_bytes'), 0, 1 / MiB)}, client+scheduler "
                     f"{fmt_mmm(r.get('peak_rss_client_bytes'), 0, 1 / MiB)} | {r.get('n_labels')} | "
                     f"{fmt_mmm(r.get('load1_at_start'))} |")
        if o:
            L.append(f"| mpicellpose ({RANKS} ranks) | {fmt_mmm(o['wall_s'])} | {fmt_mmm(o.get('in_call_s'))} | "
                     f"{fmt_mmm(o.get('cpu_s'))} | "
                     f"{fmt_mmm(o.get('cellpose_s_mean_rank'))} | {fmt_mmm(o.get('peak_rss_rank_bytes'), 0, 1 / MiB)} | "
                     f"{o.get('n_labels')} | {fmt_mmm(o.get('load1_at_start'))} |")
        L.append("")
        if s.get("wall_ratio_ours_over_ref"):
            L.append(f"Ours / reference: command wall {fmt_mmm(s['wall_ratio_ours_over_ref'], 3)}, in-call "
                     f"{fmt_mmm(s.get('in_call_ratio_ours_over_ref'), 3)}, CPU seconds "
                     f"{fmt_mmm(s.get('cpu_ratio_ours_over_ref'), 3)} (paired by repeat; CPU seconds are less "
                     f"sensitive than wall time to other jobs on the machine). "
                     + (f"Ours / whole-volume: {s['ours_over_whole']:.2f}." if s.get("ours_over_whole") else ""))
            L.append("")
        if o:
            L.append("Our phases (rank 0's `timings`, s): " + ", ".join(
                f"{ph} {fmt_mmm(o.get(ph), 2)}" for ph in ("plan", "normalize", "model_load", "segment", "stitch",
                                                           "relabel", "table")) +
                f"; inside segment, per rank: Cellpose (`model.eval`) {fmt_mmm(o.get('cellpose_s_mean_rank'))} (mean of ranks; "
                f"of it network {fmt_mmm(o.get('cp_network_s_mean_rank'))}, masks {fmt_mmm(o.get('cp_masks_s_mean_rank'))}), "
                f"read {fmt_mmm(o.get('read_s_max_rank'), 2)}, renumber+scratch+record {fmt_mmm(o.get('finish_s_max_rank'), 2)} "
                f"(max of ranks); interpreter start + imports + configuration before `run()` "
                f"{fmt_mmm(o.get('import_s_max_rank'), 2)}; mpiexec launch/teardown outside the ranks' Python "
                f"{fmt_mmm(o.get('launch_s'), 2)}.  ")
            L.append(f"Our own work (read + write of blocks on the slowest rank, normalisation sampling, stitch "
                     f"incl. numbering, relabel, table): {fmt_mmm(o.get('our_work_s'), 2)} s = "
                     f"{fmt_mmm(o.get('our_work_share'), 2, 100, '%')} of the wall. Start-up (plan incl. "
                     f"`import cellpose`, model load): {fmt_mmm(o.get('startup_s'), 1)} s.  ")
            L.append(f"Everything that is not Cellpose's eval, incl. imports, model load and waiting for the slower "
                     f"rank (1 - mean per-rank Cellpose time / command wall): "
                     f"{fmt_mmm(o.get('non_cellpose_share'), 1, 100, '%')}; of the in-call time: "
                     f"{fmt_mmm(o.get('non_cellpose_share_in_call'), 1, 100, '%')}.")
            L.append("")
        if w and w.get("network_s"):
            L.append(f"Whole-volume phases (s): eval {fmt_mmm(w.get('eval_s'))} = network {fmt_mmm(w.get('network_s'))} "
                     f"+ masks {fmt_mmm(w.get('masks_s'))} + Cellpose's own normalisation/conversion.")
            L.append("")
        if r:
            L.append("Reference phases (s): " + ", ".join(
                f"{ph[:-2]} {fmt_mmm(r.get(ph), 2)}" for ph in ("import_s", "cluster_start_s", "segment_s", "merge_s",
                                                                "relabel_s", "boxes_s", "cluster_close_s")) + ".")
            L.append("")
        q = e.get("quality") or {}
        if q:
            L.append("Quality (repeat 1 outputs; F1 = object F1 at IoU >= 0.5; seam = ground-truth objects cut by "
                     "block faces: rejoined, split across a seam, merged with another object across a seam; "
                     "fragments = labels matching no true object with a voxel next to a block face):")
            L.append("")
            L.append("| system | labels | F1 vs truth | F1 vs whole-volume | cut | rejoined | seam splits | seam merges "
                     "| seam fragments |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for tool, lab in (("whole", "whole-volume (control)"), ("reference", "reference"), ("ours", "mpicellpose"),
                              ("ours_blocknorm", "mpicellpose --normalize block (variant)")):
                x = q.get(tool)
                if not x:
                    continue
                vw = x.get("vs_whole", {}).get("f1")
                L.append(f"| {lab} | {x['n_labels']} | {x['vs_truth']['f1']:.4f} | "
                         f"{'-' if vw is None else f'{vw:.4f}'} | {x['seam']['cut']} | {x['seam']['rejoined']} | "
                         f"{x['seam']['seam_splits']} | {x['seam']['seam_merges']} | "
                         f"{x['seam'].get('seam_fragments', 'n/a')} |")
            L.append("")

    rows = res.get("merge_summary") or []
    if rows:
        L.append("## 3. Merge at scale, no inference")
        L.append("")
        L.append("`make_blocks.py` per-block labels (spheres cut by faces, exact truth). Ours: `mpiexec -n R python -m "
                 "mpicellpose segment local.zarr out.zarr --backend labels --blocksize B --stitch touch`; merge = "
                 "stitch + relabel + table phases (numbering is inside stitch). Reference: `reference_merge.py` = its "
                 "`determine_merge_relabeling` + table save + dask relabel of every chunk (2 threads) + "
                 "`merge_all_boxes`, serial on the client as in the reference. Peak RSS: per rank (ours; in "
                 "parentheses the growth during the run above the imported interpreter) / the client process "
                 "(reference, which imports cellpose+torch: its baseline after import is given).")
        L.append("")
        L.append("| grid | blocks | objects | cut | system | merge s | total s | peak RSS/rank MiB | speedup | exact |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            if row.get("skipped"):
                L.append(f"| {row['grid']}^3 | | | | skipped: {row['skipped']} | | | | | |")
                continue
            ck = row.get("check") or {}
            for R, o in row["ours"].items():
                if o.get("error"):
                    L.append(f"| {row['grid']}^3 | {row['n_blocks']} | {row['n_objects']} | {row['n_cut_objects']} | "
                             f"ours {R} rank(s) | error: {str(o['error'])[:80]} | | | | |")
                    continue
                L.append(f"| {row['grid']}^3 | {row['n_blocks']} | {row['n_objects']} | {row['n_cut_objects']} | "
                         f"ours, {R} rank(s) | {fmt_mmm(o['merge_s'], 2)} | {fmt_mmm(o['total_s'], 2)} | "
                         f"{fmt_mmm(o['peak_rss_rank_bytes'], 0, 1 / MiB)} (+{fmt_mmm(o.get('peak_delta_rank_bytes'), 0, 1 / MiB)}) | "
                         f"{o.get('speedup_vs_ref', float('nan')):.1f}x | "
                         f"{ck.get('exact') if str(R) == str(list(row['ours'])[0]) else ck.get('identical_across_ranks', {}).get(str(R))} |")
            rf = row.get("reference")
            if rf and rf.get("error"):
                L.append(f"| {row['grid']}^3 | | | | reference | error: {str(rf['error'])[:100]} | | | | |")
            elif rf:
                tr = rf.get("truth") or {}
                L.append(f"| {row['grid']}^3 | {row['n_blocks']} | {row['n_objects']} | {row['n_cut_objects']} | "
                         f"reference (client) | {fmt_mmm(rf['merge_s'], 2)}{' (relabel extrapolated, boxes skipped)' if rf.get('relabel_extrapolated') else ''} | "
                         f"+ prepare {fmt_mmm(rf.get('prepare_s'), 2)} | {fmt_mmm(rf.get('peak_rss_bytes'), 0, 1 / MiB)} "
                         f"(after import {mb(rf.get('rss_after_import_bytes'))}) | 1x | "
                         f"{tr.get('exact')} ({tr.get('objects_split')} split, {tr.get('labels_merging_objects')} merged) |")
        L.append("")
        for row in rows:
            rf = row.get("reference") or {}
            if rf.get("label_range"):
                L.append(f"- {row['grid']}^3: the reference's ID range {rf['label_range']:,} (union-find and lookup "
                         f"table over all of it: {rf['table_bytes'] / MiB:.0f} MiB table) for {row['n_pieces']:,} pieces; "
                         f"ours handles {row['n_pieces']:,} provisional IDs and one edge per cut-object contact. "
                         f"Reference merge steps: merge {fmt_mmm(rf.get('merge_step_s'), 2)}, relabel "
                         f"{fmt_mmm(rf.get('relabel_s'), 2)}, boxes {fmt_mmm(rf.get('boxes_s'), 2)} s.")
        L.append("")

    m = res.get("memory")
    if m and m.get("runs"):
        L.append("## 4. Memory vs volume size")
        L.append("")
        L.append(f"Backend: {m['backend']}; blocksize {m['block']}, {m['ranks']} ranks, run as a library call "
                 f"(`mpicellpose.run(RunConfig(...), comm)`).")
        L.append("")
        L.append("| volume | voxels | objects | wall s | peak RSS per rank MiB | growth during run MiB |")
        L.append("|---|---|---|---|---|---|")
        for x in m["runs"]:
            if x.get("error"):
                L.append(f"| {x['grid']}^3 blocks | | | error: {str(x['error'])[:80]} | | |")
                continue
            L.append(f"| {'x'.join(map(str, x['volume']))} | {x['voxels']:,} | {x['n_objects']:,} | {x['wall_s']:.1f} | "
                     f"{', '.join(mb(h) for h in x['hwm_per_rank'])} | "
                     f"{', '.join(mb(h - b) if b else 'n/a' for h, b in zip(x['hwm_per_rank'], x['hwm_before_run_per_rank']))} |")
        L.append("")
        if m.get("ratio_peak_rank"):
            L.append(f"Ratio of the largest per-rank peak, 8x volume / 1x: **{m['ratio_peak_rank']:.3f}** "
                     f"(growth only: {m.get('ratio_peak_delta_rank') or float('nan'):.2f}).")
            L.append("")

    c = res.get("comm")
    if c:
        L.append("## 5. Communication (stitch phase)")
        L.append("")
        L.append("Bytes of face views each rank sends (`RunResult.stats['comm_bytes_sent']`, per rank), and the "
                 "model's prediction from the driver's own block geometry (`predict_comm` in run_all.py: contiguous "
                 "assignment in grid order; for each face between blocks on different ranks the lower block's owner "
                 "sends its view: touch = 1 plane of the face, iou = a band of 2 x min(iou_depth, overlap) planes; "
                 "uint32).")
        L.append("")
        L.append("| run | rule | ranks | measured bytes per rank | model | match |")
        L.append("|---|---|---|---|---|---|")
        for x in c["measured"]:
            L.append(f"| {x['run']} | {x['rule']} | {x['ranks']} | {x['measured_per_rank']} | {x['model_per_rank']} | "
                     f"{'yes' if x['model_matches'] else 'no'} |")
        L.append("")
        if c.get("model_128"):
            L.append("Model for 128 ranks on a 4000 x 10000 x 10000 volume (4 x 10^11 voxels; uint32 labels "
                     "1.6 TB, uint16 input 0.8 TB):")
            L.append("")
            L.append("| blocksize | rule | blocks | faces crossing ranks | max per rank | total | total / labels volume |")
            L.append("|---|---|---|---|---|---|---|")
            for x in c["model_128"]:
                L.append(f"| {x['blocksize']} | {x['rule']}{' depth ' + str(x['iou_depth']) if x['iou_depth'] else ''} | "
                         f"{x['n_blocks']:,} | {x['faces_crossing_ranks']:,} | {x['per_rank_max'] / GiB:.2f} GiB | "
                         f"{x['total'] / GiB:.1f} GiB | {x['total'] / x['labels_volume_bytes'] * 100:.2f}% |")
            L.append("")
            L.append("Per face: touch sends face area x 1 plane x 4 bytes, iou face area x 2·depth planes x 4 bytes "
                     "(depth = min(iou_depth, overlap)); only faces whose two blocks sit on different ranks cross the "
                     "network, and each face is sent once (by the lower block's owner). The amount grows with the "
                     "surface between the ranks' contiguous runs of blocks, not with the volume; rank 0 receives only "
                     "the edge list (one pair of int64 per cut-object contact).")
            L.append("")

    L.append("## 6. GPU")
    L.append("")
    L.append(res.get("gpu", "not measured here"))
    L.append("")
    if res.get("errors"):
        L.append("## Errors recorded")
        L.append("")
        for e in res["errors"]:
            L.append(f"- {e['where']}: {e['error'][:400]}")
        L.append("")
    L.append(f"Raw numbers: `{os.path.basename(res['meta']['json_name'])}`; plot: `{os.path.basename(res['meta']['png_name'])}`.")
    return "\n".join(L) + "\n"


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib unavailable: {exc!r}"
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    # (a) end to end
    ax = axes[0]
    e = (res.get("e2e") or {}).get("summary") or {}
    names, vals, lo, hi, cp = [], [], [], [], []
    for tool, lab in (("whole", "whole-volume\n(1 process)"), ("reference", f"reference\n({RANKS} workers)"),
                      ("ours", f"mpicellpose\n({RANKS} ranks)")):
        if tool in e:
            a, m, b = e[tool]["wall_s"]
            names.append(lab); vals.append(m); lo.append(m - a); hi.append(b - m)
            cp.append((e[tool].get("eval_s") or e[tool].get("cellpose_s_mean_rank") or (None, None, None))[1])
    x = np.arange(len(names))
    ax.bar(x, vals, yerr=[lo, hi], capsize=4, color=["#999999", "#d62728", "#1f77b4"][:len(names)], alpha=0.85)
    for i, c in enumerate(cp):
        if c:
            ax.bar(x[i], c, width=0.5, color="none", edgecolor="k", hatch="//", label="Cellpose itself" if i == len(cp) - 1 else None)
    ax.set_xticks(x, names)
    ax.set_ylabel("wall time (s)")
    ax.set_title("End to end (median, min-max)")
    ax.legend(loc="upper left", fontsize=8)
    # (b) merge time vs blocks
    ax = axes[1]
    rows = [r for r in (res.get("merge_summary") or []) if not r.get("skipped")]
    if rows:
        nb = [r["n_blocks"] for r in rows]
        for R in sorted({int(k) for r in rows for k in r["ours"]}):
            ys = [((r["ours"].get(R) or r["ours"].get(str(R)) or {}).get("merge_s") or (None, None, None))[1] for r in rows]
            ax.plot(nb, ys, "o-", label=f"mpicellpose {R} rank(s)")
        ys = [((r.get("reference") or {}).get("merge_s") or (None, None, None))[1] for r in rows]
        ax.plot(nb, ys, "s--", color="#d62728", label="reference (client)")
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel("blocks"); ax.set_ylabel("merge time (s)")
        ax.legend(fontsize=8)
    ax.set_title("Merge without inference")
    # (c) memory
    ax = axes[2]
    if rows:
        for R in sorted({int(k) for r in rows for k in r["ours"]}):
            ys = [(((r["ours"].get(R) or r["ours"].get(str(R)) or {}).get("peak_rss_rank_bytes") or (0, 0, 0))[1]) / MiB
                  for r in rows]
            ax.plot(nb, ys, "o-", label=f"mpicellpose {R} rank(s), per rank")
        ys = [(((r.get("reference") or {}).get("peak_rss_bytes") or (0, 0, 0))[1]) / MiB for r in rows]
        ax.plot(nb, ys, "s--", color="#d62728", label="reference client")
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel("blocks"); ax.set_ylabel("peak RSS (MiB)")
        ax.legend(fontsize=8)
    ax.set_title("Peak memory, merge without inference")
    fig.suptitle(f"mpicellpose vs cellpose.contrib.distributed_segmentation - {res['meta']['date']} "
                 f"{res['meta']['tag']}{' (quick)' if res['meta']['quick'] else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def print_summary(res):
    print()
    print("=" * 100)
    for t in res.get("targets", []):
        print(f"{'MET ' if t['met'] else 'MISS'}  {t['target']}: {t['value']}")
    print("=" * 100)


# --------------------------------------------------------------------------- main
def render_only(path, work=None) -> int:
    with open(path) as f:
        res = json.load(f)

    class _Errors:
        def err(self, where, msg):
            res.setdefault("errors", []).append({"where": where, "error": str(msg)})

    for key in ("e2e", "dense"):
        if (res.get(key) or {}).get("runs"):
            res[key]["summary"] = summarize_e2e(res[key]["runs"])
        d = os.path.join(work, key) if work else None
        if d and os.path.isdir(d) and res.get(key):  # re-score the kept repeat-1 outputs
            keep = {t: os.path.join(d, f"{p}_r0.zarr") for t, p in
                    (("whole", "whole"), ("reference", "ref"), ("ours", "ours"), ("ours_blocknorm", "ours_blocknorm"))}
            res[key]["quality"] = seam_quality(_Errors(), key, d, res[key]["case"]["case"], keep)
    res["targets"] = targets(res)
    stem = path[:-5] if path.endswith(".json") else path
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    perr = plot(res, stem + ".png")
    if perr:
        print(f"plot: {perr}", file=sys.stderr)
    with open(stem + ".md", "w") as f:
        f.write(render_md(res))
    print_summary(res)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small cases (a few minutes)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of every timed run (default 3; quick 1)")
    p.add_argument("--whole-repeats", type=int, default=1,
                   help="repeats of the whole-volume baseline (it is the quality oracle; default 1)")
    p.add_argument("--sections", default="1,2,3,4,5", help="comma list of 1..5 (2 needs 1; 5 uses 1, 3, 4)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense-tissue quality case")
    p.add_argument("--skip-big-merge", action="store_true", help="skip the 16^3-block merge case")
    p.add_argument("--no-variants", dest="variants", action="store_false",
                   help="skip the quality-only variant (ours with --normalize block)")
    p.add_argument("--model", default=None, help="Cellpose 3 weights file (default: the shipped demo model, "
                                                  "else the stand-in)")
    p.add_argument("--tag", default=None, help="machine tag in the result file names (default: hostname)")
    p.add_argument("--work", default=os.path.join(HERE, "work", "run_all"))
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--nice", type=int, default=5, help="nice level of every heavy subprocess (default 5)")
    p.add_argument("--reuse", default=None, metavar="JSON",
                   help="results of an earlier run_all invocation: its sections that are not run now are copied "
                        "into this report (marked in meta.reused_from)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rebuild the summaries, targets, .md and .png of an existing report")
    a = p.parse_args(argv)
    if a.render:
        return render_only(a.render, a.work)
    if a.repeats is None:
        a.repeats = 1 if a.quick else 3
    sections = {int(s) for s in a.sections.split(",") if s.strip()}
    t_start = time.time()
    env = Env(a)
    env.cfg = QUICK if a.quick else FULL
    tag = a.tag or socket.gethostname().split(".")[0]
    if a.quick:
        tag += "-quick"
    date = datetime.date.today().isoformat()
    os.makedirs(a.results, exist_ok=True)
    stem = os.path.join(a.results, f"{date}-{tag}")
    loadmon = LoadMonitor().start()
    res = {"meta": {"date": date, "tag": tag, "quick": a.quick, "repeats": a.repeats,
                    "command": "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": machine_info(), "ranks": RANKS, "sections": sorted(sections),
                    "json_name": stem + ".json", "png_name": stem + ".png"},
           "gpu": "Not measured here: this run had no GPU. GPU numbers are measured separately."}
    if a.reuse:
        with open(a.reuse) as f:
            old = json.load(f)
        keys = {1: ("e2e",), 2: ("dense",), 3: ("merge", "merge_summary"), 4: ("memory",), 5: ("comm",)}
        copied = []
        for sec, names in keys.items():
            if sec in sections:
                continue
            for k in names:
                if old.get(k) is not None:
                    res[k] = old[k]
                    copied.append(k)
        res["meta"]["reused_from"] = {"file": os.path.basename(a.reuse), "sections": copied,
                                      "command": (old.get("meta") or {}).get("command"),
                                      "started": (old.get("meta") or {}).get("started"),
                                      "finished": (old.get("meta") or {}).get("finished"),
                                      "load": (old.get("meta") or {}).get("load")}
    log(f"run_all: {'quick' if a.quick else 'full'}, {a.repeats} repeat(s), sections {sorted(sections)}, results {stem}.*")
    try:
        res["meta"]["other_cpu_users_at_start"] = other_cpu_users(os.getpid())
    except Exception:  # noqa: BLE001
        pass
    res["meta"]["versions_ours"] = versions_ours()
    res["meta"]["reference"] = ensure_reference(env)
    env.model = ensure_model(env)
    res["meta"]["model"] = env.model
    log(f"model: {env.model['kind']} at {env.model['path']}")

    def section(name, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            env.err(name, f"{exc!r}\n{traceback.format_exc()[-2000:]}")
            return None

    def save():
        res["errors"] = env.errors
        res["targets"] = targets(res)
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1, default=str)

    if 1 in sections or 2 in sections:
        if env.model["exists"]:
            res["e2e"] = section("e2e", lambda: e2e_case(env, "e2e", env.cfg["e2e"], a.repeats, a.whole_repeats))
            save()
            if 2 in sections and not a.no_dense:
                res["dense"] = section("dense", lambda: e2e_case(env, "dense", env.cfg["dense"], 1, 1))
                save()
        else:
            env.err("e2e", f"no model file at {env.model['path']}")
    if 3 in sections:
        recs = section("merge", lambda: merge_section(env, a.repeats))
        res["merge"] = recs
        res["merge_summary"] = summarize_merge(recs or [])
        save()
    if 4 in sections:
        res["memory"] = section("memory", lambda: memory_section(env))
        save()
    if 5 in sections:
        res["comm"] = section("comm", lambda: comm_section(env, res.get("e2e"), res.get("merge"), res.get("memory")))
    res["meta"]["load"] = loadmon.stop()
    res["meta"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    res["meta"]["duration_s"] = round(time.time() - t_start, 1)
    save()
    perr = plot(res, stem + ".png")
    if perr:
        env.err("plot", perr)
        save()
    md = render_md(res)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print_summary(res)
    log(f"wrote {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
