"""Issue 12 side by side: the flows pipeline, the blocks pipeline and whole-volume Cellpose.

Run with the project venv's Python from the repository root::

    .venv/bin/python benchmarks/pipeline.py [--quick] [--reference] [--ranks-check | --no-ranks-check]
                                            [--repeats N] [--flow-halo N] [--cases e2e,dense]
    .venv/bin/python benchmarks/pipeline.py --render benchmarks/results/DATE-pipeline.json   # tables only

One invocation, one machine, the same data and model for every tool:

* cases: ``FULL["e2e"]`` and ``FULL["dense"]`` of ``run_all.py`` (160^3, blocksize 80, overlap 32,
  diameter 16, the shipped demo model); ``--quick``: ``QUICK`` (48x96x96, blocksize 48);
* tools: ``whole`` (``whole_volume.py``: whole-volume Cellpose, one process, 2 threads),
  ``flows`` (``mpiexec -n 2 ... segment --pipeline flows --threads 1``), ``blocks`` (same with
  ``--pipeline blocks``: the pipeline as it was before issue 12) and, with ``--reference``,
  ``reference`` (Cellpose's ``distributed_segmentation`` in ``benchmarks/.venv-reference``, 2
  workers; slow, and its venv is created by ``setup_reference_env.sh`` when missing);
* per tool and case: wall seconds (the whole subprocess, imports included), phase timings from
  the output's ``mpicellpose`` attributes, network evaluations per output voxel (planned, from
  the run's ``cost`` and from ``mpicellpose plan --json``; measured:
  ``network_voxels_measured`` / output voxels), flow-scratch bytes per voxel (planned and, for
  the flows run, on disk), peak RSS per rank; quality (``run_all.seam_quality``): F1 and mean
  matched IoU vs whole-volume Cellpose (IoU 0.5), F1 vs ground truth, seam errors (splits +
  merges + fragments);
* determinism (``--ranks-check``, default on with ``--quick``): the flows pipeline's labels at
  1, 2 and 3 ranks, compared with ``numpy.array_equal``;
* ratios: flows/whole, blocks/whole, flows/reference, blocks/reference, flows/blocks (walls);
* the planned cost at a typical cluster setting (256^3 blocks, diameter 30, default overlap)
  from ``mpicellpose plan --json`` on an empty 4096^3 array (nothing is read or segmented).

Prints a table shaped like issue 12's "Must show" (today = ``--pipeline blocks`` measured now,
new = ``--pipeline flows``) and writes ``benchmarks/results/<YYYY-MM-DD>-pipeline[-quick].{json,md}``.
``os.getloadavg()`` is recorded at the start of every timed run (another process may load the
machine), with the load over the whole invocation and the machine.  Every subprocess has a
timeout; a failure is recorded in the results, never fatal.  Scratch: ``benchmarks/work/pipeline/``.

How the run's ``cost`` is read: the output's attributes (``zarr.open(out).attrs["mpicellpose"]
["cost"]``) when mpicellpose writes it there; otherwise the ranks are started through this file
(``pipeline.py _rank``, via a two-line shell shim written to the scratch folder and given to
``run_all.run_ours`` as the interpreter), which runs ``ours_runner.py`` unchanged and, after
``driver.run`` returns, saves ``RunResult.stats["cost"]`` next to the rank reports.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import run_all as ra  # noqa: E402
from _bench_util import last_json_line, machine_info  # noqa: E402

RANKS = ra.RANKS                       # 2: one per core, as in run_all
RANKS_CHECK = (1, 2, 3)
BIG = dict(shape=(4096, 4096, 4096), blocksize=256, diameter=30)   # issue 12's "typical cluster setting"
TARGETS = {"net_e2e": 1.5, "net_256": 1.3, "wall_over_whole": 1.2, "wall_over_ref": 0.3, "f1_vs_whole": 0.995}
TOOLS = ("whole", "flows", "blocks", "reference")
RATIO_KEYS = ("flows/whole", "blocks/whole", "flows/reference", "blocks/reference", "flows/blocks")
# run_all.seam_quality knows these tool names only: ours are passed under them and renamed back
QUALITY_ALIAS = {"whole": "whole", "reference": "reference", "flows": "ours", "blocks": "ours_blocknorm"}
log = ra.log


# --------------------------------------------------------------------------- rank side
def rank_main(argv) -> int:
    """``pipeline.py _rank OURS_RUNNER.py --json-dir D -- ARGS``: one rank of ``ours_runner.py``,
    plus ``D/cost-rank-<r>.json`` with the run's ``stats["cost"]`` (the planned and measured
    network work), which ``ours_runner`` leaves out of its report."""
    rest = list(argv[1:])
    json_dir = rest[rest.index("--json-dir") + 1] if "--json-dir" in rest else None
    import ours_runner
    from mpicellpose.runner import driver

    orig = driver.run

    def run(cfg, comm=None):
        res = orig(cfg, comm)
        try:
            from mpi4py import MPI
            rank = (comm or MPI.COMM_WORLD).Get_rank()
            if json_dir:
                os.makedirs(json_dir, exist_ok=True)
                with open(os.path.join(json_dir, f"cost-rank-{rank:05d}.json"), "w") as f:
                    json.dump({"cost": (getattr(res, "stats", None) or {}).get("cost")}, f, default=str)
        except Exception as exc:  # noqa: BLE001 - the benchmark's bookkeeping must not fail a run
            print(f"pipeline.py _rank: could not save the cost: {exc!r}", file=sys.stderr)
        return res

    driver.run = run
    return ours_runner.main(rest)


def make_shim(env) -> str:
    """An executable that ``run_all.run_ours`` can use as its interpreter: it starts this file's
    ``_rank`` mode with the project venv's Python."""
    path = os.path.join(env.work, "bin", "python-rank")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.abspath(__file__)}" _rank "$@"\n')
    os.chmod(path, 0o755)
    return path


