"""Shared test helpers: running scripts under mpiexec with a hard timeout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpiexec_path() -> str | None:
    cand = Path(sys.executable).parent / "mpiexec"
    if cand.exists():
        return str(cand)
    return shutil.which("mpiexec")


def mpi_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # Open MPI refuses root and oversubscription unless told (MPICH needs nothing)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    return env


def run_mpi(n: int, args, *, timeout: float = 240, check: bool = True, env=None, cwd=None):
    """Run ``python args...`` on ``n`` ranks; fail the test (never hang) past ``timeout``."""
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("mpiexec not found (pip install mpi4py mpich)")
    cmd = [exe, "-n", str(n), sys.executable] + [str(a) for a in args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or mpi_env(), cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {n} timed out after {timeout}s (deadlock?): {cmd}\n"
                    f"stdout: {exc.stdout}\nstderr: {exc.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(f"mpiexec -n {n} failed ({proc.returncode}): {cmd}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def mpirun():
    return run_mpi


def read_table(path) -> dict:
    """An object table CSV as {column: numpy array} (numbers where they parse, else strings)."""
    import csv

    import numpy as np

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    out = {}
    for i, name in enumerate(header):
        col = [r[i] for r in body]
        try:
            vals = [float(v) for v in col]
            arr = np.array(vals)
            out[name] = arr.astype(np.int64) if np.all(arr == np.round(arr)) and "centroid" not in name else arr
        except ValueError:
            out[name] = np.array(col, dtype=object)
    return out


@pytest.fixture(scope="module")
def nuclei2d(tmp_path_factory):
    """A 96x96 image of synthetic nuclei as one-chunk zarr (the Cellpose fault tests' input)."""
    pytest.importorskip("cellpose")
    from mpicellpose.synthetic.nuclei import make_nuclei
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    root = tmp_path_factory.mktemp("cp2d")
    img, _ = make_nuclei((96, 96), seed=3)
    numpy_array_to_zarr(root / "in.zarr", img, (96, 96))
    return root
