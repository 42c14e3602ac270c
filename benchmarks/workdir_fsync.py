"""What making each block's scratch chunk durable before its record costs (issue 13).

    .venv/bin/python benchmarks/workdir_fsync.py [--blocks 64] [--edge 64] [--dir DIR]

Per block, like the segment phase: write the block's core (random labels, ~200 objects) into the
scratch array, then the record (an .npz, written atomically with fsync); once with
:meth:`WorkDir.save_record` as it is (fsync of the chunk file and its directory first), once with
that fsync skipped.  Prints the mean milliseconds per block of each and the difference.  Point
``--dir`` at the file system a run would use (a parallel file system answers fsync slower).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_pass(root, blocks, edge, sync: bool) -> float:
    from mpicellpose.volumes import storage
    from mpicellpose.runner.workdir import WorkDir

    side = int(round(blocks ** (1 / 3)))
    shape = (side * edge,) * 3
    work = WorkDir(root)
    work.prepare("bench", {}, shape, (edge,) * 3, reuse=False)
    if not sync:
        work.sync_chunk = lambda linear: None
    scratch = storage.open_array(work.scratch, mode="r+")
    rng = np.random.default_rng(0)
    core = rng.integers(0, 200, (edge,) * 3).astype(np.uint32)
    t = time.perf_counter()
    n = 0
    for z in range(side):
        for y in range(side):
            for x in range(side):
                sl = tuple(slice(i * edge, (i + 1) * edge) for i in (z, y, x))
                scratch[sl] = core
                work.save_record(n, n=np.int64(200), counts=np.ones(200, np.int64))
                n += 1
    return (time.perf_counter() - t) / n * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--edge", type=int, default=64)
    p.add_argument("--dir", default=None)
    a = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="mpicellpose-fsync-", dir=a.dir)
    try:
        res = {}
        for sync in (False, True, False, True):
            d = os.path.join(base, f"w{int(sync)}")
            shutil.rmtree(d, ignore_errors=True)
            res.setdefault(sync, []).append(one_pass(d, a.blocks, a.edge, sync))
        plain, synced = min(res[False]), min(res[True])
        print(f"{a.blocks} blocks of {a.edge}^3 in {base}: chunk + record {plain:.2f} ms per block without the "
              f"chunk fsync, {synced:.2f} ms with it (+{synced - plain:.2f} ms)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
