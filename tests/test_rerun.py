"""Re-running a finished command (issue 17, point 8): recognised, said, exit 0 in seconds,
the same result, the output untouched; also under mpiexec -n 2."""
import logging
import os
import time

import numpy as np
import pytest
import zarr

import cases
from conftest import run_mpi
from mpicellpose import cli
from mpicellpose.config import RunConfig
from mpicellpose.runner.driver import run
from mpicellpose.volumes.storage import numpy_array_to_zarr

T = ["--backend", "threshold", "--threshold", "100"]


@pytest.fixture
def data(tmp_path):
    numpy_array_to_zarr(tmp_path / "in.zarr", cases.blobs((24, 30, 28), 41), (8, 10, 10))
    return tmp_path


def _cfg(d, **kw):
    return RunConfig(input=str(d / "in.zarr"), output=str(d / "out.zarr"), blocksize=10, backend="threshold",
                     backend_kwargs={"threshold": 100}, **kw)


def _snapshot(d):
    """Every file beside and inside the output, with its modification time and size."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, d)] = (st.st_mtime_ns, st.st_size)
    return out


def test_finished_run_is_recognised_and_returns_the_same_result(data, caplog):
    first = run(_cfg(data))
    before = _snapshot(data)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mpicellpose"):
        t = time.perf_counter()
        again = run(_cfg(data))
        wall = time.perf_counter() - t
    assert wall < 5, wall
    assert "already complete: %d objects in %s" % (first.n_objects, first.output) in caplog.text
    assert "nothing to do" in caplog.text and "segment:" not in caplog.text
    assert again.n_objects == first.n_objects and again.output == first.output
    assert again.table_path == first.table_path and again.stats["already_complete"] is True
    assert np.array_equal(again.labels[...], first.labels[...])
    assert np.array_equal(np.asarray(again.boxes.array), np.asarray(first.boxes.array))
    assert list(again.boxes) == list(first.boxes)
    assert _snapshot(data) == before  # nothing written, nothing touched (the lock came and went)


def test_restart_or_a_missing_table_computes_again(data, caplog):
    first = run(_cfg(data))
    again = run(_cfg(data, restart=True))
    assert "already_complete" not in again.stats and again.n_objects == first.n_objects
    os.remove(first.table_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mpicellpose"):
        third = run(_cfg(data))
    assert "already complete" not in caplog.text and os.path.exists(first.table_path)
    assert third.n_objects == first.n_objects


def test_another_configuration_is_not_taken_for_finished(data, capsys):
    assert cli.main(["segment", str(data / "in.zarr"), str(data / "out.zarr"), "--blocksize", "10"] + T) == 0
    capsys.readouterr()
    rc = cli.main(["segment", str(data / "in.zarr"), str(data / "out.zarr"), "--blocksize", "12"] + T)
    err = capsys.readouterr().err
    assert rc == 1 and "another configuration" in err and "--overwrite" in err


def test_cli_says_already_complete(data, capsys):
    args = ["segment", str(data / "in.zarr"), str(data / "out.zarr"), "--blocksize", "10"] + T
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    n = first.split()[0]
    assert out.startswith(f"{n} objects already in ") and "already complete" in err


@pytest.mark.mpi
def test_rerun_under_mpiexec_2(data):
    args = ["-m", "mpicellpose", "segment", data / "in.zarr", data / "out.zarr", "--blocksize", "10"] + T
    run_mpi(2, args, timeout=120)
    ref = zarr.open(str(data / "out.zarr"), mode="r")[...]
    before = _snapshot(data)
    t = time.perf_counter()
    proc = run_mpi(2, args, timeout=120)
    wall = time.perf_counter() - t
    assert proc.stderr.count("already complete:") == 1, proc.stderr
    assert proc.stdout.count("objects already in") == 1, proc.stdout
    assert _snapshot(data) == before
    assert np.array_equal(zarr.open(str(data / "out.zarr"), mode="r")[...], ref)
    assert wall < 20, wall
    # another rank count: the labels do not depend on it, so it is the same finished run
    proc = run_mpi(3, args, timeout=120)
    assert "already complete:" in proc.stderr
