"""What the subcommands share: argument types and groups, the options of a pipeline run,
the configuration from the command line, logging, and uniform error reporting."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from ..errors import ConfigError, Interrupted, MpiCellposeError

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


INPUT_HELP = ("the volume to segment: a zarr array (v2 or v3), a zarr group with --dataset, an OME-Zarr image "
              "(NGFF 0.4/0.5), an HDF5 dataset written file.h5:/path/to/dataset, a TIFF / OME-TIFF / ImageJ "
              "stack, or a quoted glob of TIFF files ('tiles/*.tif': tiles named ..._Z#Y#X# go on their grid, "
              "other names are stacked as z slices); read lazily, block by block")

def _group(p: argparse.ArgumentParser, title: str, description: str | None = None):
    """The argument group of ``p`` called ``title``, created (with ``description``) if new,
    so that a subcommand can put its own arguments under the same headings."""
    for g in p._action_groups:
        if g.title == title:
            return g
    return p.add_argument_group(title, description)


def add_input_output(p: argparse.ArgumentParser, output_help: str) -> None:
    """INPUT (with --dataset) and OUTPUT, under the "input" and "output" headings."""
    g = _group(p, "input")
    g.add_argument("input", nargs="?", default=argparse.SUPPRESS, metavar="INPUT", help=INPUT_HELP)
    g.add_argument("--dataset", default=argparse.SUPPRESS, metavar="NAME",
                   help="array inside a zarr group or HDF5 file (for HDF5 also written file.h5:/NAME)")
    g = _group(p, "output")
    g.add_argument("output", nargs="?", default=argparse.SUPPRESS, metavar="OUTPUT", help=output_help)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that runs the pipeline, grouped under the headings
    a user looks for: input, output, blocks, model, stitching, run control, performance,
    logging and configuration file.  A subcommand may put its own arguments (INPUT, OUTPUT,
    --dataset) into the "input" and "output" groups first (:func:`_group`).

    Defaults are not set here (``argparse.SUPPRESS``): only options given on the command
    line reach the configuration, over a ``--config`` file, over RunConfig's defaults.
    """
    _input_options(p)
    _output_options(p)
    _blocks_options(p)
    _model_options(p)
    _stitching_options(p)
    _run_control_options(p)
    _performance_options(p)
    _logging_options(p)
    _config_file_options(p)


def _input_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "input")
    g.add_argument("--level", default=argparse.SUPPRESS, metavar="N|PATH",
                   help="OME-Zarr resolution level to segment (index or path; default 0, the full resolution)")
    g.add_argument("--channel", default=argparse.SUPPRESS, metavar="C[,N]",
                   help="channel(s) of an input with a channel axis (index, or OME-Zarr omero label): one channel, "
                        "or the channel to segment then the nuclear channel, e.g. 1,0 = cytoplasm 1, nucleus 0 "
                        "(Cellpose 3 channels=[cyto, nuc]; Cellpose 4 takes them in this order); default: all "
                        "channels, in file order")
    g.add_argument("--timepoint", type=int, default=argparse.SUPPRESS, metavar="T",
                   help="time point of an input with a time axis")
    g.add_argument("--channel-axis", type=int, default=argparse.SUPPRESS, metavar="AXIS",
                   help="axis of a plain array that holds channels, e.g. 0 for C,Z,Y,X or C,Y,X, -1 for Z,Y,X,C "
                        "(not treated as spatial; OME-Zarr/OME-TIFF/ImageJ inputs name their own)")
    g.add_argument("--tile-pattern", default=argparse.SUPPRESS, metavar="REGEX",
                   help=r"regular expression giving the grid position of TIFF tiles (default _(Z)(\d+)(Y)(\d+)(X)(\d+))")
    g.add_argument("--voxel-size", default=argparse.SUPPRESS, metavar="Z,Y,X",
                   help="physical voxel size per axis when the file does not say it (sets Cellpose's anisotropy "
                        "in 3D and the physical centroids of the object table)")


def _output_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "output")
    g.add_argument("--labels-name", default=argparse.SUPPRESS, metavar="NAME",
                   help="write the labels inside the OME-Zarr input as labels/NAME (the default when OUTPUT is "
                        "left out); an OUTPUT ending in .ome.zarr becomes a standalone NGFF label image")
    g.add_argument("--pyramid", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="label pyramid levels to add (default: as many as the image for in-group labels, none "
                        "otherwise)")
    g.add_argument("--pyramid-method", choices=("mode", "nearest"), default=argparse.SUPPRESS,
                   help="downsampling of labels: most frequent label (default) or nearest")
    g.add_argument("--zarr-format", type=int, choices=(2, 3), default=argparse.SUPPRESS,
                   help="on-disk format of OUTPUT (default: the input's, else 2)")
    g.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace an existing OUTPUT that this run did not create")