# --------------------------------------------------------------------------- helpers
def med(xs):
    xs = [float(x) for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rnd(x, d=3):
    return None if x is None else round(float(x), d)


def loadavg():
    return [round(v, 2) for v in os.getloadavg()]


def remove_output(out):
    """The output array and everything mpicellpose writes next to it (tables, boxes, work dir, lock)."""
    stem = out[:-5] if out.endswith(".zarr") else out
    for p in [out] + [stem + s for s in (".objects.csv", ".objects.parquet", ".boxes.npy", ".mpicellpose-work",
                                          ".mpicellpose-lock")]:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)


def dir_bytes(path):
    total = 0
    for dp, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.path.getsize(os.path.join(dp, f))
            except OSError:
                pass
    return total


def output_attrs(path):
    import zarr
    return dict(zarr.open(path, mode="r").attrs.get("mpicellpose", {}) or {})


def read_labels(path):
    import zarr
    return np.asarray(zarr.open(path, mode="r")[...])


# --------------------------------------------------------------------------- planned cost
def plan_cost(env, img, case, pipeline, flow_halo, label, overlap=True):
    """``mpicellpose plan --json``'s ``network`` (planned cost of both pipelines), or None."""
    out = os.path.join(env.work, "plan_out", f"{label}.zarr")
    cmd = [env.py, "-m", "mpicellpose", "plan", img, out, "--model", env.model["path"],
           "--diameter", str(case["diameter"]), "--blocksize", str(case["blocksize"]),
           "--pipeline", pipeline, "--ranks", str(RANKS), "--json"]
    if overlap:
        cmd += ["--overlap", str(case["overlap"])]
    if flow_halo is not None and pipeline == "flows":
        cmd += ["--flow-halo", str(flow_halo)]
    r = env.run(cmd, timeout=300, log_path=os.path.join(env.work, "logs", f"plan_{label}"))
    try:
        rep = json.loads(open(os.path.join(env.work, "logs", f"plan_{label}.out")).read())
        return {"network": rep.get("network"), "overlap": rep.get("overlap"), "blocks": rep.get("blocks"),
                "warnings": rep.get("warnings")}
    except Exception as exc:  # noqa: BLE001
        env.err(f"plan {label}", f"{exc!r}; {r.get('error')} {r.get('stderr_tail', '')[-500:]}")
        return None


def big_plan(env, flow_halo):
    """Planned network work at 256^3 blocks, diameter 30, default overlap: ``plan`` on an empty
    4096^3 array (16^3 blocks) and the interior-block formulas."""
    from _zarrcompat import create_v2
    img = os.path.join(env.work, "empty_4096.zarr")
    if not os.path.exists(os.path.join(img, ".zarray")):
        create_v2(img, BIG["shape"], (BIG["blocksize"],) * 3, np.uint16)   # metadata only: no chunk written
    case = dict(BIG, overlap=None)
    rec = {"setting": {"shape": list(BIG["shape"]), "blocksize": BIG["blocksize"], "diameter": BIG["diameter"],
                       "overlap": "default (2 x diameter)"}}
    p = plan_cost(env, img, case, "flows", flow_halo, "big_flows", overlap=False)
    if p and p.get("network"):
        net = p["network"]
        B, o, h = BIG["blocksize"], (p.get("overlap") or [60])[0], net.get("flow_halo")
        G = net.get("flow_slab") or 1
        rec.update({"plan": net, "overlap": p.get("overlap"), "blocks": p.get("blocks"),
                    "interior_blocks_per_voxel": round(((B + 2 * o) / B) ** 3, 4),
                    "interior_flows_per_voxel": round(((G * B + 2 * h) / (G * B)) ** 2, 4) if h is not None else None})
    return rec


# --------------------------------------------------------------------------- the tools
def whole_run(env, d, img, case, rep):
    """Whole-volume Cellpose in one process with RANKS threads (the call of run_all's e2e_case)."""
    out = os.path.join(d, f"whole_r{rep}.zarr")
    shutil.rmtree(out, ignore_errors=True)
    j = os.path.join(d, f"whole_r{rep}.json")
    la = loadavg()
    r = env.run([env.py, os.path.join(HERE, "whole_volume.py"), "--input", img, "--output", out,
                 "--model", env.model["path"], "--diameter", str(case["diameter"]), "--threads", str(RANKS),
                 "--chunks", str(case["blocksize"]), "--json", j],
                timeout=env.cfg["e2e_timeout"], env=env.env_whole, log_path=os.path.join(d, "logs", f"whole_r{rep}"))
    res = last_json_line(r.get("stdout_tail")) or {}
    rec = {"wall_s": r["wall_s"], "error": r["error"] or res.get("error"), "loadavg_at_start": la,
           "cpu_s": ra.tree_cpu_s(r), "peak_rss_per_rank": [res.get("vm_hwm_bytes")],
           **{k: res.get(k) for k in ("import_s", "read_s", "model_load_s", "eval_s", "network_s", "masks_s",
                                     "write_s", "n_labels")}}
    if rec["error"]:
        env.err(f"{os.path.basename(d)} whole r{rep}", rec["error"])
    return rec, out


