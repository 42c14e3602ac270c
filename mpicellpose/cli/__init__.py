"""Command line interface: ``mpicellpose <subcommand> ...``.

Every subcommand lives in its own module of this package, which exposes
``register(subparsers)``: it adds its parser and sets ``func`` (a callable taking the
parsed namespace and returning an exit code).  This file only collects them; the
helpers they share are in :mod:`mpicellpose.cli.common`.  Subcommand modules are
imported when the parser is built, so importing this package stays cheap.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module name for each subcommand group, in --help order
_SUBCOMMAND_MODULES = (
    "mpicellpose.cli.segment",
    "mpicellpose.cli.plan",
    "mpicellpose.cli.demo",
    "mpicellpose.cli.preview",
    "mpicellpose.cli.convert",
    "mpicellpose.cli.info",
    "mpicellpose.cli.batch",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="mpicellpose",
        description="Distributed Cellpose segmentation of large 2D/3D volumes with MPI.",
    )
    parser.add_argument("--version", action="version", version=f"mpicellpose {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("mpicellpose: interrupted\n")
        return 130
