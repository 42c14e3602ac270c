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
    "mpicellpose.cli.check",
    "mpicellpose.cli.demo",
    "mpicellpose.cli.preview",
    "mpicellpose.cli.convert",
    "mpicellpose.cli.info",
    "mpicellpose.cli.verify",
    "mpicellpose.cli.batch",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="mpicellpose",
        description="Distributed Cellpose segmentation of large 2D/3D volumes with MPI.",
    )
    parser.add_argument("--version", action="version", version=f"mpicellpose {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


#: environment variables that launchers set to the process's rank in the job (MPI is not started yet
#: when the command line is read, so this is how only one rank prints a mistake in it)
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "PALS_RANKID",
              "SLURM_PROCID")


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched by one)."""
    import os

    for var in _RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with a launcher's manners: a mistake in the command is printed once (by rank 0 of the
    job, every rank exits 2), with a short usage, the nearest flag or choice, and where --help is."""

    def error(self, message):
        if launch_rank() != 0:
            sys.exit(2)
        hint = _nearest(self, message)
        sys.stderr.write(f"usage: {self.prog} [options]{' INPUT OUTPUT' if _takes_paths(self) else ''} "
                         f"(all options: {self.prog} --help)\n{self.prog}: error: {message}"
                         + (f" ({hint})" if hint else "") + "\n")
        sys.exit(2)


def _takes_paths(parser) -> bool:
    return any(a.dest in ("input", "output") and not a.option_strings for a in parser._actions)


def _nearest(parser, message: str) -> str:
    """'did you mean ...' for the unknown flags or the invalid choice that ``message`` names."""
    import difflib
    import re

    hints = []
    m = re.match(r"argument (\S+): invalid choice: '([^']*)'", message)
    if m:
        action = next((a for a in parser._actions if m.group(1) in a.option_strings or m.group(1) in (a.dest, a.metavar)), None)
        close = difflib.get_close_matches(m.group(2), [str(c) for c in (getattr(action, "choices", None) or ())],
                                          n=2, cutoff=0.5)
        if close:
            hints.append(f"did you mean {' or '.join(close)}?")
    if message.startswith("unrecognized arguments:"):
        known = [s for a in parser._actions for s in a.option_strings]
        for word in message.split(":", 1)[1].split():
            flag = word.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) if flag.startswith("-") else []
            if close:
                hints.append(f"{flag}: did you mean {' or '.join(close)}?")
    return "; ".join(hints)


def _subparser(parser, argv):
    """The subcommand's parser named in ``argv`` (the top parser when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    return action.choices[word]
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, which knows its flags
        _subparser(parser, argv).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("mpicellpose: interrupted\n")
        return 130
