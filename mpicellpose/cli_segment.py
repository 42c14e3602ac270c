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
    """Options shared by every subcommand that runs the pipeline.

    Defaults are not set here (``argparse.SUPPRESS``): only options given on the command
    line reach the configuration, over a ``--config`` file, over RunConfig's defaults.
    """
    g = p.add_argument_group("blocks")
    g.add_argument("--blocksize", default=argparse.SUPPRESS, metavar="N|Z,Y,X",
                   help="block (= output chunk) size per spatial axis (default 128)")
    g.add_argument("--overlap", default=argparse.SUPPRESS, metavar="N|Z,Y,X",
                   help="voxels added on each side of a block for context (default: 2 x diameter for cellpose, "
                        "z divided by anisotropy; 0 for threshold)")
    g.add_argument("--mask", default=argparse.SUPPRESS, metavar="PATH",
                   help="zarr foreground mask at the same or lower resolution; blocks without foreground are skipped")
    g = p.add_argument_group("segmentation")
    g.add_argument("--backend", choices=("cellpose", "threshold", "labels"), default=argparse.SUPPRESS,
                   help="cellpose network (default), connected components of image > threshold, or labels "
                        "(the input already holds per-block labels: stitch and renumber them)")
    g.add_argument("--model", default=argparse.SUPPRESS, metavar="NAME|PATH",
                   help="Cellpose model: 'demo' (shipped), a built-in name (cyto3, nuclei, cpsam, ...) or a weights file")
    g.add_argument("--diameter", type=float, default=argparse.SUPPRESS,
                   help="object diameter in voxels (default: the model's, 30 for built-ins)")
    g.add_argument("--anisotropy", type=float, default=argparse.SUPPRESS, help="z voxel size / xy voxel size (3D)")
    g.add_argument("--channel-axis", type=int, default=argparse.SUPPRESS, help="input axis holding channels (not spatial)")
    g = p.add_argument_group("input selection (OME-Zarr, TIFF, HDF5)")
    g.add_argument("--level", default=argparse.SUPPRESS, help="OME-Zarr resolution level (index or path; default 0)")
    g.add_argument("--channel", default=argparse.SUPPRESS,
                   help="OME-Zarr channel (index or omero label) to segment; default: all channels")
    g.add_argument("--timepoint", type=int, default=argparse.SUPPRESS, help="OME-Zarr time point")
    g.add_argument("--tile-pattern", default=argparse.SUPPRESS,
                   help="regular expression for the grid position of TIFF tiles (default _Z#Y#X#)")
    g = p.add_argument_group("OME-Zarr output")
    g.add_argument("--labels-name", default=argparse.SUPPRESS,
                   help="write the labels inside the OME-Zarr input as labels/NAME (the default when OUTPUT is "
                        "left out); an OUTPUT ending in .ome.zarr becomes a standalone NGFF label image")
    g.add_argument("--pyramid", type=int, default=argparse.SUPPRESS,
                   help="label pyramid levels to add (default: as many as the image for in-group labels, none "
                        "otherwise)")
    g.add_argument("--pyramid-method", choices=("mode", "nearest"), default=argparse.SUPPRESS,
                   help="downsampling of labels: most frequent label (default) or nearest")
    g.add_argument("--eval-kwargs", type=_json_dict, default=argparse.SUPPRESS, metavar="JSON",
                   help="extra CellposeModel.eval arguments as JSON")
    g.add_argument("--model-kwargs", type=_json_dict, default=argparse.SUPPRESS, metavar="JSON",
                   help="extra CellposeModel arguments as JSON")
    g.add_argument("--normalize", choices=("global", "block", "none"), default=argparse.SUPPRESS,
                   help="intensity normalisation: percentiles over the whole volume (default), per block "
                        "(the reference's behaviour) or none")
    g.add_argument("--threshold", type=float, default=argparse.SUPPRESS, help="threshold backend: foreground is image > T")
    g.add_argument("--connectivity", type=_connectivity, default=argparse.SUPPRESS,
                   help="threshold backend: 1 = faces (scipy.ndimage.label's default) ... 'full' = all neighbours")
    g = p.add_argument_group("stitching")
    g.add_argument("--stitch", choices=("touch", "iou"), default=argparse.SUPPRESS,
                   help="touch: labels touching across a face merge (exact for threshold); iou: labels matched "
                        "in the shared overlap (default for cellpose)")
    g.add_argument("--iou-threshold", type=float, default=argparse.SUPPRESS, help="iou stitching: minimum IoU (default 0.3)")
    g.add_argument("--iou-depth", type=int, default=argparse.SUPPRESS,
                   help="iou stitching: voxels compared on each side of a face (default 8, at most the overlap)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=argparse.SUPPRESS, help="auto (default), cpu, cuda, cuda:K")
    g.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="CPU threads per rank (default cores / ranks per node)")
    g.add_argument("--work-dir", default=argparse.SUPPRESS, help="scratch and resume state (default OUTPUT stem + .mpicellpose-work)")
    g.add_argument("--keep-work", action="store_true", default=argparse.SUPPRESS, help="keep the work directory after success")
    g.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help="replace an existing OUTPUT not made by this run")
    g.add_argument("--restart", action="store_true", default=argparse.SUPPRESS, help="discard the state of an earlier run and start over")
    g.add_argument("--zarr-format", type=int, choices=(2, 3), default=argparse.SUPPRESS,
                   help="on-disk format of OUTPUT (default: the input's, else 2)")
    g.add_argument("--log-dir", default=argparse.SUPPRESS, help="one log file per rank in this directory")
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    g.add_argument("--voxel-size", default=argparse.SUPPRESS, metavar="Z,Y,X",
                   help="physical voxel size per axis (object table centroids in physical units)")
    g = p.add_argument_group("configuration")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="TOML (or YAML) file with any of these options (keys as the long option names with "
                        "underscores, plus input/output, model_kwargs, eval_kwargs tables); flags override it")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as TOML and exit without running")


