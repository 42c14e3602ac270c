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
from ..options import add_options, cli_only, flags

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 3


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
    add_options(p, _group, where="io")  # --dataset
    g = _group(p, "output")
    g.add_argument("output", nargs="?", default=argparse.SUPPRESS, metavar="OUTPUT", help=output_help)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that runs the pipeline, grouped under the headings
    a user looks for: input, output, blocks, model, stitching, run control, performance,
    logging and configuration file.  A subcommand may put its own arguments (INPUT, OUTPUT,
    --dataset) into the "input" and "output" groups first (:func:`_group`).

    The options are declared once, in :data:`mpicellpose.options.OPTIONS`.  Defaults are not
    set here (``argparse.SUPPRESS``): only options given on the command line reach the
    configuration, over a ``--config`` file, over RunConfig's defaults.
    """
    add_options(p, _group)


_NOT_CONFIG = {"func", "command"} | cli_only()


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
    from ..runner.runlog import RankFormatter  # noqa: PLC0415 - light (logging only)

    fmt = RankFormatter(rank)
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
        if result.n_objects:
            from ..volumes.ngff_io import napari_hint
            sys.stdout.write(napari_hint(result.output) + "\n")
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
_FLAGS = flags()
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
