"""distributed_eval inside a larger MPI program (issue 4): sub-communicators, Cartesian and
duplicated communicators, two runs at once, COMM_WORLD usable afterwards."""
import numpy as np
import pytest
import zarr

import cases
from conftest import ROOT
from mpicellpose.synthetic.metrics import label_equivalent


@pytest.mark.mpi
@pytest.mark.parametrize("mode,names", [("split", ["3d_odd", "2d_many"]), ("cart", ["3d_full"]), ("dup", ["3d_mask"])])
def test_insitu_communicators(tmp_path, mpirun, mode, names):
    proc = mpirun(4, [ROOT / "tests" / "mpi_insitu.py", tmp_path, mode], timeout=240)
    assert f"ok {mode}" in proc.stdout
    for name in names:
        got = zarr.open(str(tmp_path / f"{mode}-{name}" / f"{name}.zarr"), mode="r")[...]
        assert label_equivalent(got, cases.oracle(name)[0]), name


@pytest.mark.mpi
def test_segment_under_python_m_mpi4py(tmp_path, mpirun):
    """The launcher recommended for clusters: python -m mpi4py -m mpicellpose segment ..."""
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    img = cases.blobs((24, 30, 28), 61)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, 8)
    proc = mpirun(2, ["-m", "mpi4py", "-m", "mpicellpose", "segment", tmp_path / "in.zarr", tmp_path / "o.zarr",
                      "--backend", "threshold", "--threshold", "100", "--blocksize", "9"], timeout=120)
    assert "objects written" in proc.stdout
    from scipy import ndimage

    got = zarr.open(str(tmp_path / "o.zarr"), mode="r")[...]
    assert label_equivalent(got, ndimage.label(img > 100)[0])
    # a bad input still ends every rank with one message and exit code 1 (no MPI_Abort noise needed)
    proc = mpirun(2, ["-m", "mpi4py", "-m", "mpicellpose", "segment", tmp_path / "nope.zarr", tmp_path / "p.zarr",
                      "--backend", "threshold", "--threshold", "1"], timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("mpicellpose: error: input") == 1


def test_launcher_and_mpi4py_mismatch_is_refused(tmp_path):
    """mpiexec from one MPI, mpi4py from another: N singleton processes must not all write one output."""
    import subprocess
    import sys

    from conftest import mpi_env

    env = mpi_env()
    env["PMI_SIZE"] = "4"  # what a foreign launcher sets; this process is a singleton
    proc = subprocess.run([sys.executable, "-m", "mpicellpose", "segment", str(tmp_path / "in.zarr"),
                           str(tmp_path / "o.zarr"), "--backend", "threshold", "--threshold", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "the launcher started 4 processes (PMI_SIZE=4) but MPI sees a world of 1" in proc.stderr
    from mpicellpose import comm

    comm.check_world(comm.SelfComm(), {"PMI_SIZE": "1"})
    comm.check_world(comm.SelfComm(), {})