def _blocks_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "blocks", "The volume is cut into blocks: each is one output chunk and one unit of work.")
    g.add_argument("--blocksize", default=argparse.SUPPRESS, metavar="N|Z,Y,X",
                   help="block (= output chunk) size per spatial axis (default 128)")
    g.add_argument("--overlap", default=argparse.SUPPRESS, metavar="N|Z,Y,X",
                   help="voxels added on each side of a block for context (default: 2 x diameter for cellpose, "
                        "z divided by anisotropy; 0 for threshold)")
    g.add_argument("--mask", default=argparse.SUPPRESS, metavar="PATH",
                   help="foreground mask (zarr) at the same or a lower resolution; blocks without foreground "
                        "are skipped")


def _model_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "model (Cellpose, or the threshold and labels backends)")
    g.add_argument("--backend", choices=("cellpose", "threshold", "labels"), default=argparse.SUPPRESS,
                   help="cellpose network (default), connected components of image > threshold, or labels "
                        "(the input already holds per-block labels: stitch and renumber them)")
    g.add_argument("--model", default=argparse.SUPPRESS, metavar="NAME|PATH",
                   help="Cellpose model: 'demo' (shipped), a built-in name (cyto3, nuclei, cpsam, ...) or a weights file")
    g.add_argument("--diameter", type=float, default=argparse.SUPPRESS,
                   help="object diameter in voxels (default: the model's, 30 for built-ins)")
    g.add_argument("--anisotropy", type=float, default=argparse.SUPPRESS,
                   help="z voxel size / xy voxel size (3D; default from the input's voxel size, else 1)")
    g.add_argument("--normalize", choices=("global", "block", "none"), default=argparse.SUPPRESS,
                   help="intensity normalisation: percentiles over the whole volume (default), per block "
                        "(the reference's behaviour) or none")
    g.add_argument("--eval-kwargs", type=_json_dict, default=argparse.SUPPRESS, metavar="JSON",
                   help="extra CellposeModel.eval arguments as JSON, e.g. '{\"flow_threshold\": 0.5}'")
    g.add_argument("--model-kwargs", type=_json_dict, default=argparse.SUPPRESS, metavar="JSON",
                   help="extra CellposeModel arguments as JSON")
    g.add_argument("--threshold", type=float, default=argparse.SUPPRESS, metavar="T",
                   help="threshold backend: foreground is image > T (required with --backend threshold)")


def _stitching_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "stitching", "How objects cut by block faces are joined.")
    g.add_argument("--stitch", choices=("touch", "iou"), default=argparse.SUPPRESS,
                   help="touch: labels touching across a face merge (exact for threshold, its default); iou: "
                        "labels matched in the shared overlap (default for cellpose)")
    g.add_argument("--connectivity", type=_connectivity, default=argparse.SUPPRESS, metavar="1|2|full",
                   help="touch stitching and the threshold backend: 1 = faces (scipy.ndimage.label's default), "
                        "2 = also edges, full = all neighbours (default 1)")
    g.add_argument("--iou-threshold", type=float, default=argparse.SUPPRESS,
                   help="iou stitching: minimum IoU (default 0.3)")
    g.add_argument("--iou-depth", type=int, default=argparse.SUPPRESS,
                   help="iou stitching: voxels compared on each side of a face (default 8, at most the overlap)")


