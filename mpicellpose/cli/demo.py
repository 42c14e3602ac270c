"""``mpicellpose demo``: the main job end to end on synthetic nuclei, with the shipped model
(generation, configuration and scoring are in :mod:`mpicellpose.tools.demo`)."""
from __future__ import annotations

import json
import os
import sys
import time

from .. import comm as mpi
from ..tools import demo
from .common import run_and_report


def register(sub) -> None:
    p = sub.add_parser("demo", help="segment a synthetic nuclei volume with the shipped model and score it",
                       description="Generate a synthetic 3D nuclei volume with ground truth, segment it with the "
                                   "shipped 'demo' Cellpose model on every launched rank, and report object F1 "
                                   "(IoU 0.5), objects cut by block faces and rejoined, and time per phase.")
    p.add_argument("--out", "--dir", dest="dir", default=None, metavar="DIR",
                   help="folder for the image, ground truth, labels, table and preview; its files of an earlier "
                        "demo are replaced (default: $XDG_CACHE_HOME/mpicellpose/demo, i.e. "
                        "~/.cache/mpicellpose/demo; every rank must see it)")
    p.add_argument("--size", type=int, default=160, help="edge of the cubic volume (default 160)")
    p.add_argument("--blocksize", default=None,
                   help="block size (default SIZE/2,SIZE,SIZE: two blocks, so objects are cut by a face)")
    p.add_argument("--overlap", default="16",
                   help="overlap per side (default 16 = one nucleus diameter, which keeps the demo under 5 "
                        "minutes on 2 CPU cores; the segment command's default is 2 x diameter)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic volume")
    p.add_argument("--gradient", action="store_true",
                   help="add a 1:4 brightness gradient along z, across the block faces (compare --normalize "
                        "global with --normalize block)")
    p.add_argument("--normalize", choices=("global", "block", "none"), default="global")
    p.add_argument("--stitch", choices=("iou", "touch"), default="iou")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:K")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.set_defaults(func=main)


def main(args) -> int:
    comm = mpi.world()
    rank = comm.Get_rank()
    # rank 0 decides the folder, so that every rank uses the same one whatever its environment
    out_dir = comm.bcast(os.path.abspath(os.path.expanduser(args.dir or demo.default_dir())) if rank == 0 else None,
                         root=0)
    args.dir = out_dir
    if rank == 0:
        sys.stdout.write(f"mpicellpose demo: writing to {out_dir} (choose another folder with --out DIR)\n")
        sys.stdout.flush()
    t0 = time.perf_counter()
    err = None
    if rank == 0:
        try:
            demo.generate(out_dir, args.size, seed=args.seed, gradient=args.gradient)
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
    err = comm.bcast(err, root=0)
    if err:
        if rank == 0:
            sys.stderr.write(f"mpicellpose: error: generating the demo volume in {out_dir} failed: {err}\n")
        return 1
    t_gen = time.perf_counter() - t0
    holder = {}

    def make_config():
        return demo.demo_config(args.dir, args.size, blocksize=args.blocksize, overlap=args.overlap,
                                normalize=args.normalize, stitch=args.stitch, device=args.device,
                                threads=args.threads)

    def runner(cfg, comm):
        from ..runner.driver import run

        holder["result"] = run(cfg, comm)
        return holder["result"]

    code = run_and_report(make_config, args, runner)
    if code != 0 or rank != 0:
        return code
    report = demo.evaluate(holder["result"], args.dir, comm.Get_size(), t_gen)
    sys.stdout.write(demo.format_summary(report, out_dir))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0
