"""Byte-identity harness: a fixed set of real runs, each reduced to content hashes.

Run it before and after a change that must not change behaviour (a reorganisation of the
package, a refactoring) and compare the two JSON files::

    python benchmarks/identical.py /tmp/before.json            # at the old commit
    python benchmarks/identical.py /tmp/after.json             # at the new one
    python benchmarks/identical.py --compare /tmp/before.json /tmp/after.json

Run it with the project's Python from the repository root (``PYTHONPATH`` is set to the
repository for the subprocesses it starts).  What is hashed:

* the synthetic inputs themselves (``make_nuclei``, ``make_cells``);
* per run: the label array's *content* (dtype, shape, bytes; not the zarr files, whose attributes
  hold times and paths), the object table's content (CSV as read, and the Parquet table as read),
  the boxes ``.npy`` content, and the output's ``mpicellpose`` attributes (whole, not hashed, so
  that a difference is readable) with the entries that hold times or run IDs taken out and the
  scratch folder's path replaced by ``<TMP>`` (the fingerprint stays);
* runs: the ``threshold`` backend on synthetic 3D and 2D volumes over several block grids, 1 rank
  in-process (``distributed_eval``) and 2 ranks under ``mpiexec`` (``python -m mpicellpose
  segment``), with and without a mask; the shipped Cellpose 3 ``demo`` model under ``--pipeline
  flows`` and ``--pipeline blocks`` (48x64x64, blocksize 32, one thread); the shipped two-channel
  ``demo_cyto2ch`` model on a small 2D image; the ``demo`` subcommand's labels;
* tools: ``convert`` (a TIFF into zarr), ``plan --json`` (whole, paths replaced, the free space
  left out), ``batch`` (the script it prints), ``preview`` (the PNG's pixels);
* the stdout of ``python -m mpicellpose --help`` and of ``<subcommand> --help`` for every
  subcommand (``COLUMNS=100``).

``--only SUBSTRING`` runs the entries whose name contains it (for a quick look while working).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

TIMEOUT = 600
# attribute entries that hold times, run IDs or per-run paths: not behaviour
VOLATILE = {"run_id", "timings", "finished", "started", "wall", "elapsed"}


# ------------------------------------------------------------------------------- helpers
def _import(*candidates):
    """The first of ``module:attr`` candidates that imports (the module may have moved)."""
    for cand in candidates:
        mod, attr = cand.split(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} imports")


def make_nuclei(*a, **k):
    return _import("mpicellpose.synthetic.nuclei:make_nuclei", "mpicellpose.synthetic:make_nuclei")(*a, **k)


def make_cells(*a, **k):
    return _import("mpicellpose.synthetic.cells:make_cells", "mpicellpose.synthetic_cells:make_cells")(*a, **k)


def to_zarr(path, arr, chunks):
    from mpicellpose import numpy_array_to_zarr

    numpy_array_to_zarr(str(path), arr, chunks)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def array_hash(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return sha(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e["COLUMNS"] = "100"
    e.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    e.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    e.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    return e


def run(args, n=None, cwd=None, check=True) -> subprocess.CompletedProcess:
    """``python args`` (``-m mpicellpose ...``), under ``mpiexec -n n`` when ``n`` is given."""
    cmd = [sys.executable] + [str(a) for a in args]
    if n is not None:
        cmd = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(n)] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith(("_seconds", "free_bytes"))


def scrub(obj, tmp: str):
    """``obj`` without volatile entries, with the scratch folder's path replaced."""
    if isinstance(obj, dict):
        return {k: scrub(v, tmp) for k, v in sorted(obj.items()) if not volatile(k)}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, tmp) for v in obj]
    if isinstance(obj, str):
        return obj.replace(tmp, "<TMP>")
    return obj


def run_attrs(out: str, tmp: str) -> dict:
    """The output's ``mpicellpose`` attributes, scrubbed (kept whole: a difference is then readable)."""
    import zarr

    meta = dict(zarr.open(out, mode="r").attrs).get("mpicellpose", {})
    meta = {k: v for k, v in meta.items() if k not in ("provenance",)}  # versions and the platform
    return json.loads(json.dumps(scrub(meta, tmp), sort_keys=True, default=str))


