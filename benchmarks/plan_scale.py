"""The plan and the flows pipeline's bookkeeping at 10^6 blocks and 1024 ranks, built for real (issue 23).

    .venv/bin/python benchmarks/plan_scale.py [--grid 100] [--ranks 1024] [--json FILE]

An input of ``grid^3`` blocks of 128^3 (12800^3 voxels at the default, 2.1e12; uint16; the zarr
array's metadata only, no chunk is written: the plan reads none) is planned by rank 0 exactly as
``segment`` plans it (``make_plan``: settings, mask, fingerprint, work directory, the blocks'
hand-out for ``--ranks`` ranks), with the shipped model, diameter 30 (overlap 60, flow halo 16) and
``--pipeline flows``.  Measured: rank 0's wall and peak Python memory (tracemalloc) for the plan,
the pickled plan's size (what the broadcast carries), and then, for one simulated rank of
``--ranks``, everything the flows phase does before and around its boxes except the network, the
mask step and the file reads and writes: the box grid, the boxes to mask, this rank's share of the
shell check, the sweep's shares, the progress display's sizes (rank 0), the deletion checks of its
own boxes.  The work directory is created under ``--dir`` and removed.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import time
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def measure(fn):
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_mib": round(peak / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, default=100)
    p.add_argument("--ranks", type=int, default=1024)
    p.add_argument("--rank", type=int, default=517, help="the simulated rank")
    p.add_argument("--dir", default="/tmp/mpicellpose-plan-scale")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import zarr

    from _bench_util import machine_info
    from mpicellpose.config import RunConfig
    from mpicellpose.grid.cost import network_cost
    from mpicellpose.runner.phases import flows as fl
    from mpicellpose.runner.phases.plan import make_plan, open_volume
    from mpicellpose.runner import workdir
    from mpicellpose.runner.progress import Progress

    workdir.free_bytes = lambda path: 1 << 60  # the shells' space check is not what is measured here

    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    shape = (a.grid * 128,) * 3
    zarr.open_array(os.path.join(a.dir, "in.zarr"), mode="w", shape=shape, chunks=(128, 128, 128), dtype="uint16",
                    zarr_format=2)
    cfg = RunConfig(input=os.path.join(a.dir, "in.zarr"), output=os.path.join(a.dir, "out.zarr"), blocksize=128,
                    pipeline="flows", eval_kwargs={"diameter": 30.0}, model_kwargs={"pretrained_model": "demo"})
    vol = open_volume(cfg)
    plan, m_plan = measure(lambda: make_plan(cfg, vol, a.ranks))
    blob = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
    s = plan.settings
    rec = {"machine": machine_info(), "shape": shape, "blocks": len(s.grid), "ranks": a.ranks,
           "flow_box": s.flow_box, "overlap": s.overlap, "flow_halo": s.flow_halo, "plan_rank0": m_plan,
           "plan_pickle_mib": round(len(blob) / 2**20, 1)}
    _, m_unpickle = measure(lambda: pickle.loads(blob))
    rec["plan_unpickle_every_rank"] = m_unpickle

    class Box:  # one simulated rank: what the flows phase asks of the gateway, answered locally
        rank, size = a.rank, a.ranks

        def allgather(self, x, label):
            return [x]

    class Ctx:
        box = Box()

        class work:  # noqa: N801
            shells = os.path.join(a.dir, "work-shells")

    def rank_work():
        boxes = fl.box_grid(s, plan.kept)
        to_mask = fl.boxes_to_mask(boxes, plan.to_segment)
        todo = fl.flows_todo(Ctx, boxes, to_mask)
        shares = fl.sweep_shares(boxes, todo, "dynamic", a.ranks)
        mine = shares[a.rank]
        masked = set(to_mask)
        deletions = 0
        for x in mine:  # the deletion checks after each of its boxes' masks (markers: none exist here)
            for y in [x, *boxes.neighbours(x)]:
                readers = [z for z in boxes.neighbours(y) if boxes.has_kept[z]]
                deletions += all(z not in masked for z in readers)
        return boxes, shares, len(mine)

    (boxes, shares, own), m_rank = measure(rank_work)
    rec["rank_flows_bookkeeping"] = dict(m_rank, boxes=len(boxes), own_boxes=own)

    class Box0(Box):
        rank = 0
    _, m_progress = measure(lambda: Progress(Box0(), boxes, shares, "dynamic", label="flows", unit="box"))
    rec["rank0_progress_sizes"] = m_progress
    _, m_cost = measure(lambda: network_cost(s, plan.kept, n_ranks=a.ranks))
    rec["plan_cost_model"] = m_cost
    rec["cost"] = {k: v for k, v in network_cost(s, plan.kept, n_ranks=a.ranks).items() if not isinstance(v, dict)}
    print(json.dumps(rec, indent=1, default=str))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1, default=str)
    shutil.rmtree(a.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
