"""`plan`'s wall-time estimate: the arithmetic (pieces handed to ranks, CPU cores shared), the
lines it prints with their basis, and a real small run's wall within a sane factor of it."""
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, mpi_env, run_mpi
from mpicellpose.tools import estimate as est


def test_step_wall_and_cpu_sharing():
    assert est.step_wall(30.0, 3, 2) == pytest.approx(20.0)   # 3 slabs on 2 ranks: 2 rounds of 10 s
    assert est.step_wall(30.0, 3, 8) == pytest.approx(10.0)   # never faster than one piece
    assert est.parallel_ranks("cpu", 8, cores=2) == (2, 1)    # 8 ranks on 2 cores: 2 at a time
    assert est.parallel_ranks("cpu", 1, cores=16) == (1, 16)
    assert est.parallel_ranks("cuda", 8, cores=2) == (8, None)
    assert est.device_kind("cuda:0") == "cuda" and est.device_kind("cpu") == "cpu"


def _plan(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpicellpose", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=mpi_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("cellpose")
    from mpicellpose.synthetic.nuclei import make_nuclei

    d = tmp_path_factory.mktemp("est")
    img, _ = make_nuclei((32, 96, 96), seed=4)
    tifffile.imwrite(d / "stack.tif", img)
    return d


def test_plan_prints_the_estimate_and_its_basis(stack):
    out = _plan([stack / "stack.tif", stack / "a.zarr", "--model", "demo", "--ranks", "4"], stack)
    line = next(ln for ln in out.splitlines() if ln.startswith("estimated wall on 4 rank(s): "))
    assert "(calibrated, " in line and "network" in line and "mask step" in line
    assert "basis: " in out and "megavoxels (3 orientations in 3D" in out
    rep = json.loads(_plan([stack / "stack.tif", stack / "a.zarr", "--model", "demo", "--json"], stack))
    e = rep["time_estimate"]
    assert e["basis"] == "calibrated" and e["wall_seconds"] > e["startup_seconds"] > 0
    assert e["network_voxels"] == 3 * 32 * 96 * 96   # one block, no halo beyond the volume
    thr = _plan([stack / "stack.tif", stack / "t.zarr", "--backend", "threshold", "--threshold", "500"], stack)
    assert "estimated wall" not in thr   # no network: nothing to estimate


def test_estimate_within_a_sane_factor_of_a_real_run(stack):
    """Measured on the spot (the same load as the run that follows), then the run itself."""
    out = _plan([stack / "stack.tif", stack / "b.zarr", "--model", "demo", "--ranks", "2", "--measure"], stack)
    line = next(ln for ln in out.splitlines() if ln.startswith("estimated wall on 2 rank(s): "))
    assert "(measured, " in line and "measured now: the run's model on a 32x64x64 tile" in out
    m = re.search(r"rank\(s\): ([\d.]+) (s|min)", line)
    estimate = float(m.group(1)) * (60 if m.group(2) == "min" else 1)
    t0 = time.perf_counter()
    run_mpi(2, ["-m", "mpicellpose", "segment", stack / "stack.tif", stack / "b.zarr", "--model", "demo"],
            timeout=600, cwd=stack)
    wall = time.perf_counter() - t0
    print(f"plan --measure estimate {estimate:.0f} s, real wall {wall:.1f} s")
    assert wall / 3 < estimate < wall * 3, (estimate, wall)
    import zarr
    assert np.asarray(zarr.open(str(stack / "b.zarr"), mode="r")[...]).max() > 10