def register(sub) -> None:
    p = sub.add_parser(
        "segment", help="segment a volume block by block and stitch it (the main job)",
        description="Segment INPUT block by block on every MPI rank, stitch objects cut by block faces and write "
                    "one label volume with IDs 1..N to OUTPUT, plus an object table (OUTPUT stem + .objects.csv). "
                    "Launch with mpirun/srun for several ranks; re-run the same command to resume.",
    )
    p.add_argument("input", nargs="?", default=argparse.SUPPRESS,
                   help="input zarr array (or group with --dataset)")
    p.add_argument("output", nargs="?", default=argparse.SUPPRESS,
                   help="zarr array to create with the labels (may be left out for an OME-Zarr input)")
    p.add_argument("--dataset", default=argparse.SUPPRESS, help="array inside an input zarr group")
    add_run_arguments(p)
    p.set_defaults(func=main)


_NOT_CONFIG = {"func", "command", "config", "print_config", "log_level"}


def args_mapping(args) -> dict:
    """The options the user gave on the command line, as configuration keys."""
    d = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    if isinstance(d.get("voxel_size"), str):
        try:
            d["voxel_size"] = tuple(float(x) for x in d["voxel_size"].split(","))
        except ValueError:
            raise ConfigError(f"voxel_size must be numbers, got {d['voxel_size']!r}") from None
    return d


def config_from_args(args, **extra):
    """RunConfig from ``--config FILE`` (if any) overridden by the flags given."""
    from .config import from_mapping, load_file

    mapping = load_file(args.config) if getattr(args, "config", None) else {}
    mapping.update(args_mapping(args))
    mapping.update(extra)
    if mapping.get("backend", "cellpose") == "threshold" and "threshold" not in mapping and \
            "threshold" not in (mapping.get("backend_kwargs") or {}):
        raise ConfigError("--backend threshold needs --threshold T")
    return from_mapping(mapping)


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
        mpi.check_world(comm)
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
        sys.stdout.write(f"{result.n_objects} objects written to {result.output} (table: {result.table_path})\n")
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
    if getattr(args, "print_config", False):
        from .config import to_toml

        try:
            sys.stdout.write(to_toml(config_from_args(args)))
        except (MpiCellposeError, ValueError) as exc:
            sys.stderr.write(f"mpicellpose: error: {_one_line(exc)}\n")
            return EXIT_ERROR
        return 0
    return run_and_report(lambda: config_from_args(args), args)
