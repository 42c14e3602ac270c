"""No hang, ever (issue 16): ranks with nothing to segment, a stuck rank, signals while a
rank is blocked inside MPI, and a launcher that dies.  Every run here has a hard timeout:
a hang fails the test instead of stalling CI."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import cases
from conftest import mpi_env, mpiexec_path, run_mpi
from mpicellpose.volumes.storage import numpy_array_to_zarr

pytestmark = pytest.mark.mpi


def seg(inp, out, *extra):
    return ["-m", "mpicellpose", "segment", inp, out, *extra]


def labels_of(out):
    return zarr.open(str(out), mode="r")[...]


# ---------------------------------------------------------------- more ranks than blocks
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("nohang")
    img = cases.blobs((30, 40, 44), 5)
    numpy_array_to_zarr(root / "in.zarr", img, (16, 16, 16))
    from scipy import ndimage

    numpy_array_to_zarr(root / "lab.zarr", ndimage.label(img > 100)[0].astype(np.uint32), (16, 16, 16))
    mask = np.zeros((3, 4, 4), bool)
    mask[0, 0, 0] = True  # at 16-voxel blocks, only block (0, 0, 0) has foreground
    numpy_array_to_zarr(root / "mask.zarr", mask, (3, 4, 4))
    return root


THRESH = ["--backend", "threshold", "--threshold", "100"]


@pytest.mark.parametrize("ranks,extra", [
    (2, ["--blocksize", "64"]),                      # 2 ranks, 1 block
    (4, ["--blocksize", "30,40,16"]),                # 4 ranks, 3 blocks
    (3, ["--blocksize", "16", "--mask", "MASK"]),    # a mask that leaves 1 block for 3 ranks
])
def test_threshold_more_ranks_than_blocks(small, tmp_path, ranks, extra):
    extra = [str(small / "mask.zarr") if e == "MASK" else e for e in extra]
    ref = tmp_path / "one" / "labels.zarr"
    run_mpi(1, seg(small / "in.zarr", ref, *THRESH, *extra), timeout=120)
    out = tmp_path / "many" / "labels.zarr"
    t = time.perf_counter()
    run_mpi(ranks, seg(small / "in.zarr", out, *THRESH, *extra), timeout=120)
    assert time.perf_counter() - t < 100
    assert np.array_equal(labels_of(out), labels_of(ref))
    assert (out.parent / "labels.objects.csv").read_text() == (ref.parent / "labels.objects.csv").read_text()


def test_labels_backend_4_ranks_3_blocks(small, tmp_path):
    out1, out4 = tmp_path / "a" / "l.zarr", tmp_path / "b" / "l.zarr"
    args = ["--backend", "labels", "--blocksize", "30,40,16"]
    run_mpi(1, seg(small / "lab.zarr", out1, *args), timeout=120)
    run_mpi(4, seg(small / "lab.zarr", out4, *args), timeout=120)
    assert np.array_equal(labels_of(out1), labels_of(out4))


CP = ["--model", "demo", "--threads", "1", "--device", "cpu"]


@pytest.mark.cellpose
@pytest.mark.slow
def test_cellpose_2_ranks_1_block(nuclei2d, tmp_path):
    """The reported deadlock: one block, two ranks (the idle rank skipped the device binding)."""
    one, two = tmp_path / "one" / "l.zarr", tmp_path / "two" / "l.zarr"
    run_mpi(1, seg(nuclei2d / "in.zarr", one, *CP), timeout=240)
    run_mpi(2, seg(nuclei2d / "in.zarr", two, *CP), timeout=240)
    assert labels_of(one).max() > 5
    assert np.array_equal(labels_of(one), labels_of(two))


@pytest.mark.cellpose
@pytest.mark.slow
def test_cellpose_resume_with_one_block_left_on_3_ranks(nuclei2d, tmp_path):
    """A walltime stop leaves fewer blocks than ranks: the resume must not hang."""
    args = [*CP, "--blocksize", "48", "--overlap", "8"]
    ref = tmp_path / "ref" / "l.zarr"
    run_mpi(1, seg(nuclei2d / "in.zarr", ref, *args), timeout=300)
    out = tmp_path / "run" / "l.zarr"
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = "segment:0:kill:3"  # killed with 3 of 4 blocks recorded
    proc = run_mpi(1, seg(nuclei2d / "in.zarr", out, *args), env=env, check=False, timeout=300)
    assert proc.returncode != 0
    proc = run_mpi(3, seg(nuclei2d / "in.zarr", out, *args), timeout=300)
    assert "3 reused" in proc.stderr or "3 already done" in proc.stderr, proc.stderr
    assert np.array_equal(labels_of(out), labels_of(ref))


# ---------------------------------------------------------------- watchdog and collectives
def test_watchdog_names_the_phase_and_the_stuck_rank(small, tmp_path):
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = "stitch:1:hang"
    t = time.perf_counter()
    proc = run_mpi(2, seg(small / "in.zarr", tmp_path / "l.zarr", *THRESH, "--blocksize", "16", "--watchdog", "4"),
                   env=env, check=False, timeout=120)
    wall = time.perf_counter() - t
    assert proc.returncode == 1, proc.stderr
    assert "watchdog" in proc.stderr and "rank 1" in proc.stderr, proc.stderr
    assert "end of loading block records" in proc.stderr, proc.stderr
    assert wall < 60
    # nothing was lost: the same command (no fault) resumes and finishes
    proc = run_mpi(2, seg(small / "in.zarr", tmp_path / "l.zarr", *THRESH, "--blocksize", "16"), timeout=120)
    assert "reused" in proc.stderr


def test_mismatched_collectives_fail_on_every_rank_naming_both_steps():
    proc = run_mpi(2, [Path(__file__).parent / "mpi_gateway.py", "mismatch"], timeout=60)
    assert proc.stdout.count("mismatch seen") == 2, proc.stdout
    assert "'step A'" in proc.stdout and "'step B'" in proc.stdout


def test_gateway_exchange_and_notices_on_3_ranks():
    proc = run_mpi(3, [Path(__file__).parent / "mpi_gateway.py", "exchange"], timeout=60)
    assert proc.stdout.count("exchange ok") == 3, proc.stdout + proc.stderr


# ---------------------------------------------------------------- signals and launchers
def _ranks_of(marker: str) -> list:
    """PIDs of the Python ranks whose command line contains ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and "mpiexec" not in cmd and "hydra" not in cmd:
            pids.append(int(d.name))
    return pids


