"""Object table: columns, physical units, blocks spanned, Parquet parts, boxes array; same at any rank count."""
import numpy as np
import pytest
import zarr

import cases
from conftest import read_table, ROOT
from mpicellpose import distributed_eval, table


def test_id_ranges_partition_ids():
    for n in (0, 1, 7, 100):
        for size in (1, 2, 3, 5):
            got = [i for r in range(size) for i in range(*table.id_range(r, size, n))]
            assert got == list(range(1, n + 1))
            if n:
                owners = table.owner_of(np.arange(1, n + 1), size, n)
                for r in range(size):
                    lo, hi = table.id_range(r, size, n)
                    assert (owners[lo - 1:hi - 1] == r).all()


def test_table_columns(tmp_path):
    img = cases.blobs((24, 30, 28), 41)
    lab, boxes = distributed_eval(img, (8, 10, 9), tmp_path / "t.zarr", backend="threshold",
                                  backend_kwargs={"threshold": 100}, voxel_size=(2.0, 0.5, 0.5))
    got = lab[...]
    rows = read_table(tmp_path / "t.objects.csv")
    assert len(rows["id"]) == got.max() == len(boxes)
    assert np.allclose(rows["centroid_z_phys"], 2.0 * rows["centroid_z"], atol=1e-3)
    assert np.allclose(rows["centroid_x_phys"], 0.5 * rows["centroid_x"], atol=1e-3)
    bid = np.ravel_multi_index(np.meshgrid(*[np.arange(s) // b for s, b in zip(got.shape, (8, 10, 9))],
                                           indexing="ij"), (3, 3, 4))
    for i in range(min(40, len(rows["id"]))):
        want = sorted(set(bid[got == rows["id"][i]].tolist()))
        assert [int(b) for b in str(rows["blocks"][i]).split(";")] == want
        assert rows["n_blocks"][i] == len(want) and rows["stitched"][i] == int(len(want) > 1)
    arr = np.load(tmp_path / "t.boxes.npy")
    assert arr.shape == (got.max(), 3, 2)
    assert arr[0, :, 0].tolist() == [rows["z_min"][0], rows["y_min"][0], rows["x_min"][0]]
    meta = zarr.open(str(tmp_path / "t.zarr"), mode="r").attrs["mpicellpose"]
    assert meta["voxel_size"] == [2.0, 0.5, 0.5]
    prov = meta["provenance"]
    assert prov["config"]["blocksize"] == [8, 10, 9] and prov["mpicellpose"] and prov["numpy"]


def test_parquet_dataset(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    img = cases.blobs((20, 20, 20), 42)
    lab, _ = distributed_eval(img, 10, tmp_path / "p.zarr", backend="threshold", backend_kwargs={"threshold": 100})
    t = pq.read_table(tmp_path / "p.objects.parquet").to_pydict()
    order = np.argsort(t["id"])
    assert np.asarray(t["id"])[order].tolist() == list(range(1, lab[...].max() + 1))
    csv = read_table(tmp_path / "p.objects.csv")
    assert np.asarray(t["voxels"])[order].tolist() == csv["voxels"].tolist()
    assert np.asarray(t["blocks"])[order].tolist() == [str(b) for b in csv["blocks"]]
