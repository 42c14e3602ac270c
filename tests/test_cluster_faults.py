"""Faults of real clusters (issue 25): a stuck rank 0, a requeued job, node-local paths, a rank
without its GPU, and an output that must survive a node crash.  Every run has a hard timeout."""
import datetime
import json
import os
import re
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

THRESH = ["--backend", "threshold", "--threshold", "100", "--blocksize", "16"]


def seg(inp, out, *extra):
    return ["-m", "mpicellpose", "segment", str(inp), str(out), *THRESH, *extra]


def labels_of(out):
    return zarr.open(str(out), mode="r")[...]


def env_with(**kw):
    env = mpi_env()
    for k in ("SLURM_JOB_ID", "LSB_JOBID", "PBS_JOBID", "FLUX_JOB_ID", "JOB_ID", "MPICELLPOSE_FAULT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def stamp(stderr, pattern):
    """Seconds of the day of the first log line matching ``pattern``."""
    m = re.search(r"^(\d\d):(\d\d):(\d\d) .*" + pattern, stderr, re.M)
    assert m, f"no line matching {pattern!r} in:\n{stderr}"
    h, mi, s = (int(x) for x in m.groups())
    return h * 3600 + mi * 60 + s


def ranks_left(marker):
    """PIDs of the Python ranks whose command line contains ``marker`` (tests/test_no_hang.py)."""
    from test_no_hang import _ranks_of

    return _ranks_of(marker)


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    numpy_array_to_zarr(root / "in.zarr", cases.blobs((30, 40, 44), 5), (16, 16, 16))
    ref = root / "ref" / "l.zarr"
    run_mpi(3, seg(root / "in.zarr", ref), timeout=120)
    return root, labels_of(ref)


def _silent_rank0(vol, out, **env):
    """Rank 0 hangs after the segmentation (a hung file system): a watcher ends the job."""
    root, _ = vol
    t = time.monotonic()
    proc = run_mpi(3, seg(root / "in.zarr", out, "--watchdog", "4"), check=False, timeout=90,
                   env=env_with(MPICELLPOSE_FAULT="stitch:0:hang", **env))
    return proc, time.monotonic() - t


# ---------------------------------------------------------------- a stuck rank 0
def test_a_silent_rank_0_ends_the_job_naming_it_and_the_resume_is_identical(vol, tmp_path):
    out = tmp_path / "hang" / "l.zarr"
    proc, wall = _silent_rank0(vol, out)
    assert proc.returncode != 0
    err = proc.stderr
    assert re.search(r"watchdog: rank 0 on \S+ is silent", err), err
    assert "last at 'segment" in err and "block(s) done" in err, err   # where rank 0 was
    # within the limit (4 s) and a few seconds of rank 0 going silent
    assert stamp(err, "ERROR .*watchdog") - stamp(err, "injecting fault") <= 4 + 3, err
    assert wall < 60
    time.sleep(1.0)
    assert ranks_left(str(out)) == []
    proc = run_mpi(3, seg(vol[0] / "in.zarr", out), timeout=120)
    assert "took over the lock" in proc.stderr and "reused" in proc.stderr, proc.stderr
    assert np.array_equal(labels_of(out), vol[1])


def test_the_watchdog_default_is_derived_from_the_run():
    from mpicellpose.comm import watchdog as wd

    assert wd.watchdog_limit(wd.WATCHDOG_SECONDS, False, 0.0) == 300.0       # a few minutes at least
    assert wd.watchdog_limit(wd.WATCHDOG_SECONDS, False, 120.0) == 1200.0    # 10x the slowest block
    assert wd.watchdog_limit(5.0, True, 0.5) == 5.0                           # --watchdog 5
    assert wd.watchers(2) == (1,) and wd.watchers(128) == (1, 64, 127)


def test_the_batch_scripts_pass_a_watchdog_to_every_rank():
    from mpicellpose.tools.batch import BatchOptions, parse_segment_args, render

    for scheduler in ("slurm", "lsf"):
        text = render(BatchOptions(scheduler=scheduler, segment=parse_segment_args(["segment", "in.zarr", "o.zarr"])))
        assert "export MPICELLPOSE_WATCHDOG=${MPICELLPOSE_WATCHDOG-600}" in text
    assert "OMP_NUM_THREADS MPICELLPOSE_WATCHDOG; do" in text   # Open MPI: forwarded to the other hosts


# ---------------------------------------------------------------- the lock and a requeued job
def _move_lock_to_a_gone_node(out):
    """The requeued job runs on other nodes: the lock names a host this one cannot check."""
    lock = out.parent / "l.mpicellpose-lock"
    info = json.loads(lock.read_text())
    info["host"] = "node-gone-17"
    lock.write_text(json.dumps(info))
    return lock


def test_a_requeued_job_takes_its_own_lock_over(vol, tmp_path):
    out = tmp_path / "requeue" / "l.zarr"
    proc, _ = _silent_rank0(vol, out, SLURM_JOB_ID=4242)
    assert proc.returncode != 0 and "watchdog" in proc.stderr
    _move_lock_to_a_gone_node(out)
    # another job, told not to wait: refused at once, naming the holder
    proc = run_mpi(3, seg(vol[0] / "in.zarr", out, "--lock-wait", "0"), check=False, timeout=60,
                   env=env_with(SLURM_JOB_ID=999))
    assert proc.returncode != 0 and "in use by another run" in proc.stderr and "node-gone-17" in proc.stderr
    # the same job, requeued: takes the lock over at once and finishes
    t = time.monotonic()
    proc = run_mpi(3, seg(vol[0] / "in.zarr", out), timeout=120, env=env_with(SLURM_JOB_ID=4242))
    assert "same scheduler job (SLURM_JOB_ID=4242)" in proc.stderr, proc.stderr
    assert "waiting" not in proc.stderr and time.monotonic() - t < 60
    assert np.array_equal(labels_of(out), vol[1])
    assert not (out.parent / "l.mpicellpose-lock").exists()


def test_another_job_waits_for_a_lock_until_its_lease_runs_out(vol, tmp_path):
    out = tmp_path / "lease" / "l.zarr"
    proc, _ = _silent_rank0(vol, out, SLURM_JOB_ID=1111, MPICELLPOSE_LOCK_LEASE=6)
    assert proc.returncode != 0
    lock = _move_lock_to_a_gone_node(out)
    assert json.loads(lock.read_text())["lease"] == 6
    os.utime(lock)   # as if refreshed just now: the new job must wait ~6 s
    t = time.monotonic()
    proc = run_mpi(3, seg(vol[0] / "in.zarr", out), timeout=120, env=env_with(SLURM_JOB_ID=2222))
    assert "is locked by another run" in proc.stderr and "waiting up to" in proc.stderr, proc.stderr
    assert re.search(r"took over the lock .*not refreshed for \d+ s \(its lease is 6 s\)", proc.stderr)
    assert time.monotonic() - t > 5
    assert np.array_equal(labels_of(out), vol[1])


def test_rank_0_releases_the_lock_when_its_watchdog_ends_the_job(vol, tmp_path):
    out = tmp_path / "release" / "l.zarr"
    proc = run_mpi(2, seg(vol[0] / "in.zarr", out, "--watchdog", "3"), check=False, timeout=90,
                   env=env_with(MPICELLPOSE_FAULT="stitch:1:hang"))
    assert proc.returncode != 0 and "watchdog" in proc.stderr
    assert not (out.parent / "l.mpicellpose-lock").exists()


def test_lock_rules_without_mpi(tmp_path, monkeypatch):
    from mpicellpose.errors import OutputInUseError
    from mpicellpose.runner.lock import OutputLock

    path = tmp_path / "x.mpicellpose-lock"
    rec = {"host": "elsewhere", "pid": 1, "job": "LSB_JOBID=7", "lease": 600, "token": "t",
           "started": datetime.datetime.now().isoformat()}
    path.write_text(json.dumps(rec))
    monkeypatch.setenv("LSB_JOBID", "8")
    t = time.monotonic()
    ticks = []
    with pytest.raises(OutputInUseError, match=r"waited 1 s, --lock-wait"):
        OutputLock(path, "x", wait=1.0, tick=lambda: ticks.append(1)).acquire()
    assert 0.9 < time.monotonic() - t < 5 and ticks   # rank 0 kept beating while it waited
    monkeypatch.setenv("LSB_JOBID", "7")
    lock = OutputLock(path, "x", wait=0).acquire()
    assert "same scheduler job (LSB_JOBID=7)" in lock.took_over
    lock.release()
    lock.release()   # idempotent (also run before an MPI_Abort)
    assert not path.exists()


# ---------------------------------------------------------------- node-local paths
@pytest.mark.parametrize("local", ["work", "output", "input"])
def test_a_node_local_path_is_refused_at_plan_time(vol, tmp_path, local):
    """Two ranks, each with its own working directory; the node-local path is given through a link
    to /proc/self/cwd, so the same path shows each rank a different folder (as $TMPDIR would)."""
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("mpiexec not found")
    for d in ("node-a", "node-b"):
        (tmp_path / d).mkdir()
    (tmp_path / "local").symlink_to("/proc/self/cwd")
    inp, out, extra = vol[0] / "in.zarr", tmp_path / "out" / "l.zarr", []
    if local == "work":
        extra = ["--work-dir", tmp_path / "local" / "work"]
        seen = rf"the work directory {re.escape(str(tmp_path / 'local' / 'work'))} as rank 0"
    elif local == "output":
        out = tmp_path / "local" / "l.zarr"
        seen = rf"the folder of OUTPUT {re.escape(str(tmp_path / 'local'))} as rank 0"
    else:
        import shutil

        shutil.copytree(vol[0] / "in.zarr", tmp_path / "node-a" / "in.zarr")   # only rank 0's node has it
        inp = tmp_path / "local" / "in.zarr"
        seen = rf"the input {re.escape(str(inp))} \(rank 0 opened it\)"
    args = [sys.executable, *seg(inp, out, *extra)]
    cmd = [exe, "-n", "1", "-wdir", str(tmp_path / "node-a"), *args, ":",
           "-n", "1", "-wdir", str(tmp_path / "node-b"), *args]
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env_with())
    wall = time.monotonic() - t
    assert proc.returncode != 0
    assert wall < 10, wall
    assert re.search(rf"rank 1 on host \S+ does not see {seen}", proc.stderr), proc.stderr
    assert "looks node-local" in proc.stderr
    assert not list(tmp_path.glob("**/blocks/**/*.npz"))   # nothing segmented
    assert not list(tmp_path.glob("node-a/**/.mpicellpose-probe-*"))   # check files removed


