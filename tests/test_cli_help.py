"""`segment --help` and `plan --help`: options grouped as a user looks for them, each with help
text, and an epilog whose examples parse."""
import argparse
import shlex

import pytest

from mpicellpose import cli


def _subparser(name):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _sections(text):
    """{heading: [first word of each argument line]} from a formatted help text."""
    out, heading = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            heading = line.rstrip()[:-1]
            out[heading] = []
        elif heading is not None and line.startswith("  ") and not line.startswith("   ") and line.strip():
            word = line.split()[0].rstrip(",")
            if word.startswith("-") or word.isupper():
                out[heading].append(word)
    return out


def _heading_of(sections, option):
    found = [h for h, opts in sections.items() if option in opts]
    assert len(found) == 1, (option, found)
    return found[0]


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")


@pytest.mark.parametrize("command", ["segment", "plan"])
def test_options_sit_under_the_heading_a_user_looks_for(wide, command):
    sections = _sections(_subparser(command).format_help())
    expect = {
        "input": ["INPUT", "--dataset", "--level", "--channel", "--timepoint", "--channel-axis",
                  "--tile-pattern", "--voxel-size"],
        "output": ["OUTPUT", "--labels-name", "--pyramid", "--pyramid-method", "--zarr-format", "--overwrite"],
        "blocks": ["--blocksize", "--overlap", "--mask"],
        "model": ["--backend", "--model", "--diameter", "--anisotropy", "--normalize", "--eval-kwargs",
                  "--model-kwargs", "--threshold"],
        "stitching": ["--stitch", "--connectivity", "--iou-threshold", "--iou-depth"],
        "run control": ["--work-dir", "--keep-work", "--restart"],
        "performance": ["--device", "--threads"],
        "logging": ["--log-level", "--log-dir"],
        "configuration file": ["--config", "--print-config"],
    }
    for prefix, options in expect.items():
        for option in options:
            assert _heading_of(sections, option).startswith(prefix), (option, sections)
    assert "OME-Zarr output" not in sections
    assert "positional arguments" not in sections  # INPUT and OUTPUT are in their own groups


@pytest.mark.parametrize("command", ["segment", "plan"])
def test_every_option_has_help_text(command):
    p = _subparser(command)
    for action in p._actions:
        assert action.help and action.help is not argparse.SUPPRESS, action.option_strings or action.dest
        assert len(action.help) > 10, action.option_strings


def test_input_help_names_every_format(wide):
    text = " ".join(_subparser("segment").format_help().split())
    for word in ("zarr", "OME-Zarr", "HDF5", "TIFF", "OME-TIFF", "tiles"):
        assert word in text, word
    assert "input zarr array (or group" not in text


def test_epilog_examples_parse(wide):
    p = _subparser("segment")
    assert "examples:" in p.epilog
    joined = p.epilog.replace("\\\n", " ")
    commands = [line.split("mpicellpose segment", 1)[1] for line in joined.splitlines()
                if "mpicellpose segment" in line and not line.strip().startswith("#")]
    assert len(commands) >= 3
    for args in commands:
        ns = p.parse_args(shlex.split(args))
        assert ns.input and ns.func
    help_text = p.format_help()
    assert "examples:" in help_text and "mpirun -n 8 python -m mpi4py -m mpicellpose segment" in help_text
    assert "Exit codes" in help_text
