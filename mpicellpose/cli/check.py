"""``mpicellpose check``: is cutting the volume into blocks changing my result?  Whole-region
Cellpose against the block-wise run ``segment`` would make, on a sample region where blocks meet
(the measurement is :mod:`mpicellpose.tools.check`'s; here: the options, the table, the exit code).
``segment --check`` runs it first (:func:`gate`)."""
from __future__ import annotations

import argparse
import json
import sys

from ..options import CHECK_OPTIONS_BY_NAME
from .common import _group, add_input_output, add_run_arguments, config_from_args, run_and_report

#: the exit code of a check that ran and found the seams failing the thresholds
EXIT_SEAMS_FAIL = 4

#: the arguments of check that are not a run's configuration
_OWN = ("region", "no_fixes", "both_pipelines", "report", "no_png", "keep_check", "json", "check", "min_f1",
        "max_seam_errors")

EPILOG = """\
examples:
  # the settings you are about to run, on the most crowded block corner of the volume
  mpiexec -n 2 mpicellpose check cells.zarr labels.zarr --model cyto3 --diameter 30 --blocksize 256
  # a region of your choice (widened to whole blocks), both pipelines side by side
  mpicellpose check cells.zarr --region 0:256,512:1024,512:1024 --both-pipelines
  # the same check, then the run, which stops when the check fails
  mpiexec -n 8 mpicellpose segment cells.zarr labels.zarr --diameter 30 --check

Exit codes: 0 the seams pass, 4 they fail the thresholds, 1 error, 2 usage.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "check", help="is blocking changing my result? block-wise vs whole-region Cellpose on a sample region",
        description="Segment a sample region where blocks meet twice, with your model and settings: as one "
                    "block (whole-region Cellpose) and block by block exactly as segment would. Report F1 and "
                    "mean IoU, objects split and merged at block faces and away from them, fragments, the "
                    "time of both, a PNG, and, when the seams fail, the next settings that pass and what they "
                    "cost. Takes the options of segment; OUTPUT (optional) is the labels a later segment "
                    "will write: the report goes beside it and that run records it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = _group(p, "seam check", "Block-wise vs whole-region Cellpose on a sample region (mpicellpose check).")
    g.add_argument("--region", metavar="Z0:Z1,Y0:Y1,X0:X1", default=None,
                   help="the region to check, in voxels (widened to whole blocks); default: the 2 x 2 x 2 blocks "
                        "around the most crowded block corner")
    for name in ("min_f1", "max_seam_errors"):
        CHECK_OPTIONS_BY_NAME[name].add_to(g)
    g.add_argument("--both-pipelines", action="store_true",
                   help="the block-wise run under --pipeline flows and --pipeline blocks, side by side")
    g.add_argument("--no-fixes", action="store_true",
                   help="when the seams fail, do not try the settings that could mend them")
    g.add_argument("--report", metavar="PATH.json", default=None,
                   help="the JSON report (default: OUTPUT stem + .check.json, else INPUT's name + .check.json "
                        "here); the PNG goes beside it")
    g.add_argument("--no-png", action="store_true", help="no picture")
    g.add_argument("--keep-check", action="store_true",
                   help="keep the region's copy and every run's labels (in the check's work folder)")
    g.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    add_input_output(p, "the labels a later segment run will write (optional): the report goes beside it")
    add_run_arguments(p)
    p.set_defaults(func=main)


def check_options(args):
    from ..tools.check import CheckOptions

    return CheckOptions(region=getattr(args, "region", None), min_f1=args.min_f1,
                        max_seam_errors=args.max_seam_errors, try_fixes=not getattr(args, "no_fixes", False),
                        both_pipelines=getattr(args, "both_pipelines", False), report=getattr(args, "report", None),
                        png=not getattr(args, "no_png", False), keep=getattr(args, "keep_check", False))


def run_check_command(args, gate: bool = False) -> int:
    """Run the check on every rank; rank 0 prints the table (or JSON).  0 when the seams pass,
    :data:`EXIT_SEAMS_FAIL` when they fail, the run's exit code on an error."""
    from .. import comm as mpi
    from ..tools.check import run_check
    from ..tools.check_report import format_table

    opts = check_options(args)
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _OWN})
    holder = {}

    def runner(cfg, comm):
        holder["report"] = run_check(cfg, comm, opts)

    rc = run_and_report(lambda: config_from_args(ns), ns, runner=runner)
    if rc:
        return rc
    report = holder["report"]
    if mpi.world().Get_rank() == 0:
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps(report, indent=1) + "\n")
        elif report.get("single"):
            sys.stdout.write(f"verdict: {report['verdict']}\n")
        else:
            sys.stdout.write(format_table(report))
        if gate and not report["passed"]:
            sys.stdout.write("mpicellpose: segment not started: the seam check failed (see the verdict; "
                             "leave out --check to run anyway)\n")
        sys.stdout.flush()
    return 0 if report["passed"] else EXIT_SEAMS_FAIL


def main(args) -> int:
    return run_check_command(args)