def _start(ranks, args, env, log_dir):
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("mpiexec not found")
    cmd = [exe, "-n", str(ranks), sys.executable] + [str(a) for a in args] + ["--log-dir", str(log_dir)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(path, text, timeout=90):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"{text!r} never appeared in {path}")


def _finish(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s of the signal:\n{err}")


def _assert_no_rank_left(marker, timeout=10):
    end = time.monotonic() + timeout
    while _ranks_of(marker) and time.monotonic() < end:
        time.sleep(0.2)
    left = _ranks_of(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks left behind: {left}"


def test_sigterm_to_launcher_while_a_rank_is_blocked_inside_mpi(small, tmp_path):
    """Rank 1 sits in a blocking MPI call (its handlers cannot run), rank 0 waits in a
    collective: SIGTERM to mpiexec ends every process within seconds, exit 3 (resumable)."""
    out = tmp_path / "sigterm" / "l.zarr"
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = "stitch:1:mpiblock"
    env["MPICELLPOSE_STOP_GRACE"] = "2"
    proc = _start(2, seg(small / "in.zarr", out, *THRESH, "--blocksize", "16"), env, tmp_path / "logs")
    _wait_for(tmp_path / "logs" / "rank-00001.log", "injecting fault")
    time.sleep(1.0)
    t = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = _finish(proc, 30)
    wall = time.monotonic() - t
    assert proc.returncode == 3, err
    assert "SIGTERM" in err and "re-run the same command to resume" in err, err
    assert wall < 20, wall
    _assert_no_rank_left(str(out))
    # the finished blocks were kept: the same command resumes and completes
    proc = run_mpi(2, seg(small / "in.zarr", out, *THRESH, "--blocksize", "16"), timeout=120)
    assert "reused" in proc.stderr


def test_second_signal_ends_the_job_at_once(small, tmp_path):
    """SIGUSR1 (walltime warning) waits for the blocks in progress; a stuck rank never
    finishes, so the scheduler's SIGTERM that follows must end the job at once."""
    out = tmp_path / "twice" / "l.zarr"
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = "stitch:1:hang"
    proc = _start(2, seg(small / "in.zarr", out, *THRESH, "--blocksize", "16"), env, tmp_path / "logs")
    _wait_for(tmp_path / "logs" / "rank-00001.log", "injecting fault")
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(2.0)
    assert proc.poll() is None  # a graceful stop waits for the stuck rank
    t = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = _finish(proc, 30)
    assert proc.returncode == 3, err
    assert "second signal" in err, err
    assert time.monotonic() - t < 10
    _assert_no_rank_left(str(out))


def test_ranks_exit_when_their_launcher_dies(small, tmp_path):
    """Kill the launcher's agent (the ranks' parent) with SIGKILL: nobody is left to end the
    ranks, so they must notice and exit by themselves instead of spinning."""
    out = tmp_path / "orphan" / "l.zarr"
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = "stitch:1:hang"
    proc = _start(2, seg(small / "in.zarr", out, *THRESH, "--blocksize", "16"), env, tmp_path / "logs")
    _wait_for(tmp_path / "logs" / "rank-00001.log", "injecting fault")
    ranks = _ranks_of(str(out))
    assert len(ranks) == 2, ranks
    parents = set()
    for pid in ranks:
        stat = Path(f"/proc/{pid}/stat").read_text()
        parents.add(int(stat.rsplit(")", 1)[1].split()[1]))
    for ppid in parents:
        os.kill(ppid, signal.SIGKILL)
    _assert_no_rank_left(str(out), timeout=15)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