def _run_control_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "run control and restart",
               "Finished blocks are recorded in the work directory: the same command resumes.")
    g.add_argument("--work-dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="scratch and resume state (default OUTPUT stem + .mpicellpose-work)")
    g.add_argument("--keep-work", action="store_true", default=argparse.SUPPRESS,
                   help="keep the work directory after success")
    g.add_argument("--restart", action="store_true", default=argparse.SUPPRESS,
                   help="discard the state of an earlier run and start over")
    g.add_argument("--watchdog", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                   help="end the job when a rank has waited this long for another rank that sent no word "
                        "(stuck I/O, a dead GPU); default 3600, or 4x the slowest block if longer; 0 turns it "
                        "off (also MPICELLPOSE_WATCHDOG)")


def _flow_slab(text):
    if str(text).strip().lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a number of blocks >= 1 or 'auto', got {text!r}")
    return n


def _performance_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "performance and devices")
    g.add_argument("--schedule", choices=("dynamic", "static"), default=argparse.SUPPRESS,
                   help="how blocks go to ranks: dynamic (default) hands them out at run time, costliest first, "
                        "so a fast rank takes more; static gives each rank a fixed contiguous run (for debugging)")
    g.add_argument("--pipeline", choices=("flows", "blocks"), default=argparse.SUPPRESS,
                   help="Cellpose: 'flows' (default under Cellpose 3) runs the network once per voxel (per orientation, "
                        "slabs of planes through the block cores plus --flow-halo in plane), stores the flow field in the "
                        "work directory, then builds masks per "
                        "block with the full overlap; 'blocks' runs Cellpose's eval on each block with its overlap "
                        "(the network sees overlapping voxels several times; the default under Cellpose 4)")
    g.add_argument("--flow-halo", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="--pipeline flows: in-plane context around a block's core for the network, in voxels "
                        "(default 16 x diameter / 30, at least 16)")
    g.add_argument("--flow-slab", type=_flow_slab, default=argparse.SUPPRESS, metavar="N|auto",
                   help="--pipeline flows: blocks per side, in plane, of the planes the network runs on at once; wider "
                        "slabs need less --flow-halo per voxel but more memory (default auto: as many as keep a slab "
                        "within 2^24 voxels or twice a block with its overlap, whichever is more; e.g. 2 for 256^3 "
                        "blocks)")
    _auto_on_off(g, "--masks-during-flows",
                 "--pipeline flows: build masks in a CPU thread while the GPU computes the next blocks' flows "
                 "(default auto: on for ranks with a GPU, off on CPU-only ranks, where both would share the "
                 "same cores); the labels are the same either way")
    _auto_on_off(g, "--read-ahead",
                 "read the next block's image in a thread while the network works on this one (default auto: "
                 "on for ranks with a GPU); one more block in memory, the labels are the same either way")
    g.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default=argparse.SUPPRESS,
                   help="the network's arithmetic (default: the model's own, float32 under Cellpose 3, bfloat16 under "
                        "Cellpose 4): bfloat16/float16 run it under autocast, 2-4x faster on GPUs and on CPUs with "
                        "AMX or AVX-512 BF16, with labels that differ slightly from float32's (docs/pipeline.md)")
    g.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="Cellpose: tiles per forward pass of the network (default 8); halved automatically after a "
                        "GPU out-of-memory error")
    g.add_argument("--device", default=argparse.SUPPRESS, metavar="auto|cpu|cuda|cuda:K",
                   help="where each rank runs the model (default auto: one GPU per rank, round-robin, else CPU)")
    g.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="CPU threads per rank (default cores / ranks per node)")


def _logging_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "logging")
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="messages rank 0 prints on stderr (default INFO; the other ranks print only warnings "
                        "and errors)")
    g.add_argument("--log-dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="also write one log file per rank here (rank-00000.log, ...), with every message")


def _config_file_options(p: argparse.ArgumentParser) -> None:
    g = _group(p, "configuration file")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="TOML (or YAML) file with any of these options (keys as the long option names with "
                        "underscores, plus input/output, model_kwargs, eval_kwargs tables); flags override it")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as TOML and exit without running")


def _auto_on_off(g, flag: str, help: str) -> None:  # noqa: A002 - argparse's word
    """An overlap option of a rank's work: auto (on for ranks with a GPU), on or off."""
    g.add_argument(flag, choices=("auto", "on", "off"), default=argparse.SUPPRESS, help=help)


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
    from ..config import from_mapping, load_file

    mapping = load_file(args.config) if getattr(args, "config", None) else {}
    if getattr(args, "config", None):
        mapping["config_file"] = args.config
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
    from .. import comm as mpi

    comm = mpi.world()
    rank = comm.Get_rank()
    setup_logging(rank, getattr(args, "log_level", "INFO"), getattr(args, "log_dir", None))
    try:
        mpi.check_world(comm)
        cfg = make_config()
        if runner is None:
            from ..runner.driver import run

            result = run(cfg, comm)
        else:
            result = runner(cfg, comm)
    except Interrupted as exc:
        if rank == 0:
            sys.stderr.write(f"mpicellpose: interrupted: {exc}\n")
        return _settle(comm, EXIT_INTERRUPTED)
    except (MpiCellposeError, ValueError, FileNotFoundError, PermissionError) as exc:
        if rank == 0:
            sys.stderr.write(f"mpicellpose: error: {cli_message(exc, args)}\n")
        return _settle(comm, exit_code(exc))
    if rank == 0 and result is not None and hasattr(result, "n_objects"):
        done = "already in" if (getattr(result, "stats", None) or {}).get("already_complete") else "written to"
        sys.stdout.write(f"{result.n_objects} objects {done} {result.output} (table: {result.table_path})\n")
        for warning in (getattr(result, "stats", None) or {}).get("warnings") or ():
            sys.stdout.write(f"warning: {warning}\n")
    return 0


