"""``mpicellpose batch-script``: write a SLURM or LSF batch script for a run (the scripts
themselves are made by :mod:`mpicellpose.tools.batch`), and ``python -m mpicellpose.tools.batch
--write-templates DIR``, which rewrites the shipped templates (:func:`templates_main`)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..tools import batch
from ..tools.batch import (SCHEDULERS, SUBMIT, BatchOptions, BatchScriptError, SegmentSpec, parse_segment_args,
                           render, write_templates)


def _check_with_segment_parser(spec: SegmentSpec) -> None:
    """Let the real ``segment`` parser reject typos, when it is available."""
    if not spec.argv:
        return
    try:
        from . import build_parser  # noqa: PLC0415

        parser = build_parser()
    except Exception as exc:  # segment not importable here: the job will tell
        batch.logger.debug("segment parser unavailable, arguments not checked: %s", exc)
        return
    try:
        parser.parse_args(["segment", *spec.argv])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise BatchScriptError("the arguments after '--' are not valid for "
                                   "'mpicellpose segment' (see the message above)") from None


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``batch-script`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "batch-script",
        help="write a SLURM/LSF batch script (one rank per GPU, walltime-aware, resumable)",
        description="Write a batch script that runs 'mpicellpose segment' on N GPUs, one MPI "
                    "rank per GPU, with the scheduler's launcher; it stops cleanly before the "
                    "walltime and tells how to resume.  Example: mpicellpose batch-script "
                    "--scheduler slurm --gpus 128 --gpus-per-node 4 --walltime 12:00:00 "
                    "--output seg.sbatch -- segment in.zarr labels.zarr --diameter 30",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scheduler", choices=SCHEDULERS, required=True,
                        help="slurm (srun), lsf (mpirun) or lsf-jsrun (IBM Summit-style jsrun)")
    parser.add_argument("--gpus", type=int, default=8, help="total GPUs = MPI ranks")
    parser.add_argument("--gpus-per-node", type=int, default=4,
                        help="GPUs per node = ranks per node")
    parser.add_argument("--walltime", default="12:00:00",
                        help="HH:MM:SS, HH:MM, D-HH:MM:SS or minutes")
    parser.add_argument("--signal-minutes", type=int, default=10,
                        help="send the stop signal this many minutes before the walltime")
    parser.add_argument("--job-name", default="mpicellpose", help="job name (also log name)")
    parser.add_argument("--queue", default=None, help="SLURM partition / LSF queue")
    parser.add_argument("--account", default=None, help="SLURM account / LSF project (-P)")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help="CPU cores per rank (SLURM --cpus-per-task, jsrun -c)")
    parser.add_argument("--env-setup", action="append", default=[], metavar="LINE",
                        help="shell line(s) that set up the environment, e.g. "
                             "'module load cuda' (repeat, or separate lines with newlines)")
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="write the script here (executable) instead of stdout")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    parser.add_argument("segment_args", nargs=argparse.REMAINDER, metavar="-- segment ...",
                        help="the segment command: -- segment INPUT OUTPUT [options]; "
                             "omitted: placeholders to edit")
    parser.set_defaults(func=main)
    return parser


def options_from_args(args: argparse.Namespace) -> BatchOptions:
    """Build and validate :class:`BatchOptions` from parsed CLI arguments."""
    env_lines: List[str] = []
    for item in args.env_setup or ():
        env_lines.extend(line.rstrip() for line in str(item).splitlines() if line.strip())
    segment = parse_segment_args(args.segment_args or ())
    script_path = os.path.abspath(args.output) if args.output not in (None, "-") else ""
    opts = BatchOptions(scheduler=args.scheduler, gpus=args.gpus,
                        gpus_per_node=args.gpus_per_node, walltime=args.walltime,
                        signal_minutes=args.signal_minutes, job_name=args.job_name,
                        queue=args.queue, account=args.account,
                        cpus_per_task=args.cpus_per_task, env_setup=tuple(env_lines),
                        segment=segment, script_path=script_path)
    return opts.validate()


def main(args: argparse.Namespace) -> int:
    """Run ``mpicellpose batch-script``; returns the exit code."""
    try:
        opts = options_from_args(args)
        _check_with_segment_parser(opts.segment)
        text = render(opts)
    except BatchScriptError as exc:
        sys.stderr.write(f"mpicellpose batch-script: error: {exc}\n")
        return 2
    if opts.remainder:
        sys.stderr.write(f"mpicellpose batch-script: note: {opts.gpus} GPUs on {opts.nodes} "
                         f"nodes of {opts.gpus_per_node}: the last node runs "
                         f"{opts.remainder} rank(s)\n")
    if not opts.script_path:
        sys.stdout.write(text)
        return 0
    path = Path(opts.script_path)
    if path.exists() and not args.force:
        sys.stderr.write(f"mpicellpose batch-script: error: {path} exists (use --force)\n")
        return 2
    path.write_text(text)
    path.chmod(0o755)
    submit = SUBMIT[opts.scheduler].format(script=shlex.quote(args.output))
    sys.stdout.write(f"wrote {args.output}\nsubmit with:  {submit}\n"
                     f"resume after a stop: submit it again (same command)\n")
    return 0


def templates_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mpicellpose.tools.batch --write-templates DIR`` (maintainers)."""
    parser = argparse.ArgumentParser(prog="python -m mpicellpose.tools.batch")
    parser.add_argument("--write-templates", metavar="DIR", required=True,
                        help="rewrite the shipped templates under DIR (the repo's scripts/)")
    ns = parser.parse_args(argv)
    for path in write_templates(ns.write_templates):
        sys.stdout.write(f"wrote {path}\n")
    return 0