def reference_run(env, d, img, case, rep):
    """The reference on 2 dask workers (the call of run_all's e2e_case)."""
    out = os.path.join(d, f"ref_r{rep}.zarr")
    shutil.rmtree(out, ignore_errors=True)
    j = os.path.join(d, f"ref_r{rep}.json")
    if os.path.exists(j):
        os.remove(j)
    la = loadavg()
    r = env.run([env.ref_py, os.path.join(HERE, "reference_runner.py"), "--input", img, "--output", out,
                 "--blocksize", str(case["blocksize"]), "--workers", str(RANKS), "--threads", "1",
                 "--model", env.model["path"], "--diameter", str(case["diameter"]), "--do-3d", "--no-count",
                 "--json", j],
                timeout=env.cfg["e2e_timeout"], log_path=os.path.join(d, "logs", f"ref_r{rep}"))
    res = json.load(open(j)) if os.path.exists(j) else (last_json_line(r.get("stdout_tail")) or {})
    rerr = res.get("error")
    if isinstance(rerr, dict):
        rerr = f"{rerr.get('type')}: {rerr.get('message')}"
    mem = res.get("memory") or {}
    workers = [p for p in mem.get("processes", []) if p.get("role") == "worker"]
    rec = {"wall_s": r["wall_s"], "error": r["error"] or rerr, "loadavg_at_start": la, "cpu_s": ra.tree_cpu_s(r),
           "in_call_s": res.get("wall_s"), "phases": res.get("phases"), "n_labels": res.get("n_boxes"),
           "peak_rss_per_rank": [max(w.get("vm_hwm_bytes") or 0, w.get("vm_hwm_at_end_bytes") or 0,
                                     w.get("peak_rss_sampled_bytes") or 0) for w in workers]}
    if rec["error"]:
        env.err(f"{os.path.basename(d)} reference r{rep}", rec["error"])
    return rec, out


def ours_run(env, env_rank, d, img, case, pipeline, ranks, tag, flow_halo):
    """``mpiexec -n RANKS ... segment --pipeline P --threads 1`` through run_all.run_ours."""
    out = os.path.join(d, f"{tag}.zarr")
    remove_output(out)
    jd = os.path.join(d, tag)
    keep_work = pipeline == "flows"       # to weigh the flow field on disk; removed below
    cli = ["segment", img, out, "--model", env.model["path"], "--diameter", case["diameter"],
           "--blocksize", case["blocksize"], "--overlap", case["overlap"], "--threads", 1,
           "--pipeline", pipeline, "--log-dir", os.path.join(jd, "logs")]
    if pipeline == "flows" and flow_halo is not None:
        cli += ["--flow-halo", flow_halo]
    if getattr(env, "precision", None):
        cli += ["--precision", env.precision]
    if keep_work:
        cli += ["--keep-work"]
    la = loadavg()
    rec = ra.run_ours(env_rank, ranks, cli, json_dir=jd, timeout=env.cfg["e2e_timeout"],
                      label=f"{os.path.basename(d)} {tag}")
    rec["loadavg_at_start"] = la
    rec["pipeline"] = pipeline
    rec["peak_rss_per_rank"] = rec.get("hwm_per_rank")
    pr = sorted(rec.pop("per_rank", []) or [], key=lambda x: x.get("rank", 0))
    rec["hooks_rank0"] = (pr[0].get("hooks") if pr else None)
    rec.pop("tree_memory", None)
    attrs = {}
    try:
        if os.path.exists(out):
            attrs = output_attrs(out)
    except Exception as exc:  # noqa: BLE001
        rec["output_attrs_error"] = repr(exc)
    rec["output_timings"] = attrs.get("timings")
    rec["flow_halo_used"] = (attrs.get("fingerprint") or {}).get("pipeline")
    cost, src = attrs.get("cost"), "output attributes"
    if cost is None:
        try:
            cost = json.load(open(os.path.join(jd, "cost-rank-00000.json"))).get("cost")
            src = "RunResult.stats (not in the output attributes)"
        except (OSError, ValueError):
            cost, src = None, "none recorded"
    rec["cost"], rec["cost_source"] = cost, src
    work = (out[:-5] if out.endswith(".zarr") else out) + ".mpicellpose-work"
    if keep_work and os.path.isdir(work):
        fz = os.path.join(work, "flows.zarr")
        rec["flow_scratch_on_disk_bytes"] = dir_bytes(fz) if os.path.isdir(fz) else None
        shutil.rmtree(work, ignore_errors=True)
    return rec, out