# ---------------------------------------------------------------- durability
def test_a_crash_before_the_completion_marker_is_finished_by_the_next_run(vol, tmp_path):
    out = tmp_path / "crash" / "l.zarr"
    proc = run_mpi(3, seg(vol[0] / "in.zarr", out), check=False, timeout=90,
                   env=env_with(MPICELLPOSE_FAULT="finish:0:kill"))
    assert proc.returncode != 0
    verify = subprocess.run([sys.executable, "-m", "mpicellpose", "verify", str(out)], capture_output=True,
                            text=True, env=env_with(), timeout=60)
    assert verify.returncode == 1 and "NOT complete" in verify.stdout, verify.stdout
    chunk = out / "0" / "1" / "1"
    assert chunk.exists()
    chunk.unlink()   # a chunk the crash lost although its marker was written
    proc = run_mpi(3, seg(vol[0] / "in.zarr", out), timeout=120)
    assert "reused" in proc.stderr, proc.stderr
    assert chunk.exists()
    assert np.array_equal(labels_of(out), vol[1])


def test_verify_reports_a_missing_chunk_of_a_finished_output(vol, tmp_path):
    out = tmp_path / "verify" / "l.zarr"
    run_mpi(2, seg(vol[0] / "in.zarr", out), timeout=120)
    cli = [sys.executable, "-m", "mpicellpose", "verify", str(out)]
    ok = subprocess.run(cli, capture_output=True, text=True, env=env_with(), timeout=60)
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stdout + ok.stderr
    (out / "0" / "1" / "2").unlink()
    bad = subprocess.run(cli, capture_output=True, text=True, env=env_with(), timeout=60)
    assert bad.returncode == 1, bad.stdout
    assert "1 of 18 chunk(s) that must hold labels are missing" in bad.stdout and "(0, 1, 2)" in bad.stdout
    meta = json.loads((out / ".zattrs").read_text())["mpicellpose"]["provenance"]["block_devices"]
    assert sum(d["blocks"] for d in meta) == 18 and {d["rank"] for d in meta} <= {0, 1}
    assert all(d["device"] == "cpu (threshold backend)" and d["host"] for d in meta), meta


