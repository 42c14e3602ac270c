"""``mpicellpose segment``: the main job."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import ConfigError, Interrupted, MpiCellposeError

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 3


def _json_dict(text):
    try:
        v = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"flow_threshold\": 0.5}'")
    return v


def _connectivity(text):
    if text == "full":
        return "full"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be 1, 2, 3 or 'full'") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that runs the pipeline."""
    g = p.add_argument_group("blocks")
    g.add_argument("--blocksize", default="128", metavar="N|Z,Y,X",
                   help="block (= output chunk) size per spatial axis (default 128)")
    g.add_argument("--overlap", default=None, metavar="N|Z,Y,X",
                   help="voxels added on each side of a block for context (default: 2 x diameter for cellpose, "
                        "z divided by anisotropy; 0 for threshold)")
    g.add_argument("--mask", default=None, metavar="PATH",
                   help="zarr foreground mask at the same or lower resolution; blocks without foreground are skipped")
    g = p.add_argument_group("segmentation")
    g.add_argument("--backend", choices=("cellpose", "threshold"), default="cellpose",
                   help="cellpose network (default) or connected components of image > threshold")
    g.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="Cellpose model: 'demo' (shipped), a built-in name (cyto3, nuclei, cpsam, ...) or a weights file")
    g.add_argument("--diameter", type=float, default=None,
                   help="object diameter in voxels (default: the model's, 30 for built-ins)")
    g.add_argument("--anisotropy", type=float, default=None, help="z voxel size / xy voxel size (3D)")
    g.add_argument("--channel-axis", type=int, default=None, help="input axis holding channels (not spatial)")
    g.add_argument("--eval-kwargs", type=_json_dict, default=None, metavar="JSON",
                   help="extra CellposeModel.eval arguments as JSON")
    g.add_argument("--model-kwargs", type=_json_dict, default=None, metavar="JSON",
                   help="extra CellposeModel arguments as JSON")
    g.add_argument("--normalize", choices=("global", "block", "none"), default="global",
                   help="intensity normalisation: percentiles over the whole volume (default), per block "
                        "(the reference's behaviour) or none")
    g.add_argument("--threshold", type=float, default=None, help="threshold backend: foreground is image > T")
    g.add_argument("--connectivity", type=_connectivity, default=1,
                   help="threshold backend: 1 = faces (scipy.ndimage.label's default) ... 'full' = all neighbours")
    g = p.add_argument_group("stitching")
    g.add_argument("--stitch", choices=("touch", "iou"), default=None,
                   help="touch: labels touching across a face merge (exact for threshold); iou: labels matched "
                        "in the shared overlap (default for cellpose)")
    g.add_argument("--iou-threshold", type=float, default=0.3, help="iou stitching: minimum IoU (default 0.3)")
    g.add_argument("--iou-depth", type=int, default=8,
                   help="iou stitching: voxels compared on each side of a face (default 8, at most the overlap)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:K")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default cores / ranks per node)")
    g.add_argument("--work-dir", default=None, help="scratch and resume state (default OUTPUT stem + .mpicellpose-work)")
    g.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT not made by this run")
    g.add_argument("--restart", action="store_true", help="discard the state of an earlier run and start over")
    g.add_argument("--zarr-format", type=int, choices=(2, 3), default=None,
                   help="on-disk format of OUTPUT (default: the input's, else 2)")
    g.add_argument("--log-dir", default=None, help="one log file per rank in this directory")
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def register(sub) -> None:
    p = sub.add_parser(
        "segment", help="segment a volume block by block and stitch it (the main job)",
        description="Segment INPUT block by block on every MPI rank, stitch objects cut by block faces and write "
                    "one label volume with IDs 1..N to OUTPUT, plus an object table (OUTPUT stem + .objects.csv). "
                    "Launch with mpirun/srun for several ranks; re-run the same command to resume.",
    )
    p.add_argument("input", help="input zarr array (or group with --dataset)")
    p.add_argument("output", help="zarr array to create with the labels")
    p.add_argument("--dataset", default=None, help="array inside an input zarr group")
    add_run_arguments(p)
    p.set_defaults(func=main)


