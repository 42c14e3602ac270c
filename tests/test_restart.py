"""Restart after SIGKILL in every phase, walltime signals, and faults that never hang (issue 5)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import cases
from conftest import mpi_env, mpiexec_path, run_mpi
from mpicellpose.volumes.storage import numpy_array_to_zarr

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    img = cases.blobs((40, 48, 44), 21)
    numpy_array_to_zarr(root / "in.zarr", img, (12, 12, 12))
    ref_out = root / "ref" / "labels.zarr"
    proc = run_mpi(2, ["-m", "mpicellpose", "segment", root / "in.zarr", ref_out, "--backend", "threshold",
                       "--threshold", "100", "--blocksize", "12"])
    assert proc.returncode == 0
    return root, zarr.open(str(ref_out), mode="r")[...], (root / "ref" / "labels.objects.csv").read_text()


def segment_cmd(root, out):
    return ["-m", "mpicellpose", "segment", root / "in.zarr", out, "--backend", "threshold", "--threshold", "100",
            "--blocksize", "12"]


def check_same(out, ref, table):
    assert np.array_equal(zarr.open(str(out), mode="r")[...], ref)
    assert (out.parent / "labels.objects.csv").read_text() == table
    meta = zarr.open(str(out), mode="r").attrs["mpicellpose"]
    assert meta["complete"] is True


@pytest.mark.parametrize("fault,rerun_ranks", [
    ("segment:1:kill:3", 3),
    ("segment:2:kill:1", 2),   # rerun with a different number of ranks
    ("stitch:2:kill", 3),
    ("relabel:1:kill:2", 4),
])
def test_sigkill_one_rank_then_resume(volume, tmp_path, fault, rerun_ranks):
    root, ref, table = volume
    out = tmp_path / "labels.zarr"
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = fault
    proc = run_mpi(3, segment_cmd(root, out), env=env, check=False, timeout=120)
    assert proc.returncode != 0, proc.stderr
    if fault.startswith("relabel"):
        meta = zarr.open(str(out), mode="r").attrs["mpicellpose"]
        assert meta["complete"] is False  # readers can tell the output is unfinished
    assert (tmp_path / "labels.mpicellpose-work" / "run.json").exists()
    proc = run_mpi(rerun_ranks, segment_cmd(root, out), timeout=120)
    reused = int(proc.stderr.split(" reused from an earlier run")[0].rsplit(" ", 1)[-1])
    if fault.startswith("segment"):
        assert 0 < reused < 64
    else:
        assert reused == 64
    check_same(out, ref, table)


def test_walltime_signal_stops_cleanly_and_resumes(volume, tmp_path):
    root, ref, table = volume
    out = tmp_path / "labels.zarr"
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = "segment:0:sigusr1:2"
    t = time.time()
    proc = run_mpi(3, segment_cmd(root, out), env=env, check=False, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "re-run the same command to resume" in proc.stderr
    assert proc.stderr.count("mpicellpose: interrupted") == 1
    assert time.time() - t < 60
    proc = run_mpi(2, segment_cmd(root, out), timeout=120)
    assert " reused from an earlier run" in proc.stderr
    check_same(out, ref, table)


def test_external_sigterm_to_ranks(volume, tmp_path):
    """SIGTERM sent by a scheduler to every rank: each finishes its block and the job exits 3."""
    root, ref, table = volume
    out = tmp_path / "labels.zarr"
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import sys, time, runpy\n"
        "import mpicellpose.runner.phases.segment as d\n"
        "orig = d.segment_image\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return orig(*a, **k)\n"
        "d.segment_image = slow\n"
        "sys.argv = ['mpicellpose'] + sys.argv[1:]\n"
        "runpy.run_module('mpicellpose', run_name='__main__')\n")
    cmd = [mpiexec_path(), "-n", "2", sys.executable, slow] + [str(a) for a in segment_cmd(root, out)[2:]]
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=mpi_env(), start_new_session=True)
    time.sleep(6)
    os.killpg(p.pid, signal.SIGTERM)  # the whole job step, as srun/LSF do at walltime
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("ranks did not stop after SIGTERM")
    assert p.returncode == 3, err
    assert "re-run the same command to resume" in err
    proc = run_mpi(2, segment_cmd(root, out), timeout=120)
    check_same(out, ref, table)


@pytest.mark.parametrize("fault,text", [("segment:1:enospc:1", "No space left on device"),
                                         ("stitch:1:raise", "injected fault in stitch"),
                                         ("relabel:0:raise:1", "injected fault in relabel")])
def test_faults_stop_every_rank_with_the_cause(volume, tmp_path, fault, text):
    root, _, _ = volume
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = fault
    t = time.time()
    proc = run_mpi(3, segment_cmd(root, tmp_path / "labels.zarr"), env=env, check=False, timeout=90)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.startswith("mpicellpose: error:")]
    assert len(lines) == 1, proc.stderr  # reported once
    rank = fault.split(":")[1]
    assert text in lines[0] and f"rank {rank}" in lines[0]
    if fault.startswith("segment"):
        assert "block (" in lines[0]
    assert time.time() - t < 60


def test_unreadable_input_chunk_stops_every_rank_naming_the_block(tmp_path):
    img = cases.blobs((24, 24, 24), 22)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (12, 12, 12))
    chunk = next(p for p in (tmp_path / "in.zarr").rglob("*") if p.is_file() and p.name.replace(".", "").isdigit()
                 and p.name.count(".") == 2 and p.name != ".zarray")
    chunk.write_bytes(b"this is not a compressed chunk")
    t = time.time()
    proc = run_mpi(3, ["-m", "mpicellpose", "segment", tmp_path / "in.zarr", tmp_path / "o.zarr", "--backend",
                       "threshold", "--threshold", "100", "--blocksize", "12"], check=False, timeout=90)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("mpicellpose: error:")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    idx = tuple(int(v) for v in chunk.name.split("."))
    assert f"block {idx}" in lines[0] and "rank" in lines[0]
    assert time.time() - t < 60