def derive(rec, voxels):
    """Per-voxel figures of one of our runs."""
    c = rec.get("cost") or {}
    t = rec.get("output_timings") or rec.get("timings") or {}
    out = {"flows_s": t.get("flows"), "segment_s": t.get("segment"), "total_s": t.get("total"),
           "import_s": t.get("import"), "model_load_s": t.get("model_load"),
           "net_planned": c.get("network_per_voxel"), "flows_per_voxel_planned": c.get("flows_per_voxel"),
           "blocks_per_voxel_planned": c.get("blocks_per_voxel"), "flow_halo": c.get("flow_halo"),
           "net_measured": (c["network_voxels_measured"] / voxels) if c.get("network_voxels_measured") else None,
           "flows_seconds": c.get("flows_seconds"),
           "scratch_bytes_per_voxel_planned": (c["flow_scratch_bytes"] / voxels
                                               if c.get("flow_scratch_bytes") and rec.get("pipeline") == "flows"
                                               else None),
           "scratch_bytes_per_voxel_on_disk": (rec["flow_scratch_on_disk_bytes"] / voxels
                                               if rec.get("flow_scratch_on_disk_bytes") else None)}
    return {k: (rnd(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


# --------------------------------------------------------------------------- one case
def run_case(env, env_rank, name, case, args, tools, ranks_check):
    d, vmeta = ra.make_case_volume(env, name, case)
    img = os.path.join(d, "image.zarr")
    voxels = int(np.prod(case["shape"]))
    log(f"{name}: volume {tuple(case['shape'])}, {vmeta['n_objects']} objects, blocksize {case['blocksize']}, "
        f"overlap {case['overlap']}, tools {', '.join(tools)}, {args.repeats} repeat(s)")
    res = {"case": {**{k: list(v) if isinstance(v, tuple) else v for k, v in case.items()}, **vmeta,
                    "voxels": voxels,
                    "n_blocks": int(np.prod([math.ceil(s / case["blocksize"]) for s in case["shape"]]))},
           "plan": {}, "runs": {t: [] for t in tools}}
    for p in ("flows", "blocks"):
        res["plan"][p] = plan_cost(env, img, case, p, args.flow_halo, f"{name}_{p}")
    keep = {}
    for rep in range(args.repeats):
        order = list(tools) if rep % 2 == 0 else list(reversed(tools))
        for tool in order:
            log(f"{name} repeat {rep + 1}/{args.repeats}: {tool}")
            try:
                if tool == "whole":
                    rec, out = whole_run(env, d, img, case, rep)
                elif tool == "reference":
                    rec, out = reference_run(env, d, img, case, rep)
                else:
                    rec, out = ours_run(env, env_rank, d, img, case, tool, RANKS, f"{tool}_n{RANKS}_r{rep}",
                                        args.flow_halo)
                    rec["derived"] = derive(rec, voxels)
            except Exception as exc:  # noqa: BLE001
                env.err(f"{name} {tool} r{rep}", f"{exc!r}\n{traceback.format_exc()[-1500:]}")
                rec, out = {"error": repr(exc), "wall_s": None}, None
            log(f"{name} {tool}: wall {rec.get('wall_s')} s" + (f", ERROR {rec['error']}" if rec.get("error") else ""))
            res["runs"][tool].append(rec)
            if rep == 0 and out and not rec.get("error"):
                keep[tool] = out                # quality and the ranks check use repeat 0's outputs
            elif rep > 0 and out:
                remove_output(out)
    # quality: repeat 0's outputs, through run_all.seam_quality (tool names aliased)
    try:
        q = ra.seam_quality(env, name, d, case, {QUALITY_ALIAS[t]: p for t, p in keep.items()})
        back = {v: k for k, v in QUALITY_ALIAS.items()}
        res["quality"] = {back.get(k, k): v for k, v in q.items()}
    except Exception as exc:  # noqa: BLE001
        env.err(f"{name} quality", f"{exc!r}\n{traceback.format_exc()[-1500:]}")
        res["quality"] = {}
    if ranks_check:
        res["ranks_check"] = ranks_check_case(env, env_rank, d, img, case, name, keep.get("flows"), args.flow_halo)
    res["summary"] = summarize_case(res)
    return res


def ranks_check_case(env, env_rank, d, img, case, name, out2, flow_halo):
    """The flows pipeline's labels at 1, 2 and 3 ranks, byte for byte (2: the timed run's output)."""
    outs, runs = {}, {}
    for R in RANKS_CHECK:
        if R == RANKS and out2 and os.path.exists(out2):
            outs[R] = out2
            continue
        log(f"{name}: ranks check, flows at {R} rank(s)")
        try:
            rec, out = ours_run(env, env_rank, d, img, case, "flows", R, f"flows_n{R}_check", flow_halo)
            runs[R] = {k: rec.get(k) for k in ("wall_s", "error", "loadavg_at_start", "n_objects")}
            if not rec.get("error") and os.path.exists(out):
                outs[R] = out
        except Exception as exc:  # noqa: BLE001
            env.err(f"{name} ranks check n{R}", repr(exc))
            runs[R] = {"error": repr(exc)}
    rec = {"ranks": list(RANKS_CHECK), "runs": {str(k): v for k, v in runs.items()}, "compared": {}}
    base = outs.get(RANKS_CHECK[0])
    if base is None:
        rec["identical"] = None
        rec["note"] = f"no {RANKS_CHECK[0]}-rank output to compare"
        return rec
    a = read_labels(base)
    ok = True
    for R in RANKS_CHECK[1:]:
        if R not in outs:
            rec["compared"][str(R)] = None
            ok = False
            continue
        b = read_labels(outs[R])
        same = bool(a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b))
        c = {"identical": same, "n_labels": int(len(np.unique(b)) - 1)}
        if not same and a.shape == b.shape:
            c["voxels_differing"] = int(np.count_nonzero(a != b))
            c["foreground_differing"] = int(np.count_nonzero((a > 0) != (b > 0)))
        rec["compared"][str(R)] = c
        ok = ok and same
    rec["n_labels_1"] = int(len(np.unique(a)) - 1)
    rec["identical"] = ok
    for R, o in outs.items():
        if o != out2:
            remove_output(o)
    return rec


def summarize_case(res):
    s = {}
    for tool, recs in res["runs"].items():
        ok = [r for r in recs if not r.get("error") and r.get("wall_s")]
        t = {"n_ok": len(ok), "n_failed": len(recs) - len(ok)}
        if ok:
            t["wall_s"] = med([r["wall_s"] for r in ok])
            t["cpu_s"] = med([r.get("cpu_s") for r in ok])
            t["wall_s_all"] = [r["wall_s"] for r in ok]
            t["loadavg_at_start"] = [r.get("loadavg_at_start") for r in ok]
            rss = [max(x for x in (r.get("peak_rss_per_rank") or [None]) if x) if any(r.get("peak_rss_per_rank") or [])
                   else None for r in ok]
            t["peak_rss_max_rank_bytes"] = med(rss)
            t["peak_rss_per_rank_bytes"] = ok[0].get("peak_rss_per_rank")
            if tool in ("flows", "blocks"):
                for k in ("flows_s", "segment_s", "total_s", "import_s", "net_planned", "net_measured",
                          "scratch_bytes_per_voxel_planned", "scratch_bytes_per_voxel_on_disk", "flow_halo",
                          "flows_per_voxel_planned", "blocks_per_voxel_planned"):
                    t[k] = med([(r.get("derived") or {}).get(k) for r in ok])
                t["cost_source"] = ok[0].get("cost_source")
            elif tool == "whole":
                t["network_s"] = med([r.get("network_s") for r in ok])
                t["masks_s"] = med([r.get("masks_s") for r in ok])
                t["eval_s"] = med([r.get("eval_s") for r in ok])
                t["import_s"] = med([r.get("import_s") for r in ok])
            elif tool == "reference":
                t["in_call_s"] = med([r.get("in_call_s") for r in ok])
                t["segment_s"] = med([(r.get("phases") or {}).get("segment_s") for r in ok])
        q = (res.get("quality") or {}).get(tool) or {}
        if q:
            t["n_labels"] = q.get("n_labels")
            t["f1_vs_truth"] = (q.get("vs_truth") or {}).get("f1")
            t["f1_vs_whole"] = (q.get("vs_whole") or {}).get("f1")
            t["mean_iou_vs_whole"] = (q.get("vs_whole") or {}).get("mean_matched_iou")
            t["seam_errors"] = q.get("seam_errors")
            sm = q.get("seam") or {}
            t["seam_splits_merges_fragments"] = [sm.get("seam_splits"), sm.get("seam_merges"),
                                                 sm.get("seam_fragments")]
        s[tool] = t
    w = {k: (s.get(k) or {}).get("wall_s") for k in TOOLS}
    ratios = {}
    for a, b in (("flows", "whole"), ("blocks", "whole"), ("flows", "reference"), ("blocks", "reference"),
                 ("flows", "blocks")):
        if w.get(a) and w.get(b):
            ratios[f"{a}/{b}"] = round(w[a] / w[b], 3)
    s["wall_ratios"] = ratios
    c = {k: (s.get(k) or {}).get("cpu_s") for k in TOOLS}
    s["cpu_ratios"] = {f"{x}/{y}": round(c[x] / c[y], 3) for x, y in
                       (("flows", "whole"), ("blocks", "whole"), ("flows", "reference"), ("blocks", "reference"),
                        ("flows", "blocks")) if c.get(x) and c.get(y)}
    pl = res.get("plan") or {}
    s["plan_network"] = (pl.get("flows") or {}).get("network")
    return s


# --------------------------------------------------------------------------- report
def f(x, d=2, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{x}{unit}"
    return f"{x:.{d}f}{unit}"


def mib(x):
    return "n/a" if not x else f"{x / ra.MiB:.0f}"


def must_show(res):
    """Rows shaped like issue 12's "Must show" table: (what, today = blocks now, new = flows, target)."""
    cases = res.get("cases") or {}
    e2e = (cases.get("e2e") or {}).get("summary") or {}
    B = ((cases.get("e2e") or {}).get("case") or {}).get("blocksize", "?")
    fl, bl = e2e.get("flows") or {}, e2e.get("blocks") or {}
    net_pl = e2e.get("plan_network") or {}
    rows = []
    today = bl.get("net_planned") or net_pl.get("blocks_per_voxel")
    new = fl.get("net_planned") or net_pl.get("flows_per_voxel")
    new_s = (f"{f(new)} planned, {f(fl.get('net_measured'))} measured (flow halo {f(fl.get('flow_halo'), 0)})"
             if new is not None else "n/a")
    rows.append((f"network voxel-evaluations / output voxel, end-to-end case ({B}³ blocks)", f(today), new_s,
                 f"≤ {TARGETS['net_e2e']}"))
    big = res.get("big_plan") or {}
    bp = big.get("plan") or {}
    if bp:
        rows.append((f"the same at {BIG['blocksize']}³ blocks, diameter {BIG['diameter']} (from `plan`, "
                     f"{BIG['shape'][0]}³ volume; interior block)",
                     f"{f(bp.get('blocks_per_voxel'))} ({f(big.get('interior_blocks_per_voxel'))})",
                     f"{f(bp.get('flows_per_voxel'))} ({f(big.get('interior_flows_per_voxel'))}), halo "
                     f"{bp.get('flow_halo')}", f"≤ {TARGETS['net_256']}"))
    else:
        rows.append((f"the same at {BIG['blocksize']}³ blocks, diameter {BIG['diameter']} (from `plan`)", "n/a",
                     "n/a", f"≤ {TARGETS['net_256']}"))
    r = e2e.get("wall_ratios") or {}
    rows.append(("wall / whole-volume Cellpose, end-to-end case, CPU", f(r.get("blocks/whole")),
                 f(r.get("flows/whole")), f"≤ {TARGETS['wall_over_whole']}"))
    ref_ran = bool((e2e.get("reference") or {}).get("n_ok"))
    rows.append(("wall / the reference, same case", f(r.get("blocks/reference")) if ref_ran else "not run",
                 f(r.get("flows/reference")) if ref_ran else "not run (`--reference`)",
                 f"≤ {TARGETS['wall_over_ref']}"))

    def per_case(tool, key, fmt):
        parts = []
        for cname in ("e2e", "dense"):
            sm = (cases.get(cname) or {}).get("summary")
            if sm is not None:
                parts.append(fmt((sm.get(tool) or {}).get(key), sm))
        return " / ".join(parts) if parts else "n/a"

    names = " and ".join(label for c, label in (("e2e", "end-to-end"), ("dense", "dense")) if c in cases)
    rows.append((f"F1 vs whole-volume Cellpose, {names} cases", per_case("blocks", "f1_vs_whole", lambda v, s: f(v, 3)),
                 per_case("flows", "f1_vs_whole", lambda v, s: f(v, 3)), f"≥ {TARGETS['f1_vs_whole']}"))
    rows.append(("mean matched IoU vs whole-volume Cellpose (same cases)",
                 per_case("blocks", "mean_iou_vs_whole", lambda v, s: f(v, 3)),
                 per_case("flows", "mean_iou_vs_whole", lambda v, s: f(v, 3)), "(not in the issue)"))

    def seam(v, sm):
        return f"{f(v)} (whole {f((sm.get('whole') or {}).get('seam_errors'))})"
    rows.append(("seam errors (splits + merges + fragments), same cases", per_case("blocks", "seam_errors", seam),
                 per_case("flows", "seam_errors", seam), "≤ whole's own"))
    rc = [(c, (cases.get(c) or {}).get("ranks_check")) for c in ("e2e", "dense")]
    rc = [(c, x) for c, x in rc if x]
    if rc:
        txt = "; ".join(f"{c}: {'identical' if x.get('identical') else ('DIFFER' if x.get('identical') is False else 'n/a')}"
                        for c, x in rc)
    else:
        txt = "not checked (`--ranks-check`)"
    rows.append(("labels at 1, 2 and 3 ranks", "not checked here", txt, "identical"))
    sb = [(c, ((cases.get(c) or {}).get("summary") or {}).get("flows") or {}) for c in ("e2e", "dense")]
    sb_txt = "; ".join(f"{c}: {f(x.get('scratch_bytes_per_voxel_planned'), 1)} planned, "
                       f"{f(x.get('scratch_bytes_per_voxel_on_disk'), 2)} on disk (compressed)"
                       for c, x in sb if x)
    rows.append(("flow scratch, bytes per output voxel", "0 (no flow field)", sb_txt or "n/a", "(closing note)"))
    rows.append(("on a GPU: Mvox/s per GPU, whole run, 512³, shipped model", "not measured (no GPU in this run)",
                 "not measured", "≥ 5"))
    rows.append(("GPU busy during segment", "not measured (no GPU in this run)", "not measured", "≥ 80 %"))
    return rows


def render_md(res):
    m = res["meta"]
    ld = m.get("load") or {}
    L = [f"# Flows vs blocks pipeline vs whole-volume Cellpose ({'quick' if m['quick'] else 'full'}), {m['date']}",
         "",
         f"Command: `{m['command']}`  ",
         f"Machine: {m['machine'].get('cpu')}, {m['machine'].get('cores')} cores, "
         f"{(m['machine'].get('mem_total_bytes') or 0) / ra.GiB:.0f} GiB; load average (1, 5, 15 min) at start "
         f"{', '.join(f(x, 1) for x in m['machine'].get('loadavg') or [])}; 1-min load over the run "
         f"{f(ld.get('load1_min'), 1)}-{f(ld.get('load1_max'), 1)} (mean {f(ld.get('load1_mean'), 1)})  ",
         f"Model: {m['model'].get('kind')} (`{m['model'].get('path')}`); {RANKS} ranks x 1 thread vs one process "
         f"x {RANKS} threads; {m['repeats']} repeat(s) (median wall); our network in "
         f"{m.get('precision') or 'float32 (default)'}, whole-volume Cellpose in float32.  ",
         f"Started {m.get('started')}, finished {m.get('finished')} ({m.get('duration_s')} s).", ""]
    if m["quick"]:
        L += ["**Quick case** (QUICK of run_all.py: 48x96x96, blocksize 48, overlap 32): few, small blocks; the "
              "walls are dominated by start-up (imports, model load) and the machine may have been loaded "
              "(see the load averages). Not the issue's numbers.", ""]
    L += ["## Issue 12, \"Must show\" (today = `--pipeline blocks` measured now, new = `--pipeline flows`)", "",
          "| | today (blocks) | new (flows) | target |", "|---|---|---|---|"]
    for row in must_show(res):
        L.append("| " + " | ".join(row) + " |")
    L += ["", "## Per tool and case", "",
          "| case | tool | wall s | CPU s⁴ | load1 at start | flows s | segment s | net evals/voxel planned | measured | "
          "scratch B/voxel | peak RSS/rank MiB | F1 vs whole | mean IoU vs whole | F1 vs truth | seam errors (s+m+f) "
          "| labels |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cname, c in (res.get("cases") or {}).items():
        sm = c.get("summary") or {}
        for tool in TOOLS:
            t = sm.get(tool)
            if t is None:
                continue
            la = [x[0] for x in (t.get("loadavg_at_start") or []) if x]
            rss = t.get("peak_rss_per_rank_bytes") or []
            if tool == "whole":
                fs, ss, npl, nme = f(t.get("network_s"), 1) + "¹", f(t.get("masks_s"), 1) + "¹", "1²", "n/a"
            elif tool == "reference":
                fs, ss, npl, nme = "n/a", f(t.get("segment_s"), 1) + "³", "n/a", "n/a"
            else:
                fs, ss = f(t.get("flows_s"), 1), f(t.get("segment_s"), 1)
                npl, nme = f(t.get("net_planned"), 3), f(t.get("net_measured"), 3)
            sb = "n/a"
            if tool == "flows":
                sb = f"{f(t.get('scratch_bytes_per_voxel_planned'), 1)} ({f(t.get('scratch_bytes_per_voxel_on_disk'), 2)} on disk)"
            smf = t.get("seam_splits_merges_fragments")
            seam = f"{t.get('seam_errors')} ({'+'.join(str(x) for x in smf)})" if smf else "n/a"
            L.append(f"| {cname} | {tool} | {f(t.get('wall_s'), 1)} | {f(t.get('cpu_s'), 1)} | {', '.join(f(x, 1) for x in la) or 'n/a'} | "
                     f"{fs} | {ss} | {npl} | {nme} | {sb} | {' / '.join(mib(x) for x in rss) or 'n/a'} | "
                     f"{f(t.get('f1_vs_whole'), 3) if tool != 'whole' else '-'} | "
                     f"{f(t.get('mean_iou_vs_whole'), 3) if tool != 'whole' else '-'} | {f(t.get('f1_vs_truth'), 3)} | "
                     f"{seam} | {t.get('n_labels', 'n/a')} |")
    L += ["", "¹ whole-volume Cellpose: the flows column is its network time (`_run_net`), the segment column its "
          "mask time (`_compute_masks`). ² every voxel once per orientation (plus Cellpose's own 10 % tile "
          "overlap inside a plane). ³ the reference's segment phase. ⁴ user + system CPU seconds of the whole "
          "process tree (sampled from /proc every 0.2 s; imports included): less sensitive than the wall to other "
          "processes on the machine.", "",
          "## Ratios (median walls; CPU seconds of the process trees in the second row of each case)", "",
          "| case | of | " + " | ".join(RATIO_KEYS) + " |", "|---|---|---|---|---|---|---|"]
    for cname, c in (res.get("cases") or {}).items():
        for what, key in (("wall", "wall_ratios"), ("CPU", "cpu_ratios")):
            r = (c.get("summary") or {}).get(key) or {}
            L.append(f"| {cname} | {what} | " + " | ".join(f(r.get(k), 3) for k in RATIO_KEYS) + " |")
    L += ["", "## Determinism (flows pipeline, labels at 1, 2, 3 ranks)", ""]
    any_rc = False
    for cname, c in (res.get("cases") or {}).items():
        rc = c.get("ranks_check")
        if not rc:
            continue
        any_rc = True
        parts = []
        for R, v in (rc.get("compared") or {}).items():
            if v is None:
                parts.append(f"{R} ranks: no output")
            else:
                parts.append(f"{R} ranks vs 1: {'identical' if v['identical'] else 'DIFFERENT'}"
                             + (f" ({v.get('voxels_differing')} voxels differ)" if not v["identical"] else ""))
        L.append(f"- {cname}: " + "; ".join(parts) + f" ({rc.get('n_labels_1')} labels at 1 rank)")
    if not any_rc:
        L.append("not run (`--ranks-check`)")
    big = res.get("big_plan") or {}
    if big.get("plan"):
        L += ["", f"## Planned cost at {BIG['blocksize']}³ blocks, diameter {BIG['diameter']} (`mpicellpose plan "
              f"--json` on an empty {BIG['shape'][0]}³ array, {big.get('blocks')} blocks, overlap "
              f"{big.get('overlap')})", "", "```", json.dumps(big["plan"]), "```",
              f"Interior block: blocks ((B+2o)/B)³ = {big.get('interior_blocks_per_voxel')}, flows per interior slab of G x G blocks ((G*B+2h)/(G*B))² = "
              f"{big.get('interior_flows_per_voxel')}."]
    srcs = [f"{cn} {t}: {((c.get('summary') or {}).get(t) or {}).get('cost_source')}"
            for cn, c in (res.get("cases") or {}).items() for t in ("flows", "blocks")
            if ((c.get("summary") or {}).get(t) or {}).get("cost_source")]
    if srcs:
        L += ["", f"Run cost (`cost`) read from: {'; '.join(srcs)}."]
    if res.get("errors"):
        L += ["", "## Errors (recorded, not fatal)", ""]
        for e in res["errors"]:
            L.append(f"- {e['where']}: {e['error'][:400]}".replace("\n", " "))
    return "\n".join(L) + "\n"


def render_only(path) -> int:
    with open(path) as fh:
        res = json.load(fh)
    for c in (res.get("cases") or {}).values():
        c["summary"] = summarize_case(c)
    md = render_md(res)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    with open(os.path.splitext(path)[0] + ".md", "w") as fh:
        fh.write(md)
    print(md)
    return 0


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_rank"]:
        return rank_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="run_all's QUICK cases (48x96x96, blocksize 48)")
    p.add_argument("--reference", action="store_true", help="also run the reference (slow; creates its venv if missing)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ranks-check", dest="ranks_check", action="store_true", default=None,
                   help="flows labels at 1, 2, 3 ranks compared byte for byte (default: on with --quick)")
    g.add_argument("--no-ranks-check", dest="ranks_check", action="store_false")
    p.add_argument("--ranks-check-cases", default="e2e", help="cases of the ranks check (default e2e)")
    p.add_argument("--cases", default="e2e,dense", help="comma list of e2e, dense")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per tool and case (median wall; default 1)")
    p.add_argument("--flow-halo", type=int, default=None, help="--flow-halo of the flows runs (default: mpicellpose's)")
    p.add_argument("--tools", default="whole,flows,blocks",
                   help="comma list of whole, flows, blocks (default all three; --reference adds the reference)")
    p.add_argument("--precision", default=None, choices=("float32", "bfloat16", "float16"),
                   help="--precision of our runs (whole-volume Cellpose stays float32, Cellpose's own)")
    p.add_argument("--tag", default="", help="suffix of the results' file names")
    p.add_argument("--model", default=None, help="Cellpose 3 weights (default: the shipped demo model)")
    p.add_argument("--work", default=os.path.join(HERE, "work", "pipeline"))
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--nice", type=int, default=5, help="nice level of every heavy subprocess (default 5)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rebuild the summaries and the .md of an existing report (no run)")
    a = p.parse_args(argv)
    if a.render:
        return render_only(a.render)
    if a.ranks_check is None:
        a.ranks_check = a.quick
    t_start = time.time()
    env = ra.Env(a)                      # uses a.work, a.nice, a.model
    env.cfg = ra.QUICK if a.quick else ra.FULL
    env_rank = copy.copy(env)            # same errors list; its "interpreter" saves the run's cost
    env_rank.py = make_shim(env)
    date = datetime.date.today().isoformat()
    stem = os.path.join(a.results, f"{date}-pipeline" + ("-quick" if a.quick else "") + (f"-{a.tag}" if a.tag else ""))
    env.precision = env_rank.precision = a.precision
    os.makedirs(a.results, exist_ok=True)
    loadmon = ra.LoadMonitor().start()
    res = {"meta": {"date": date, "quick": a.quick, "repeats": a.repeats, "ranks": RANKS, "precision": a.precision,
                    "command": "python benchmarks/pipeline.py " + " ".join(argv),
                    "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": machine_info(), "json_name": stem + ".json"},
           "gpu": "Not measured here: this run had no GPU."}
    log(f"pipeline: {'quick' if a.quick else 'full'}, results {stem}.*")
    try:
        res["meta"]["other_cpu_users_at_start"] = ra.other_cpu_users(os.getpid())
    except Exception:  # noqa: BLE001
        pass
    res["meta"]["versions_ours"] = ra.versions_ours()
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    bad = sorted(set(tools) - {"whole", "flows", "blocks"})
    if bad:
        p.error(f"unknown --tools {bad}; choose from whole, flows, blocks")
    if a.reference:
        res["meta"]["reference"] = ra.ensure_reference(env)
        if res["meta"]["reference"].get("ok"):
            tools.append("reference")
    env.model = env_rank.model = ra.ensure_model(env)
    res["meta"]["model"] = env.model
    log(f"model: {env.model['kind']} at {env.model['path']}")

    def save():
        res["errors"] = env.errors
        with open(stem + ".json", "w") as fh:
            json.dump(res, fh, indent=1, default=str)

    try:
        res["big_plan"] = big_plan(env, a.flow_halo)
    except Exception as exc:  # noqa: BLE001
        env.err("big plan", f"{exc!r}\n{traceback.format_exc()[-1500:]}")
    res["cases"] = {}
    rc_cases = {c.strip() for c in a.ranks_check_cases.split(",") if c.strip()}
    for name in [c.strip() for c in a.cases.split(",") if c.strip()]:
        if not env.model["exists"]:
            env.err(name, f"no model file at {env.model['path']}")
            break
        try:
            res["cases"][name] = run_case(env, env_rank, name, env.cfg[name], a, tools,
                                          a.ranks_check and name in rc_cases)
        except Exception as exc:  # noqa: BLE001
            env.err(name, f"{exc!r}\n{traceback.format_exc()[-2000:]}")
        save()
    res["meta"]["load"] = loadmon.stop()
    res["meta"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    res["meta"]["duration_s"] = round(time.time() - t_start, 1)
    save()
    md = render_md(res)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    print(md)
    log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
