"""Never destroy what the user has (issue 15).

A sandbox holds the user's files; for each hazardous OUTPUT (the mistakes of real batch
scripts) the command must fail before any work, with a message naming the problem, and
every file under the sandbox must be exactly as before (nothing changed, nothing added).
"""
import hashlib
import json
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
from mpicellpose import cli
from mpicellpose.volumes.storage import numpy_array_to_zarr

T = ["--backend", "threshold", "--threshold", "100", "--blocksize", "16"]


def snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for d in dirnames:
            out[os.path.join(dirpath, d)] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                out[p] = "link:" + os.readlink(p)
            else:
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A user's directory: an input inside data/, a plain folder, notes, a mask, a config."""
    root = tmp_path / "sandbox"
    img = cases.blobs((20, 24, 24), 3)
    (root / "data").mkdir(parents=True)
    numpy_array_to_zarr(root / "data" / "in.zarr", img, (16, 16, 16))
    numpy_array_to_zarr(root / "other.zarr", img, (16, 16, 16))  # somebody else's array
    (root / "mydata").mkdir()
    (root / "mydata" / "results.txt").write_text("years of work\n")
    (root / "notes.txt").write_text("notes\n")
    (root / "masks").mkdir()
    numpy_array_to_zarr(root / "masks" / "m.zarr", np.ones((2, 3, 3), bool), (2, 3, 3))
    (root / "conf").mkdir()
    (root / "conf" / "run.toml").write_text('backend = "threshold"\nthreshold = 100\nblocksize = 16\n')
    (root / "home").mkdir()
    (root / "work").mkdir()
    (root / "x.objects.csv").write_text("my own table\n")
    np.save(root / "y.boxes.npy", np.zeros(4))
    os.symlink(root / "data", root / "link")
    monkeypatch.chdir(root / "work")
    monkeypatch.setenv("HOME", str(root / "home"))
    return root


# (name, OUTPUT relative to the sandbox's work/ folder, extra arguments, words of the message)
HAZARDS = [
    ("empty output (unset $OUT)", "", ["--overwrite"], "OUTPUT is empty"),
    ("the current directory", ".", ["--overwrite"], "the current directory"),
    ("the current directory, spelled ./", "./", ["--overwrite"], "never writes its results there"),
    ("a parent of the current directory", "..", ["--overwrite"], "contains the current directory"),
    ("the home directory", "HOME", ["--overwrite"], "your home directory"),
    ("the root directory", "/", ["--overwrite"], "the root directory"),
    ("the folder holding the input", "../data", ["--overwrite"], "contains the input"),
    ("the input folder through a symlink", "../link", ["--overwrite"], "contains the input"),
    ("the input folder, roundabout", "../data/../data/", ["--overwrite"], "contains the input"),
    ("inside the input", "../data/in.zarr/labels", [], "inside the input"),
    ("the input itself", "../data/in.zarr", ["--overwrite"], "same path as the input"),
    ("a plain folder of the user's files", "../mydata", ["--overwrite"], "is never deleted, even with --overwrite"),
    ("a plain file", "../notes.txt", ["--overwrite"], "is never deleted, even with --overwrite"),
    ("inside another zarr array", "../other.zarr/labels.zarr", [], "inside the zarr array"),
    ("another zarr array, no --overwrite", "../other.zarr", [], "pass --overwrite"),
    ("a foreign object table beside it", "../x.zarr", [], "was not written by mpicellpose"),
    ("a foreign object table, even with --overwrite", "../x.zarr", ["--overwrite"], "never replaced"),
    ("a foreign boxes file beside it", "../y.zarr", ["--overwrite"], "was not written by mpicellpose"),
    ("the folder holding the mask", "../masks", ["--overwrite", "--mask", "../masks/m.zarr"], "contains the mask"),
    ("the folder holding the config file", "../conf", ["--overwrite", "--config", "../conf/run.toml"],
     "contains the configuration file"),
    ("work dir = current directory", "../new.zarr", ["--work-dir", "."], "the work directory"),
    ("work dir = the input's folder", "../new.zarr", ["--work-dir", "../data"], "contains the input"),
    ("work dir holding the output", "../res/new.zarr", ["--work-dir", "../res"], "must not contain each other"),
    ("work dir = a plain folder of files", "../new.zarr", ["--work-dir", "../mydata"], "holds no mpicellpose run"),
]


@pytest.mark.parametrize("name,output,extra,words", HAZARDS, ids=[h[0] for h in HAZARDS])
def test_hazardous_output_is_refused_and_nothing_changes(sandbox, capsys, name, output, extra, words):
    if output == "HOME":
        output = str(sandbox / "home")
    before = snapshot(sandbox)
    args = [a for a in extra]
    inp = "../data/in.zarr"
    if "--config" in extra:
        rc = cli.main(["segment", inp, output] + args)
    else:
        rc = cli.main(["segment", inp, output] + T + args)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert words in err, err
    assert err.count("mpicellpose: error:") == 1
    assert snapshot(sandbox) == before, f"{name}: files changed"