# ---------------------------------------------------------------- a rank without its GPU
@pytest.mark.cellpose
@pytest.mark.slow
def test_a_rank_without_a_usable_gpu_stops_the_job_unless_allowed(nuclei2d, tmp_path):
    args = ["-m", "mpicellpose", "segment", str(nuclei2d / "in.zarr"), str(tmp_path / "l.zarr"), "--model", "demo",
            "--threads", "1", "--blocksize", "48", "--overlap", "8", "--flow-box", "1"]  # 4 boxes: both ranks work
    env = env_with(MPICELLPOSE_FAULT="device:1:unusable")
    proc = run_mpi(2, args, check=False, timeout=120, env=env)
    assert proc.returncode != 0
    assert re.search(r"rank 1 on host \S+: its GPU is unusable", proc.stderr), proc.stderr
    assert "--allow-cpu-fallback" in proc.stderr and "before any block is segmented" in proc.stderr
    assert not list((tmp_path / "l.mpicellpose-work").glob("blocks/**/*.npz"))   # no block segmented
    proc = run_mpi(2, args + ["--allow-cpu-fallback"], timeout=300, env=env)
    assert "--allow-cpu-fallback: 1 rank(s) run on the CPU" in proc.stderr, proc.stderr
    prov = json.loads((tmp_path / "l.zarr" / ".zattrs").read_text())["mpicellpose"]["provenance"]
    devices = {d["rank"]: d for d in prov["block_devices"]}
    assert sum(d["blocks"] for d in devices.values()) == 4
    assert devices[1]["device"].startswith("cpu (its GPU is missing or unusable")
    assert devices.get(0, {"device": "cpu"})["device"] == "cpu"
