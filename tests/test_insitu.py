"""distributed_eval inside a larger MPI program (issue 4): sub-communicators, Cartesian and
duplicated communicators, two runs at once, COMM_WORLD usable afterwards."""
import numpy as np
import pytest
import zarr

import cases
from conftest import ROOT
from mpicellpose.metrics import label_equivalent


@pytest.mark.mpi
@pytest.mark.parametrize("mode,names", [("split", ["3d_odd", "2d_many"]), ("cart", ["3d_full"]), ("dup", ["3d_mask"])])
def test_insitu_communicators(tmp_path, mpirun, mode, names):
    proc = mpirun(4, [ROOT / "tests" / "mpi_insitu.py", tmp_path, mode], timeout=240)
    assert f"ok {mode}" in proc.stdout
    for name in names:
        got = zarr.open(str(tmp_path / f"{mode}-{name}" / f"{name}.zarr"), mode="r")[...]
        assert label_equivalent(got, cases.oracle(name)[0]), name
