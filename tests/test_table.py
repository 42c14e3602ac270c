"""Object table: columns, physical units, blocks spanned, Parquet parts, boxes array; same at any rank count."""
import numpy as np
import pytest
import zarr

import cases
from conftest import read_table, ROOT
from mpicellpose import distributed_eval
from mpicellpose.runner import table


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


def _random_part(rng, lo, n, nd=3):
    ids = np.arange(lo, lo + n)
    blk = rng.integers(0, 50, n)
    part = {"id": ids, "count": rng.integers(1, 10**6, n), "bbox_min": rng.integers(0, 900, (n, nd)),
            "bbox_max": rng.integers(900, 2000, (n, nd)), "coord_sum": rng.random((n, nd)) * 1e7 - 1e5,
            "n_blocks": np.ones(n, np.int64), "block_sorted": blk, "block_start": np.arange(n + 1)}
    return part


@pytest.mark.parametrize("ranks", [1, 2, 5])
def test_csv_written_in_place_is_header_plus_parts_in_rank_order(tmp_path, ranks):
    """Each rank's rows at the offset of an exclusive scan of the byte counts, in any write
    order, give exactly the header followed by the parts in rank order (the old concatenation)."""
    rng = np.random.default_rng(ranks)
    sizes = [int(rng.integers(0, 40)) for _ in range(ranks)]
    sizes[-1] = 0 if ranks > 2 else sizes[-1]   # a rank without rows
    starts = np.r_[1, 1 + np.cumsum(sizes)]
    chunks = [table.csv_chunks(table.columns(_random_part(rng, int(starts[r]), sizes[r]), (2.0, 0.5, 0.5)), rows=7)
              for r in range(ranks)]
    texts = [b"".join(bytes(c) for c in ch) for ch in chunks]
    assert [t.count(b"\n") for t in texts] == sizes
    before = np.r_[0, np.cumsum([len(t) for t in texts])]
    path = tmp_path / "t.csv"
    table.create_csv(path, 3, int(before[-1]))
    for r in rng.permutation(ranks):
        table.write_at(path, len(table.header_bytes(3)) + int(before[r]), chunks[r], step=5)
    want = (",".join(table.header(3)) + "\n").encode() + b"".join(texts)
    assert path.read_bytes() == want


def test_csv_chunks_same_text_with_or_without_pyarrow(monkeypatch):
    pytest.importorskip("pyarrow")
    cols = table.columns(_random_part(np.random.default_rng(3), 1, 25), None)
    fast = b"".join(bytes(c) for c in table.csv_chunks(cols, rows=4))
    whole = b"".join(bytes(c) for c in table.csv_chunks(cols))
    monkeypatch.setattr(table, "have_parquet", lambda: False)
    slow = b"".join(bytes(c) for c in table.csv_chunks(cols, rows=6))
    assert fast == whole == slow == table.format_csv(cols).encode()


def test_three_decimals_without_pyarrow_compute():
    """The floats of the CSV: thousandths rounded, written as ``[-]int.ddd`` (a decimal128 column
    built in numpy: ``pyarrow.compute`` is never imported), and the blocks column: ascending,
    each block once, also for two pieces of one object in the same block."""
    pa = pytest.importorskip("pyarrow")
    import subprocess
    import sys

    v = np.array([0.0, -0.0, 0.0004, -0.0004, 0.0006, -0.0006, 1.5, -1.5, 2.0005, -12.34, 123456.789, 7.0])
    got = table._fixed3(v)
    q = np.round(v * 1000.0).astype(np.int64)
    want = [f"{'-' if x < 0 else ''}{abs(x) // 1000}.{abs(x) % 1000:03d}" for x in q.tolist()]
    assert got.cast(pa.string()).to_pylist() == want
    part = {"id": np.array([1, 2, 3]), "block_sorted": np.array([7, 9, 4, 4, 2, 5, 2]),
            "block_start": np.array([0, 1, 4, 7])}
    assert table.blocks_strings(part).tolist() == ["7", "4;9", "2;5"]
    code = ("import sys, numpy as np; from mpicellpose.runner import table; "
            "table.csv_chunks({'id': np.arange(3), 'c': np.ones(3) / 3}); "
            "print('pyarrow.compute' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_physical_columns_only_with_a_voxel_size_and_units_beside_the_table(tmp_path):
    import json

    img = cases.blobs((16, 20, 18), 7)
    distributed_eval(img, 8, tmp_path / "a.zarr", backend="threshold", backend_kwargs={"threshold": 100},
                     voxel_size=(2.0, 0.5, 0.5))
    rows = read_table(tmp_path / "a.objects.csv")
    assert np.allclose(rows["volume_phys"], rows["voxels"] * 0.5, atol=1e-3)
    doc = json.loads((tmp_path / "a.objects.units.json").read_text())
    unit = dict(doc["columns"])
    assert doc["voxel_size"] == [2.0, 0.5, 0.5] and unit["volume_phys"] == "micrometer^3"
    assert unit["centroid_z_phys"] == "micrometer" and unit["centroid_z"] == "voxel"
    assert [k for k, _ in doc["columns"]] == list(rows)  # every column, in the table's order
    distributed_eval(img, 8, tmp_path / "b.zarr", backend="threshold", backend_kwargs={"threshold": 100})
    rows = read_table(tmp_path / "b.objects.csv")
    assert not any(k.endswith("_phys") for k in rows)  # no voxel size: no physical column repeating voxels
    doc = json.loads((tmp_path / "b.objects.units.json").read_text())
    assert doc["voxel_size"] is None and [k for k, _ in doc["columns"]] == list(rows)
