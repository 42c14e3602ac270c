"""SIGKILL of one of 16 ranks during the distributed merge, then the same command: the output is
byte-identical to an uninterrupted run (issue 13).  16 ranks oversubscribed on 2 cores take
~18 s per launch here; every launch has a hard timeout."""
import hashlib
import sys
from pathlib import Path

import numpy as np
import zarr

from conftest import mpi_env, run_mpi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import scale  # noqa: E402


def digest(out: Path) -> dict:
    z = zarr.open(str(out), mode="r")
    stem = str(out)[:-len(".zarr")]
    return {"labels": hashlib.sha256(np.ascontiguousarray(z[...]).tobytes()).hexdigest(),
            "table": hashlib.sha256(Path(stem + ".objects.csv").read_bytes()).hexdigest(),
            "boxes": hashlib.sha256(np.load(stem + ".boxes.npy").tobytes()).hexdigest()}


def cmd(inp, out):
    return ["-m", "mpicellpose", "segment", inp, out, "--backend", "labels", "--blocksize", "12",
            "--normalize", "none"]


def test_sigkill_during_merge_then_same_command_gives_identical_output(tmp_path):
    inp = tmp_path / "in.zarr"
    assert scale.make_volume(str(inp), 48, 12, "labels") == 17 ** 3   # cubes cut by every face: merges
    ref = tmp_path / "ref" / "l.zarr"
    run_mpi(1, cmd(inp, ref), timeout=60)
    out = tmp_path / "run" / "l.zarr"
    env = mpi_env()
    env["MPICELLPOSE_FAULT"] = "merge:5:kill:1"   # rank 5 dies at the start of the second hooking round
    proc = run_mpi(16, cmd(inp, out), env=env, check=False, timeout=60)
    assert proc.returncode != 0
    assert "injecting fault 'merge:5:kill:1'" in proc.stderr, proc.stderr[-3000:]
    assert not (out.parent / "l.objects.csv").exists()
    proc = run_mpi(16, cmd(inp, out), timeout=60)
    assert "64 reused" in proc.stderr or "64 already done" in proc.stderr, proc.stderr[-3000:]
    assert digest(out) == digest(ref)
