"""Mistakes in the command line, as a newcomer makes them: printed once whatever the number of ranks, with
the subcommand's short usage and the nearest flag or choice; exit code 2 for every usage error (an unknown
flag, a bad choice, a bad value), 1 for the others (docs/robustness.md, "Exit codes and errors")."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, mpi_env, run_mpi
from mpicellpose import cli


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv,said", [
    (["segment", "in.zarr", "out.zarr", "--modle", "demo"],
     "unrecognized arguments: --modle demo (--modle: did you mean --model?)"),
    (["segment", "in.zarr", "out.zarr", "--pipeline", "flow"],
     "argument --pipeline: invalid choice: 'flow' (choose from 'flows', 'blocks') (did you mean flows?)"),
    (["segmnt", "in.zarr"], "invalid choice: 'segmnt'"),
    (["plan", "in.zarr", "out.zarr", "--precison", "float32"], "--precison: did you mean --precision?"),
])
def test_a_typo_names_the_nearest_flag_with_the_subcommands_short_usage(argv, said, capsys):
    code, err = _cli(argv, capsys)
    assert code == 2 and said in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: mpicellpose") and "--help" in lines[0], err
    if argv[0] == "segment":
        assert lines[0] == "usage: mpicellpose segment [options] INPUT OUTPUT (all options: mpicellpose segment --help)"
    if argv[0] == "segmnt":
        assert "(did you mean segment?)" in err


def test_bad_values_are_usage_errors(tmp_path, capsys):
    import numpy as np

    from mpicellpose.volumes.storage import numpy_array_to_zarr

    numpy_array_to_zarr(tmp_path / "in.zarr", np.zeros((16, 16), np.uint16), (16, 16))
    for bad, said in ((["--blocksize", "0"], "--blocksize must be >= 1"),
                      (["--diameter", "-5"], "--diameter must be a positive number")):
        rc = cli.main(["segment", str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"), "--backend", "threshold",
                       "--threshold", "1"] + bad)
        err = capsys.readouterr().err
        assert rc == 2 and said in err, err
    # a missing input is not a usage error
    rc = cli.main(["segment", str(tmp_path / "nope.zarr"), str(tmp_path / "o.zarr"), "--backend", "threshold",
                   "--threshold", "1"])
    assert rc == 1 and "nope.zarr" in capsys.readouterr().err


@pytest.mark.mpi
def test_a_typo_under_mpiexec_is_printed_once(tmp_path):
    proc = run_mpi(3, ["-m", "mpicellpose", "segment", tmp_path / "in.zarr", tmp_path / "o.zarr", "--blocksiz",
                       "32", "--pipeline", "flow"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("invalid choice: 'flow'") == 1 and proc.stderr.count("usage:") == 1, proc.stderr
    proc = run_mpi(3, ["-m", "mpicellpose", "segment", tmp_path / "in.zarr", tmp_path / "o.zarr", "--modle", "x"],
                   check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("did you mean --model?") == 1, proc.stderr


def test_python_m_without_a_launcher_still_prints(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpicellpose", "plan", "x.zarr", "y.zarr", "--modle", "demo"],
                          capture_output=True, text=True, timeout=60, env=mpi_env(), cwd=ROOT)
    assert proc.returncode == 2 and "did you mean --model?" in proc.stderr, proc.stderr


@pytest.mark.mpi
def test_more_ranks_than_blocks_says_how_many_idle(tmp_path):
    import numpy as np

    from mpicellpose.volumes.storage import numpy_array_to_zarr

    img = np.zeros((16, 32), np.uint16)
    img[4:8, 4:8] = 9
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (16, 16))
    proc = run_mpi(3, ["-m", "mpicellpose", "segment", tmp_path / "in.zarr", tmp_path / "o.zarr", "--blocksize",
                       "16", "--backend", "threshold", "--threshold", "1"], timeout=120)
    assert proc.stderr.count("3 ranks for 2 block(s) to segment: 1 rank(s) will idle") == 1, proc.stderr