def exit_code(exc) -> int:
    """A bad option value is a usage error (2), like an unknown flag; anything else an error (1)."""
    return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_ERROR


def _settle(comm, code: int) -> int:
    """Let rank 0's message out before any rank exits non-zero.

    Under ``python -m mpi4py`` the first rank to exit with a non-zero code aborts the
    others, so every rank waits here until rank 0 has written and flushed its message.
    Every rank reaches this point, because errors are agreed collectively first.
    """
    from .. import comm as mpi

    sys.stderr.flush()
    try:
        mpi.quiet_barrier(comm)
    except Exception:  # pragma: no cover - MPI already broken
        pass
    return code


def _one_line(exc) -> str:
    return " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())


# configuration keys a message may start with, and the flag that sets each
_FLAGS = {k: "--" + k.replace("_", "-") for k in (
    "blocksize", "overlap", "diameter", "anisotropy", "channel_axis", "iou_depth", "iou_threshold", "voxel_size",
    "threads", "watchdog", "pyramid", "pyramid_method", "zarr_format", "normalize", "stitch", "backend",
    "connectivity", "threshold", "eval_kwargs", "model_kwargs", "level", "channel", "timepoint", "tile_pattern",
    "labels_name", "work_dir", "device", "mask", "dataset", "batch_size", "precision", "flow_halo", "flow_slab",
    "read_ahead",
    "masks_during_flows", "pipeline", "schedule")}
_RELATED = {"stitch": ("overlap",)}  # flags worth showing with the subject's ("stitch='iou' needs an overlap")
_SUBJECT = re.compile(r"^(unknown )?(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")(?=[ =])")
_LIBRARY_SPELLINGS = ((re.compile(r"\boverwrite=True\b"), "--overwrite"),
                      (re.compile(r"\brestart=True\b"), "--restart"),
                      (re.compile(r"\bpass channel_axis\b"), "pass --channel-axis"))


def _typed(args, key) -> str | None:
    """How the user gave option ``key`` on the command line, e.g. ``--blocksize 8,8``."""
    if args is None or key not in vars(args):
        return None
    value = vars(args)[key]
    if value is True:
        return _FLAGS[key]
    if isinstance(value, (dict, list)):
        value = "'" + json.dumps(value) + "'"
    elif isinstance(value, float) and value.is_integer():
        value = int(value)  # argparse made -3 into -3.0
    return f"{_FLAGS[key]} {value}"


def cli_message(exc, args=None) -> str:
    """The one-line message for the command line: the library's wording, with the flag to use
    in place of a keyword spelling (``--blocksize must be ...``, ``--overwrite``) and what the
    user typed (``(you typed --iou-threshold 2)``), or where the value came from (``--config``)."""
    msg = _one_line(exc)
    for pattern, flag in _LIBRARY_SPELLINGS:
        msg = pattern.sub(flag, msg)
    m = _SUBJECT.match(msg)
    if m is None:
        return msg
    key = m.group(2)
    if "_" not in key and msg[m.end(2)] == " ":  # the flag is the word itself: name it in place
        msg = msg[:m.start(2)] + _FLAGS[key] + msg[m.end(2):]
    typed = [t for t in (_typed(args, k) for k in (key,) + _RELATED.get(key, ())) if t]
    if typed:
        return f"{msg} (you typed {' '.join(typed)})"
    config = getattr(args, "config", None) if args is not None else None
    if config:
        return f"{msg} (from the configuration file {config}; on the command line: {_FLAGS[key]})"
    return msg if "_" not in key else f"{msg} (set with {_FLAGS[key]})"
