"""``mpicellpose info``: versions, MPI and GPU binding, for bug reports (the report itself
is :mod:`mpicellpose.tools.info`).

Imports nothing from the rest of the command line, so that ``python -m mpicellpose.tools.info``
(:func:`standalone_main`) works even when another part of the installation is broken.
"""
from __future__ import annotations

import argparse
import json
import sys

from .. import comm as mpi
from ..tools.info import collect_info, format_report


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``info`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "info", help="print versions, MPI and GPU binding (attach to bug reports)",
        description="Print versions of mpicellpose and its stack, the MPI library, and for "
                    "every rank the host, the GPUs it sees and the device it would use. "
                    "Run it under the same launcher as the job, e.g. "
                    "'mpirun -n 8 python -m mpi4py -m mpicellpose info'.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--device", default=None,
                        help="show the binding for this --device (auto, cpu, cuda, cuda:K, mps)")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``mpicellpose info``; rank 0 prints, every rank returns 0."""
    # mpi4py missing: report this process alone
    comm = mpi.world() if mpi.mpi_import_error() is None else None
    info = collect_info(comm, getattr(args, "device", None))
    if info is None:
        return 0
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(format_report(info) + "\n")
    sys.stdout.flush()
    return 0


def standalone_main(argv=None) -> int:
    """``python -m mpicellpose.tools.info [--json] [--device D]``.

    The same report without the rest of the CLI, so that it works even when
    another part of the installation is broken.
    """
    parser = argparse.ArgumentParser(prog="python -m mpicellpose.tools.info")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["info", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
