"""Run the reference (``cellpose.contrib.distributed_segmentation.distributed_eval``) end to end
and record what it costs.

Run with the reference venv (see ``setup_reference_env.sh``)::

    benchmarks/.venv-reference/bin/python benchmarks/reference_runner.py \
        --input IN.zarr --output OUT.zarr --blocksize 128 --workers 2 \
        --model PATH --diameter 16 [--do-3d] [--json RESULT.json]

What it does
------------
* Sets ``HOME`` to a private temporary folder and ``chdir``s into a private work folder
  before importing dask or the reference: the reference writes
  ``~/.config/dask/distributed_cellpose_dask_config.yaml``, ``~/.cellpose/run.log``,
  ``./dask_worker_logs_<timestamp>/``, ``./.<user>_distributed_cellpose/`` and its
  temporary zarr into the CWD.  What it left there is listed in the JSON
  (``side_effects``) and the folders are removed afterwards (``--keep-workdir`` keeps them).
* Builds the reference's own local cluster class (``myLocalCluster``) with ``--workers``
  worker processes of one thread each, on 127.0.0.1, no dashboard, then sets
  ``torch.set_num_threads(--threads)`` (and OpenCV's) in every worker (the reference itself
  sets ``OMP_NUM_THREADS=2*ncpus`` in the workers).
* Calls ``distributed_eval(input_zarr, blocksize, write_path, model_kwargs=..., eval_kwargs=...,
  cluster=cluster)`` with ``model_kwargs={'gpu': ..., 'pretrained_model': MODEL}`` and
  ``eval_kwargs={'diameter': D, 'z_axis': 0, 'do_3D': ..., 'channels': [0, 0]}`` (plus
  ``--eval-kwargs`` JSON).
* Samples the RSS of this process (client + scheduler + nannies: LocalCluster runs its
  scheduler in the client process) and of every child process (the workers) every
  ``--sample-interval`` seconds (psutil, plus the kernel's ``VmHWM`` high-water mark), and at
  the end asks every worker for its ``VmHWM`` (``ru_maxrss`` is useless there: a spawned
  worker inherits its parent's value across exec).
* Times the reference's phases without changing its code, by wrapping two module-level
  functions it calls: ``segment_s`` (start until ``determine_merge_relabeling`` is entered:
  all blocks segmented and gathered), ``merge_s`` (``determine_merge_relabeling``: face
  adjacency + connected components + lookup table), ``relabel_s`` (saving the table and
  the dask relabel of every chunk), ``boxes_s`` (``merge_all_boxes``).
* Counts the labels in the output (unique non-zero values, chunk by chunk), records
  ``len(boxes)`` and the max label, and any exception (type, message, traceback tail)
  instead of crashing.  Exit status 0 when the JSON was written, whatever the reference did.

The JSON is printed on stdout (last line) and written to ``--json`` when given.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- memory
def _vm_hwm(pid: int) -> int:
    """Kernel peak RSS (VmHWM) of a live process in bytes, 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Background thread: peak RSS of this process and of all its descendants."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.me = psutil.Process()
        self.peak = {}        # pid -> max sampled rss
        self.hwm = {}         # pid -> max VmHWM seen
        self.names = {}       # pid -> short command description
        self.peak_total = 0   # max over samples of the summed rss of the whole tree
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join()
        self.sample()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        procs = [self.me]
        try:
            procs += self.me.children(recursive=True)
        except psutil.Error:
            pass
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
            self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), _vm_hwm(p.pid))
            if p.pid not in self.names:
                try:
                    self.names[p.pid] = " ".join(p.cmdline())[:160]
                except psutil.Error:
                    self.names[p.pid] = "?"
        self.peak_total = max(self.peak_total, total)
        self.samples += 1


# --------------------------------------------------------------------------- worker helpers
def _worker_set_threads(n):
    """Run inside each worker: one thread for torch (intra-op) and OpenCV."""
    import torch
    torch.set_num_threads(n)
    try:
        import cv2
        cv2.setNumThreads(n)
    except Exception:  # noqa: BLE001
        pass
    return torch.get_num_threads()


