"""Label equivalence against scipy.ndimage.label on the whole volume (threshold backend + touch),
in-process and under mpiexec -n 2/3/4, and byte-identical outputs for every rank count."""
import json

import numpy as np
import pytest
import zarr

import cases
from conftest import mpi_env, read_table, ROOT
from mpicellpose.synthetic.metrics import equivalence_report, label_equivalent


@pytest.fixture(scope="module")
def serial_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("n1")
    results = {}
    for name in cases.CASES:
        labels, boxes = cases.run_case(name, out)
        results[name] = (labels[...], boxes)
    return out, results


@pytest.mark.parametrize("name", list(cases.CASES))
def test_serial_matches_scipy_label(serial_outputs, name):
    _, results = serial_outputs
    got, boxes = results[name]
    ref, n = cases.oracle(name)
    assert label_equivalent(got, ref), equivalence_report(got, ref)
    # compact IDs 1..N, boxes for each
    assert got.max() == n and len(np.unique(got)) == n + 1
    assert len(boxes) == n
    for k in range(n):
        region = got[boxes[k]]
        assert (region == k + 1).any()
        # the box is tight: the object does not extend beyond it
        assert np.count_nonzero(region == k + 1) == np.count_nonzero(got == k + 1)


def test_object_table_matches_labels(serial_outputs):
    out, results = serial_outputs
    got, _ = results["3d_odd"]
    rows = read_table(out / "3d_odd.objects.csv")
    ids, counts = np.unique(got[got > 0], return_counts=True)
    assert rows["id"].astype(int).tolist() == ids.tolist()
    assert rows["voxels"].astype(int).tolist() == counts.tolist()
    zz = np.nonzero(got == 5)
    assert abs(rows["centroid_z"][4] - zz[0].mean()) < 1e-3
    assert (rows["stitched"] == (rows["n_blocks"] > 1)).all()
    assert rows["stitched"].sum() > 0


def test_output_attrs_mark_complete(serial_outputs):
    out, _ = serial_outputs
    meta = zarr.open(str(out / "3d_odd.zarr"), mode="r").attrs["mpicellpose"]
    assert meta["complete"] is True and meta["n_objects"] > 0
    assert not (out / "3d_odd.mpicellpose-work").exists()  # scratch removed after success


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_mpi_identical_to_serial(serial_outputs, tmp_path, mpirun, n):
    proc = mpirun(n, [ROOT / "tests" / "mpi_cases.py", tmp_path], timeout=300)
    check_identical_to_serial(serial_outputs, tmp_path, proc, n)


@pytest.mark.mpi
def test_streamed_exchange_identical_to_serial(serial_outputs, tmp_path, mpirun):
    """MPICELLPOSE_EXCHANGE_BYTES=1: every face view travels in its own message (many messages per
    neighbour, interleaved with matching); the labels must not change."""
    env = mpi_env()
    env["MPICELLPOSE_EXCHANGE_BYTES"] = "1"
    proc = mpirun(3, [ROOT / "tests" / "mpi_cases.py", tmp_path], timeout=300, env=env)
    check_identical_to_serial(serial_outputs, tmp_path, proc, 3)


def check_identical_to_serial(serial_outputs, tmp_path, proc, n):
    out1, results = serial_outputs
    assert proc.stdout.strip().endswith(f"ok {len(cases.CASES)}")
    for name in cases.CASES:
        got = zarr.open(str(tmp_path / f"{name}.zarr"), mode="r")[...]
        ref, _ = cases.oracle(name)
        assert label_equivalent(got, ref), f"{name} n={n}: " + equivalence_report(got, ref)
        assert np.array_equal(got, results[name][0]), f"{name}: labels differ between 1 and {n} ranks"
        assert got.dtype == results[name][0].dtype
        a = (tmp_path / f"{name}.objects.csv").read_text()
        b = (out1 / f"{name}.objects.csv").read_text()
        assert a == b, f"{name}: object table differs between 1 and {n} ranks"
