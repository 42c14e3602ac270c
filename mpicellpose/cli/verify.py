"""``mpicellpose verify OUTPUT``: check that a finished output has every chunk it should."""
from __future__ import annotations

import json
import sys

from ..runner import outputs


def register(sub) -> None:
    """Add the ``verify`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "verify", help="check that a finished OUTPUT is complete: marked finished, every label chunk on disk",
        description="Check a segmentation OUTPUT written by 'mpicellpose segment': that its run finished "
                    "(the completion marker), that its object table is there, and that every chunk which must "
                    "hold labels (each block holding a piece of an object in the table) is on disk: a missing "
                    "chunk reads as zeros, silently. Only reads; exit status 0 when all is well, 1 otherwise.",
    )
    p.add_argument("output", help="the label array (or NGFF label image) that 'mpicellpose segment' wrote")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    """Entry point of ``mpicellpose verify``; returns the exit code."""
    try:
        report = outputs.verify_output(args.output)
    except Exception as exc:  # noqa: BLE001 - an unreadable output is a finding, not a crash
        print(f"mpicellpose verify: cannot read {args.output!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    marker = report.pop("marker")
    if args.json:
        print(json.dumps(report | {"missing": [list(i) for i in report["missing"]]}, indent=1))
    else:
        head = f"{report['array']}: "
        if report["complete"]:
            head += (f"complete ({marker.get('n_objects')} objects, finished {marker.get('finished')}); "
                     f"{report['expected'] - len(report['missing'])} of {report['expected']} chunk(s) with labels "
                     f"on disk")
        else:
            head += "NOT complete"
        print(head)
        for problem in report["problems"]:
            print(f"problem: {problem}")
        if not report["problems"]:
            print("ok")
    return 1 if report["problems"] else 0
