"""One mpicellpose rank with timing hooks; run it under mpiexec (project venv).

Two modes, both ending in ``mpicellpose.runner.driver.run(cfg, comm)`` on every rank:

``cli``      exactly ``python -m mpicellpose ARGS...`` (the command users type)::

    mpiexec -n 2 .venv/bin/python benchmarks/ours_runner.py --json-dir D -- \\
        segment IN.zarr OUT.zarr --model PATH --diameter 16 --blocksize 80 --overlap 32 --threads 1

``library``  ``mpicellpose.run(RunConfig(**mapping), comm)`` with a JSON mapping (the keys of
             ``mpicellpose.config.from_mapping``: RunConfig fields plus ``model``,
             ``diameter``, ...)::

    mpiexec -n 4 .venv/bin/python benchmarks/ours_runner.py --json-dir D \\
        --library '{"input": "local.zarr", "output": "out.zarr", "backend": "labels",
                    "blocksize": 32, "stitch": "touch", "overwrite": true}'

Nothing in ``mpicellpose/`` is modified.  Before the run, module attributes (and, once the
Cellpose model is built, two of its methods) that the driver
looks up at call time are wrapped with timers (``time.perf_counter`` around the call, a few
microseconds each), per rank:

==================  ==========================================================
``read``            ``blocks.read_block_image``  (read a block's read region)
``backend``         ``<Backend>.segment``  (Cellpose: ``CellposeModel.eval``, i.e. network +
                    flow dynamics/masks, all of Cellpose's own work on a block)
``finish``          ``blocks.number_core`` + ``blocks.record_block``  (renumber core, scratch chunk, record)
``normalize``       ``normalization.global_normalization``
``model_load``      ``blocks.build_backend``
``exchange``        ``comm.streams.exchange``  (point-to-point face exchange)
``match``           ``stitch.touch_edges`` + ``stitch.iou_edges``
``union_find``      ``stitch.merge_edges``  (rank 0)
``lut``             ``stitch.block_lut``
``cp_network``      ``CellposeModel._run_net`` on the rank's model (resize + network on all tiles/planes)
``cp_masks``        ``CellposeModel._compute_masks`` (flow dynamics, mask assembly, size filter)
``table``           ``phases.table.table_phase``
``agree``           ``comm.Mailbox.agree``  (collective agreement = waiting for other ranks)
``run``             the whole ``driver.run`` call on this rank
==================  ==========================================================

Each rank writes ``D/rank-<r>.json``: ``hooks`` (seconds and call counts), the driver's
``timings`` (rank 0's, broadcast), ``stats`` (incl. this rank's ``comm_bytes_sent``),
``n_objects``, ``exit_code``, this process's ``VmHWM`` (peak RSS) at the end and just before
``run`` (``vm_hwm_before_run_bytes``: the imported interpreter), ``t_import_s`` (interpreter
start to the end of importing mpi4py + mpicellpose), ``t_run_start_s`` (interpreter start to
the call of ``run``: imports, argument parsing, configuration), ``t_after_run_s`` and
``process_s``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

T_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _bench_util import vm_hwm, vm_rss  # noqa: E402

HOOKS = {}


MISSING = []


def _wrap(obj, attr, key):
    orig = getattr(obj, attr, None)
    if orig is None:          # the driver changed: time what still exists, say what does not
        MISSING.append(f"{getattr(obj, '__name__', obj)}.{attr}")
        return None

    @functools.wraps(orig)
    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            rec = HOOKS.setdefault(key, [0.0, 0])
            rec[0] += time.perf_counter() - t0
            rec[1] += 1
    setattr(obj, attr, timed)
    return orig


def install_hooks():
    from mpicellpose.cellpose import backends, segmenter
    from mpicellpose.runner import blocks, driver
    from mpicellpose.runner.phases import normalize as normalization
    from mpicellpose.grid import stitch
    from mpicellpose import comm as mcomm
    from mpicellpose.comm import streams
    from mpicellpose.runner.phases import segment, table

    _wrap(blocks, "read_block_image", "read")
    _wrap(segment, "number_core", "finish")
    _wrap(segment, "record_block", "finish")
    _wrap(normalization, "global_normalization", "normalize")
    _wrap(segment, "build_backend", "model_load")
    _wrap(table, "table_phase", "table")
    _wrap(streams, "exchange", "exchange")
    _wrap(stitch, "touch_edges", "match")
    _wrap(stitch, "iou_edges", "match")
    _wrap(stitch, "merge_edges", "union_find")
    _wrap(stitch, "block_lut", "lut")
    _wrap(mcomm.Mailbox, "agree", "agree")
    for cls in (segmenter.CellposeSegmenter, backends.ThresholdSegmenter, backends.LabelsSegmenter):
        _wrap(cls, "segment", "backend")
    orig_init = segmenter.CellposeSegmenter.__init__

    @functools.wraps(orig_init)
    def init(self, *a, **kw):  # split Cellpose's eval into network and masks, on this model instance
        orig_init(self, *a, **kw)
        _wrap(self.model, "_run_net", "cp_network")
        _wrap(self.model, "_compute_masks", "cp_masks")
    segmenter.CellposeSegmenter.__init__ = init
    holder = {}
    orig_run = driver.run

    def run(cfg, comm=None):
        t0 = time.perf_counter()
        holder["t_run_start_s"] = t0 - T_START
        holder["hwm_before_run"] = vm_hwm()
        try:
            res = orig_run(cfg, comm)
            holder["result"] = res
            return res
        finally:
            HOOKS["run"] = [time.perf_counter() - t0, 1]
    driver.run = run
    return holder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json-dir", required=True)
    p.add_argument("--library", default=None, help="JSON mapping for mpicellpose.config.from_mapping")
    p.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the mpicellpose CLI arguments")
    a = p.parse_args(argv)
    cli_args = a.cli[1:] if a.cli[:1] == ["--"] else a.cli

    from mpi4py import MPI
    import mpicellpose  # noqa: F401
    t_import = time.perf_counter() - T_START
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    holder = install_hooks()
    out = {"rank": rank, "size": size, "pid": os.getpid(), "mode": "library" if a.library else "cli",
           "t_import_s": round(t_import, 3), "error": None}
    code = None
    try:
        if a.library:
            from mpicellpose.config import from_mapping
            from mpicellpose.runner.driver import run
            cfg = from_mapping(json.loads(a.library))
            run(cfg, MPI.COMM_WORLD)
            code = 0
        else:
            from mpicellpose.cli import main as cli_main
            code = cli_main(cli_args)
    except BaseException as exc:  # noqa: BLE001 - record on this rank, exit non-zero
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        code = 1
    res = holder.get("result")
    out["exit_code"] = code
    if res is not None:
        out["n_objects"] = int(res.n_objects)
        out["n_merged"] = int(res.n_merged)
        out["timings"] = dict(res.timings)
        st = dict(res.stats or {})
        out["stats"] = {k: v for k, v in st.items()
                        if isinstance(v, (int, float, str, bool)) or k in ("timings",)}
    out["hooks"] = {k: {"s": round(v[0], 4), "calls": v[1]} for k, v in HOOKS.items()}
    out["hooks_missing"] = MISSING
    out["t_run_start_s"] = round(holder.get("t_run_start_s") or 0.0, 3)   # interpreter start -> run()
    out["t_after_run_s"] = round(time.perf_counter() - T_START - out["t_run_start_s"]
                                 - HOOKS.get("run", [0.0])[0], 3)              # after run() returned
    out["vm_hwm_bytes"] = vm_hwm()
    out["vm_hwm_before_run_bytes"] = holder.get("hwm_before_run")
    out["vm_rss_end_bytes"] = vm_rss()
    out["process_s"] = round(time.perf_counter() - T_START, 3)
    os.makedirs(a.json_dir, exist_ok=True)
    with open(os.path.join(a.json_dir, f"rank-{rank:05d}.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