def config_from_args(args, **extra):
    from .config import RunConfig

    eval_kwargs = dict(args.eval_kwargs or {})
    if args.diameter is not None:
        eval_kwargs["diameter"] = args.diameter
    if args.anisotropy is not None:
        eval_kwargs["anisotropy"] = args.anisotropy
    model_kwargs = dict(args.model_kwargs or {})
    if args.model is not None:
        model_kwargs["pretrained_model"] = args.model
    backend_kwargs = {"connectivity": args.connectivity}
    if args.threshold is not None:
        backend_kwargs["threshold"] = args.threshold
    elif args.backend == "threshold":
        raise ConfigError("--backend threshold needs --threshold T")
    return RunConfig(
        input=args.input, output=args.output, dataset=getattr(args, "dataset", None), blocksize=args.blocksize,
        overlap=args.overlap, channel_axis=args.channel_axis, mask=args.mask, backend=args.backend,
        model_kwargs=model_kwargs, eval_kwargs=eval_kwargs, backend_kwargs=backend_kwargs, stitch=args.stitch,
        iou_threshold=args.iou_threshold, iou_depth=args.iou_depth, normalize=args.normalize,
        work_dir=args.work_dir, keep_work=args.keep_work, overwrite=args.overwrite, restart=args.restart,
        zarr_format=args.zarr_format, device=args.device, threads=args.threads, log_dir=args.log_dir, **extra)


def setup_logging(rank: int, level: str = "INFO", log_dir: str | None = None) -> None:
    """Rank 0 logs to stderr at ``level``; other ranks only warnings; optional file per rank."""
    root = logging.getLogger("mpicellpose")
    root.setLevel(logging.DEBUG)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = _RankFormatter(rank)
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    h.setFormatter(fmt)
    root.addHandler(h)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(log_dir, f"rank-{rank:05d}.log"))
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        root.addHandler(fh)


class _RankFormatter(logging.Formatter):
    """Shows the record's rank (the process's world rank when the record has none)."""

    def __init__(self, rank):
        super().__init__("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.rank = rank

    def format(self, record):
        if not hasattr(record, "rank"):
            record.rank = self.rank
        return super().format(record)


def run_and_report(make_config, args, runner=None) -> int:
    """Run with uniform error handling: one line on stderr (rank 0), exit code on every rank."""
    from . import comm as mpi

    comm = mpi.world()
    rank = comm.Get_rank()
    setup_logging(rank, getattr(args, "log_level", "INFO"), getattr(args, "log_dir", None))
    try:
        cfg = make_config()
        if runner is None:
            from .driver import run

            result = run(cfg, comm)
        else:
            result = runner(cfg, comm)
    except Interrupted as exc:
        if rank == 0:
            sys.stderr.write(f"mpicellpose: interrupted: {exc}\n")
        return _settle(comm, EXIT_INTERRUPTED)
    except (MpiCellposeError, ValueError, FileNotFoundError, PermissionError) as exc:
        if rank == 0:
            sys.stderr.write(f"mpicellpose: error: {_one_line(exc)}\n")
        return _settle(comm, EXIT_ERROR)
    if rank == 0 and result is not None and hasattr(result, "n_objects"):
        sys.stdout.write(f"{result.n_objects} objects written to {cfg.output} (table: {result.table_path})\n")
    return 0


def _settle(comm, code: int) -> int:
    """Let rank 0's message out before any rank exits non-zero.

    Under ``python -m mpi4py`` the first rank to exit with a non-zero code aborts the
    others, so every rank waits here until rank 0 has written and flushed its message.
    Every rank reaches this point, because errors are agreed collectively first.
    """
    from . import comm as mpi

    sys.stderr.flush()
    try:
        mpi.quiet_barrier(comm)
    except Exception:  # pragma: no cover - MPI already broken
        pass
    return code


def _one_line(exc) -> str:
    return " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())


def main(args) -> int:
    return run_and_report(lambda: config_from_args(args), args)