def _worker_info():
    # VmHWM, not ru_maxrss: a spawned process inherits its parent's ru_maxrss across exec
    out = {"pid": os.getpid(), "vm_hwm_bytes": _vm_hwm(os.getpid()),
           "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    return out


def _task_threads(_=None):
    """Run as a task (in the worker's executor thread, where blocks run)."""
    import torch
    return torch.get_num_threads()


# --------------------------------------------------------------------------- main
def count_labels(path):
    """Unique non-zero labels of a zarr array, chunk by chunk: (count, max)."""
    import zarr
    arr = zarr.open(path, mode="r")
    uniq = []
    for idx in np.ndindex(*arr.cdata_shape):
        sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, arr.chunks, arr.shape))
        u = np.unique(arr[sl])
        uniq.append(u[u != 0])
    u = np.unique(np.concatenate(uniq)) if uniq else np.zeros(0, np.uint64)
    return int(u.size), int(u.max()) if u.size else 0, list(arr.shape), str(arr.dtype)


def listing(root, depth=2):
    """Names under root (relative), up to `depth` levels, for the side-effect report."""
    out = []
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        level = 0 if rel == "." else rel.count(os.sep) + 1
        if level >= depth:
            dirnames[:] = []
        for n in sorted(dirnames) + sorted(filenames):
            out.append(os.path.normpath(os.path.join(rel, n)))
    return sorted(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run the reference distributed_eval and measure it.")
    p.add_argument("--input", required=True, help="input zarr array (readable by zarr-python 2)")
    p.add_argument("--output", required=True, help="output zarr path (overwritten)")
    p.add_argument("--blocksize", type=int, nargs="+", required=True,
                   help="one int (all axes) or one per axis")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch/OpenCV threads per worker")
    p.add_argument("--model", required=True, help="path to Cellpose 3 weights (a file)")
    p.add_argument("--diameter", type=float, default=None,
                   help="eval diameter; the reference uses overlap = 2*diameter "
                        "(omit to let the reference use its default 30)")
    p.add_argument("--do-3d", action="store_true", help="eval_kwargs do_3D=True")
    p.add_argument("--gpu", action="store_true", help="model_kwargs gpu=True")
    p.add_argument("--eval-kwargs", default="{}", help="JSON merged into eval_kwargs")
    p.add_argument("--cluster-kwargs", default="{}", help="JSON merged into myLocalCluster kwargs")
    p.add_argument("--memory-limit", default=None,
                   help="per-worker memory limit for dask (e.g. '8GB', '0' = none); "
                        "default: dask's (total memory / workers)")
    p.add_argument("--temporary-directory", default=None,
                   help="the reference's temporary_directory (default: its CWD, the work folder)")
    p.add_argument("--workdir", default=None, help="CWD (and HOME) for the reference; default: a temp dir")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--sample-interval", type=float, default=0.2)
    p.add_argument("--no-count", action="store_true", help="do not count labels of the output")
    p.add_argument("--json", default=None, help="write the result here too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_process = time.perf_counter()
    inp, out = os.path.abspath(a.input), os.path.abspath(a.output)
    model = os.path.abspath(a.model)
    json_path = os.path.abspath(a.json) if a.json else None
    res = {
        "tool": "reference", "input": inp, "output": out, "model": model,
        "workers": a.workers, "threads_per_worker": a.threads, "do_3d": a.do_3d,
        "diameter": a.diameter, "ok": False, "error": None,
    }

    # ---------------------------------------------------------------- sandbox CWD and HOME
    workdir = os.path.abspath(a.workdir) if a.workdir else tempfile.mkdtemp(prefix="refrun_")
    home = os.path.join(workdir, "home")
    cwd = os.path.join(workdir, "cwd")
    os.makedirs(home, exist_ok=True)
    os.makedirs(cwd, exist_ok=True)
    os.environ["HOME"] = home
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(home, ".mpl"))
    os.chdir(cwd)
    res["workdir"] = workdir

    sampler = RssSampler(a.sample_interval).start()
    phases = {}
    cluster = None
    try:
        if not os.path.isfile(model):
            # cellpose 3.1.1.3 silently falls back to downloading cyto3 for a missing path
            raise FileNotFoundError(f"model file not found: {model}")
        t0 = time.perf_counter()
        import importlib.metadata as md
        import zarr
        import cellpose.contrib.distributed_segmentation as ref
        res["versions"] = {n: md.version(n) for n in
                           ("cellpose", "torch", "zarr", "numcodecs", "dask", "distributed",
                            "dask-image", "numpy", "scipy")}
        res["versions"]["python"] = sys.version.split()[0]
        phases["import_s"] = time.perf_counter() - t0
        res["client_rss_after_import_bytes"] = psutil.Process().memory_info().rss

        input_zarr = zarr.open(inp, mode="r")
        res["shape"] = list(input_zarr.shape)
        res["input_dtype"] = str(input_zarr.dtype)
        blocksize = a.blocksize * len(input_zarr.shape) if len(a.blocksize) == 1 else a.blocksize
        blocksize = tuple(int(b) for b in blocksize)
        res["blocksize"] = list(blocksize)
        res["n_blocks"] = int(np.prod(ref.get_nblocks(input_zarr.shape, blocksize)))

        model_kwargs = {"gpu": bool(a.gpu), "pretrained_model": model}
        eval_kwargs = {"z_axis": 0, "do_3D": bool(a.do_3d), "channels": [0, 0]}
        if a.diameter is not None:
            d = a.diameter
            eval_kwargs["diameter"] = int(d) if float(d).is_integer() else d
        eval_kwargs.update(json.loads(a.eval_kwargs))
        res["model_kwargs"] = dict(model_kwargs)
        res["eval_kwargs"] = dict(eval_kwargs)

        # ------------------------------------------------------------ the reference's cluster
        t0 = time.perf_counter()
        ckw = {"ncpus": a.threads, "n_workers": a.workers, "threads_per_worker": 1,
               "host": "127.0.0.1", "dashboard_address": None, "processes": True}
        if a.memory_limit is not None:
            ckw["memory_limit"] = 0 if a.memory_limit == "0" else a.memory_limit
        ckw.update(json.loads(a.cluster_kwargs))
        res["cluster_kwargs"] = {k: v for k, v in ckw.items()}
        cluster = ref.myLocalCluster(**ckw)
        client = cluster.client
        client.wait_for_workers(a.workers, timeout=300)
        res["worker_torch_threads"] = sorted(set(client.run(_worker_set_threads, a.threads).values()))
        # and once more from a task, i.e. in the executor thread where blocks run
        for addr in client.scheduler_info()["workers"]:
            client.submit(_worker_set_threads, a.threads, workers=[addr], pure=False).result()
        phases["cluster_start_s"] = time.perf_counter() - t0

        # ------------------------------------------------------------ phase timing hooks
        marks = {}
        orig_merge, orig_boxes = ref.determine_merge_relabeling, ref.merge_all_boxes

        def timed_merge(*args, **kw):
            marks["merge_start"] = time.perf_counter()
            try:
                return orig_merge(*args, **kw)
            finally:
                marks["merge_end"] = time.perf_counter()

        def timed_boxes(*args, **kw):
            marks["boxes_start"] = time.perf_counter()
            try:
                return orig_boxes(*args, **kw)
            finally:
                marks["boxes_end"] = time.perf_counter()

        ref.determine_merge_relabeling, ref.merge_all_boxes = timed_merge, timed_boxes
        t_eval = time.perf_counter()
        try:
            segments, boxes = ref.distributed_eval(
                input_zarr, blocksize, out,
                model_kwargs=model_kwargs, eval_kwargs=eval_kwargs,
                cluster=cluster, temporary_directory=a.temporary_directory,
            )
        finally:
            t_end = time.perf_counter()
            ref.determine_merge_relabeling, ref.merge_all_boxes = orig_merge, orig_boxes
            phases["distributed_eval_s"] = t_end - t_eval
            if "merge_start" in marks:
                phases["segment_s"] = marks["merge_start"] - t_eval
            if "merge_end" in marks:
                phases["merge_s"] = marks["merge_end"] - marks["merge_start"]
                phases["relabel_s"] = marks.get("boxes_start", t_end) - marks["merge_end"]
            if "boxes_end" in marks:
                phases["boxes_s"] = marks["boxes_end"] - marks["boxes_start"]
            try:
                winfo = client.run(_worker_info)
                res["worker_task_torch_threads"] = sorted(set(
                    client.gather(client.map(_task_threads, range(a.workers), pure=False))))
            except Exception as exc:  # noqa: BLE001
                winfo = {}
                res["worker_info_error"] = repr(exc)
            res["workers_info"] = {addr: v for addr, v in winfo.items()}
        res["n_boxes"] = len(boxes)
        res["eval_kwargs_after"] = {k: v for k, v in eval_kwargs.items()}  # the reference mutates it
        res["ok"] = True
        if not a.no_count:
            t0 = time.perf_counter()
            n, mx, shape, dtype = count_labels(out)
            phases["count_s"] = time.perf_counter() - t0
            res.update(n_labels=n, max_label=mx, output_shape=shape, output_dtype=dtype)
    except BaseException as exc:  # noqa: BLE001 - record, don't crash
        tb = traceback.format_exc()
        res["error"] = {"type": type(exc).__name__, "message": str(exc)[:2000],
                        "traceback_tail": tb[-4000:]}
        if isinstance(exc, KeyboardInterrupt):
            res["error"]["type"] = "KeyboardInterrupt"
    finally:
        try:
            if cluster is not None:
                t0 = time.perf_counter()
                cluster.__exit__(None, None, None)
                phases["cluster_close_s"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            res["cluster_close_error"] = repr(exc)
        sampler.stop()

    # ---------------------------------------------------------------- memory report
    me = os.getpid()
    client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers = []
    wpids = {v.get("pid"): addr for addr, v in (res.get("workers_info") or {}).items()}
    for pid, rss in sorted(sampler.peak.items()):
        if pid == me:
            continue
        entry = {"pid": pid, "role": "other", "peak_rss_sampled_bytes": rss,
                 "vm_hwm_bytes": sampler.hwm.get(pid, 0), "cmd": sampler.names.get(pid, "")}
        if pid in wpids:
            entry["role"] = "worker"
            entry["address"] = wpids[pid]
            entry["vm_hwm_at_end_bytes"] = res["workers_info"][wpids[pid]].get("vm_hwm_bytes")
        workers.append(entry)
    worker_like = [w for w in workers if "address" in w] or workers
    res["memory"] = {
        "client_peak_rss_bytes": client_peak,
        "client_peak_rss_sampled_bytes": sampler.peak.get(me, 0),
        "processes": workers,
        "max_worker_peak_rss_bytes": max([max(w["vm_hwm_bytes"], w.get("vm_hwm_at_end_bytes") or 0,
                                              w["peak_rss_sampled_bytes"]) for w in worker_like],
                                         default=0),
        "peak_total_rss_sampled_bytes": sampler.peak_total,
        "samples": sampler.samples,
        "note": "client = this process, which also runs the dask scheduler and the nannies",
    }
    res["phases"] = {k: round(v, 3) for k, v in phases.items()}
    res["wall_s"] = round(phases.get("distributed_eval_s", float("nan")), 3)
    res["process_s"] = round(time.perf_counter() - t_process, 3)

    # ---------------------------------------------------------------- side effects, cleanup
    res["side_effects"] = {"cwd": listing(cwd, 1), "home": listing(home, 3)}
    if not a.keep_workdir and not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)

    text = json.dumps(res, default=str)
    if json_path:
        os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