def table_hash(path: str) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return sha(json.dumps(rows).encode())


def parquet_hash(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    t = pq.read_table(path)
    return sha(json.dumps(t.to_pydict(), sort_keys=True, default=str).encode())


def outputs_hash(out: str, tmp: str) -> dict:
    """Hashes of what a run wrote at ``out`` (a zarr array path ending in .zarr)."""
    import zarr

    stem = out[: -len(".zarr")]
    labels = zarr.open(out, mode="r")[...]
    res = {"labels": array_hash(labels), "n_objects": int(labels.max()) if labels.size else 0,
           "table": table_hash(stem + ".objects.csv"), "attrs": run_attrs(out, tmp)}
    pq = parquet_hash(stem + ".objects.parquet")
    if pq is not None:
        res["parquet"] = pq
    if os.path.exists(stem + ".boxes.npy"):
        res["boxes"] = array_hash(np.load(stem + ".boxes.npy", allow_pickle=False))
    return res


# ------------------------------------------------------------------------------- the runs
THRESHOLD_CASES = {  # name: (shape, seed, blocksizes)
    "3d": ((40, 48, 56), 1, ((16, 16, 16), (40, 48, 56), (9, 20, 13))),
    "2d": ((96, 80), 2, ((32, 32), (17, 23), (96, 80))),
}


def _threshold_input(tmp, name):
    shape, seed, _ = THRESHOLD_CASES[name]
    img, truth = make_nuclei(shape, seed=seed)
    path = os.path.join(tmp, f"thr_{name}.zarr")
    to_zarr(path, img, 16)
    thr = float(np.percentile(img, 70))
    return img, truth, path, thr


def case_inputs(tmp) -> dict:
    res = {}
    for name in THRESHOLD_CASES:
        img, truth, _, thr = _threshold_input(tmp, name)
        res[f"input/nuclei_{name}"] = {"image": array_hash(img), "truth": array_hash(truth), "threshold": thr}
    img, cells, nuclei = make_cells((48, 48), seed=3)
    res["input/cells_2d"] = {"image": array_hash(img), "cells": array_hash(cells), "nuclei": array_hash(nuclei)}
    return res


def case_threshold(tmp) -> dict:
    from mpicellpose import distributed_eval

    res = {}
    for name, (shape, _, blocksizes) in THRESHOLD_CASES.items():
        img, _, path, thr = _threshold_input(tmp, name)
        mask = np.zeros(tuple(max(s // 8, 1) for s in shape), bool)
        mask[tuple(slice(0, max(s // 16, 1)) for s in shape)] = True
        mask_path = os.path.join(tmp, f"mask_{name}.zarr")
        to_zarr(mask_path, mask, 4)
        for i, bs in enumerate(blocksizes):
            for conn in (1, "full") if i == 0 else (1,):
                out = os.path.join(tmp, f"thr_{name}_b{i}_c{conn}_r1.zarr")
                _, boxes = distributed_eval(path, bs, out, backend="threshold", backend_kwargs={
                    "threshold": thr, "connectivity": conn}, stitch="touch", threads=1)
                r = outputs_hash(out, tmp)
                r["boxes_returned"] = sha(repr(list(boxes)).encode())
                res[f"threshold/{name}/b{i}/conn{conn}/1rank"] = r
            out = os.path.join(tmp, f"thr_{name}_b{i}_r2.zarr")
            run(["-m", "mpicellpose", "segment", path, out, "--backend", "threshold", "--threshold", thr,
                 "--blocksize", ",".join(map(str, bs)), "--threads", "1"], n=2)
            res[f"threshold/{name}/b{i}/conn1/2ranks"] = outputs_hash(out, tmp)
        out = os.path.join(tmp, f"thr_{name}_mask_r1.zarr")
        distributed_eval(path, blocksizes[0], out, mask=mask_path, backend="threshold",
                         backend_kwargs={"threshold": thr}, threads=1)
        res[f"threshold/{name}/mask/1rank"] = outputs_hash(out, tmp)
        out = os.path.join(tmp, f"thr_{name}_mask_r2.zarr")
        run(["-m", "mpicellpose", "segment", path, out, "--backend", "threshold", "--threshold", thr,
             "--blocksize", ",".join(map(str, blocksizes[0])), "--mask", mask_path, "--threads", "1",
             "--schedule", "static"], n=2)
        res[f"threshold/{name}/mask/2ranks"] = outputs_hash(out, tmp)
    return res


def case_cellpose(tmp) -> dict:
    res = {}
    img, _ = make_nuclei((48, 64, 64), seed=5)
    path = os.path.join(tmp, "cp_in.zarr")
    to_zarr(path, img, 32)
    for pipeline in ("flows", "blocks"):
        out = os.path.join(tmp, f"cp_{pipeline}.zarr")
        run(["-m", "mpicellpose", "segment", path, out, "--model", "demo", "--diameter", "16", "--blocksize", "32",
             "--overlap", "16", "--pipeline", pipeline, "--threads", "1", "--device", "cpu"])
        res[f"cellpose/demo/{pipeline}/1rank"] = outputs_hash(out, tmp)
    # the flows pipeline with a mask, on 2 ranks
    mask = np.zeros((6, 8, 8), bool)
    mask[:3] = True
    mask_path = os.path.join(tmp, "cp_mask.zarr")
    to_zarr(mask_path, mask, 4)
    out = os.path.join(tmp, "cp_flows_mask_r2.zarr")
    run(["-m", "mpicellpose", "segment", path, out, "--model", "demo", "--diameter", "16", "--blocksize", "32",
         "--overlap", "16", "--pipeline", "flows", "--threads", "1", "--device", "cpu", "--mask", mask_path], n=2)
    res["cellpose/demo/flows/mask/2ranks"] = outputs_hash(out, tmp)
    return res


def case_two_channel(tmp) -> dict:
    img, _, _ = make_cells((48, 48), seed=3)  # C,Y,X
    path = os.path.join(tmp, "cells.zarr")
    to_zarr(path, img, (2, 48, 48))
    out = os.path.join(tmp, "cells_out.zarr")
    run(["-m", "mpicellpose", "segment", path, out, "--model", "demo_cyto2ch", "--diameter", "16",
         "--channel-axis", "0", "--channel", "0,1", "--blocksize", "24", "--overlap", "8", "--threads", "1",
         "--device", "cpu"])
    return {"cellpose/demo_cyto2ch/2d/1rank": outputs_hash(out, tmp)}


def case_demo_command(tmp) -> dict:
    d = os.path.join(tmp, "demo")
    run(["-m", "mpicellpose", "demo", "--out", d, "--size", "32", "--threads", "1", "--device", "cpu"])
    import zarr

    res = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".zarr"):
            try:
                res[name] = array_hash(zarr.open(os.path.join(d, name), mode="r")[...])
            except Exception:  # noqa: BLE001 - a group: not hashed
                pass
    return {"tools/demo": res}


def case_tools(tmp) -> dict:
    import tifffile

    res = {}
    img, _ = make_nuclei((20, 40, 36), seed=7)
    tif = os.path.join(tmp, "stack.tif")
    tifffile.imwrite(tif, img)
    conv = os.path.join(tmp, "conv.zarr")
    run(["-m", "mpicellpose", "convert", tif, conv, "--chunks", "16"])
    import zarr

    z = zarr.open(conv, mode="r")
    res["tools/convert"] = {"content": array_hash(z[...]), "chunks": list(z.chunks)}
    ome = os.path.join(tmp, "conv.ome.zarr")
    run(["-m", "mpicellpose", "convert", tif, ome, "--chunks", "16", "--ome", "--voxel-size", "2,1,1"])
    res["tools/convert_ome"] = {"content": array_hash(zarr.open(ome + "/0", mode="r")[...]),
                                "attrs": sha(json.dumps(scrub(dict(zarr.open(ome, mode="r").attrs), tmp),
                                                        sort_keys=True, default=str).encode())}
    # plan --json, paths replaced
    for extra in ([], ["--model", "demo", "--pipeline", "flows"], ["--model", "demo", "--pipeline", "blocks"]):
        p = run(["-m", "mpicellpose", "plan", conv, os.path.join(tmp, "planned.zarr"), "--blocksize", "16",
                 "--ranks", "3", "--json"] + (extra or ["--backend", "threshold", "--threshold", "500"]))
        res["tools/plan/" + ("_".join(extra) or "threshold")] = scrub(json.loads(p.stdout), tmp)
    p = run(["-m", "mpicellpose", "plan", conv, os.path.join(tmp, "planned.zarr"), "--blocksize", "16",
             "--ranks", "3", "--model", "demo"])
    res["tools/plan/text"] = sha(scrub_text(p.stdout, tmp).encode())
    p = run(["-m", "mpicellpose", "batch-script", "--scheduler", "slurm", "--gpus", "8", "--", "segment", "in.zarr",
             "out.zarr", "--model", "cyto3"])
    res["tools/batch/slurm"] = sha(p.stdout.encode())
    p = run(["-m", "mpicellpose", "batch-script", "--scheduler", "lsf", "--gpus", "4", "--gpus-per-node", "2", "--",
             "segment", "in.zarr", "out.zarr"])
    res["tools/batch/lsf"] = sha(p.stdout.encode())
    # preview of a threshold run's labels (relative paths: the title shows the labels' path)
    lab = os.path.join(tmp, "prev.zarr")
    from mpicellpose import distributed_eval

    distributed_eval(conv, 16, lab, backend="threshold", backend_kwargs={"threshold": float(np.percentile(img, 70))})
    png = os.path.join(tmp, "prev.png")
    run(["-m", "mpicellpose", "preview", "prev.zarr", "--image", "conv.zarr", "--out", "prev.png"], cwd=tmp)
    import matplotlib.image as mpimg

    res["tools/preview"] = array_hash(mpimg.imread(png))
    return res


def scrub_text(text: str, tmp: str) -> str:
    """Report text with the scratch path and the file system's free space (which changes) replaced."""
    return re.sub(r"\(([\d.]+ ?\w*) free there\)", "(<FREE> free there)", text.replace(tmp, "<TMP>"))


def _subcommand_paths():
    from mpicellpose.cli import build_parser

    def walk(parser, prefix):
        out = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append(prefix + [name])
                    out += walk(sub, prefix + [name])
        return out

    return walk(build_parser(), [])


def case_help(tmp) -> dict:
    res = {"help/": sha(run(["-m", "mpicellpose", "--help"]).stdout.encode())}
    for path in _subcommand_paths():
        res["help/" + " ".join(path)] = sha(run(["-m", "mpicellpose"] + path + ["--help"]).stdout.encode())
    res["help/version"] = sha(run(["-m", "mpicellpose", "--version"]).stdout.encode())
    return res


CASES = {"inputs": case_inputs, "help": case_help, "threshold": case_threshold, "tools": case_tools,
         "cellpose": case_cellpose, "two_channel": case_two_channel, "demo_command": case_demo_command}


# ------------------------------------------------------------------------------- main
def compare(a_path, b_path) -> int:
    with open(a_path) as f:
        a = json.load(f)["hashes"]
    with open(b_path) as f:
        b = json.load(f)["hashes"]
    bad = 0
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            bad += 1
            print(f"DIFFERENT {k}:\n  {a.get(k)}\n  {b.get(k)}")
    print(f"{len(set(a) | set(b)) - bad} equal, {bad} different")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="JSON file to write")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two JSON files")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give OUT (or --compare A B)")
    tmp = tempfile.mkdtemp(prefix="mpicellpose-identical-")
    hashes, seconds = {}, {}
    t_all = time.perf_counter()
    try:
        for name, fn in CASES.items():
            if args.only and args.only not in name:
                continue
            t = time.perf_counter()
            hashes.update(fn(tmp))
            seconds[name] = round(time.perf_counter() - t, 1)
            print(f"{name}: {seconds[name]} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(args.out, "w") as f:
        json.dump({"commit": git, "seconds": seconds, "total_s": round(time.perf_counter() - t_all, 1),
                   "hashes": hashes}, f, indent=1, sort_keys=True)
    print(f"{len(hashes)} entries written to {args.out} in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