def test_overwrite_replaces_only_a_zarr_node_and_the_declared_outputs(sandbox, capsys):
    """The positive case: --overwrite on another zarr array replaces it, says so, and touches
    nothing but the declared outputs."""
    before = snapshot(sandbox)
    rc = cli.main(["segment", "../data/in.zarr", "../other.zarr", "--overwrite"] + T)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "removing the zarr array" in err and "other.zarr" in err
    after = snapshot(sandbox)
    declared = [str(sandbox / p) for p in ("other.zarr", "other.objects.csv", "other.objects.parquet",
                                           "other.boxes.npy", "other.objects.units.json")]
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed and all(any(p == d or p.startswith(d + os.sep) for d in declared) for p in changed), changed
    assert zarr.open(str(sandbox / "other.zarr"), mode="r").attrs["mpicellpose"]["complete"] is True


def test_rerun_replaces_its_own_side_files(sandbox, capsys):
    assert cli.main(["segment", "../data/in.zarr", "../new.zarr"] + T) == 0
    table = (sandbox / "new.objects.csv").read_text()
    # the same command again: its own outputs, no --overwrite needed
    assert cli.main(["segment", "../data/in.zarr", "../new.zarr"] + T) == 0
    assert (sandbox / "new.objects.csv").read_text() == table
    # another configuration on the same output: the output and its table need --overwrite
    capsys.readouterr()
    assert cli.main(["segment", "../data/in.zarr", "../new.zarr"] + T[:-1] + ["8"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main(["segment", "../data/in.zarr", "../new.zarr", "--overwrite"] + T[:-1] + ["8"]) == 0


def test_work_dir_cleanup_keeps_a_users_file(sandbox, capsys):
    work = sandbox / "mywork"
    work.mkdir()
    assert cli.main(["segment", "../data/in.zarr", "../new.zarr", "--work-dir", str(work)] + T) == 0
    assert not work.exists()  # an empty folder the user named: used and removed
    work.mkdir()
    rc = cli.main(["segment", "../data/in.zarr", "../new2.zarr", "--work-dir", str(work), "--keep-work"] + T)
    assert rc == 0
    (work / "keep-me.txt").write_text("mine\n")
    assert cli.main(["segment", "../data/in.zarr", "../new2.zarr", "--work-dir", str(work), "--restart"] + T) == 0
    assert (work / "keep-me.txt").read_text() == "mine\n"
    assert "kept the work directory" in capsys.readouterr().err


# ---------------------------------------------------------------- one run per output
def _start(args, env):
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("mpiexec not found")
    return subprocess.Popen([exe, "-n", "2", sys.executable] + [str(a) for a in args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_gone(marker, timeout=15):
    """Wait until no process has ``marker`` on its command line (the killed job's ranks)."""
    end = time.monotonic() + timeout
    alive = []
    while time.monotonic() < end:
        alive = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                        alive.append(d.name)
                except OSError:
                    pass
        if not alive:
            return
        time.sleep(0.2)
    pytest.fail(f"processes of the killed job still alive: {alive}")


@pytest.mark.mpi
def test_second_submission_is_refused_then_stale_lock_is_taken_over(tmp_path):
    img = cases.blobs((20, 24, 24), 3)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (16, 16, 16))
    out = tmp_path / "labels.zarr"
    lock = tmp_path / "labels.mpicellpose-lock"
    cmd = ["-m", "mpicellpose", "segment", tmp_path / "in.zarr", out] + T
    # the first job gets stuck in its segmentation (holding the lock)
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = "segment:0:hang"
    first = _start(cmd, env)
    try:
        end = time.monotonic() + 60
        while not lock.exists() and time.monotonic() < end:
            time.sleep(0.1)
        assert lock.exists()
        info = json.loads(lock.read_text())
        # the same job submitted twice: refused at start, naming the first run
        t = time.perf_counter()
        second = run_mpi(2, cmd, check=False, timeout=60)
        assert second.returncode == 1, second.stderr
        assert "is in use by another run" in second.stderr
        assert f"pid {info['pid']}" in second.stderr and info["host"] in second.stderr
        assert time.perf_counter() - t < 30
        assert second.stderr.count("mpicellpose: error:") == 1
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the first job dies without cleaning up
        first.communicate()
    _wait_gone(str(out))
    assert lock.exists()
    # the same command again: the dead run's lock is recognised and taken over; the run completes
    proc = run_mpi(2, cmd, timeout=120)
    assert "took over the lock" in proc.stderr
    assert not lock.exists()
    ref = tmp_path / "ref.zarr"
    run_mpi(1, ["-m", "mpicellpose", "segment", tmp_path / "in.zarr", ref] + T, timeout=120)
    assert np.array_equal(zarr.open(str(out), mode="r")[...], zarr.open(str(ref), mode="r")[...])
