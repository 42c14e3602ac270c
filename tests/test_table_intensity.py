"""Object table intensity columns (mean, max, sum of the input per object) and the physical
volume: equal to a serial scipy.ndimage computation on the output labels, at 1 and 3 ranks,
for an integer and a float input and a two-channel one; their units in the side file."""
import json

import numpy as np
import pytest
from scipy import ndimage

from conftest import read_table, run_mpi
from mpicellpose import distributed_eval
from mpicellpose.runner import table

BLOCKS = (8, 10, 9)

WORKER = """
import sys, numpy as np, zarr
from mpicellpose import distributed_eval
src, out = sys.argv[1], sys.argv[2]
kw = {"channel_axis": 3} if len(zarr.open(src, mode="r").shape) == 4 else {}
distributed_eval(src, (8, 10, 9), out, backend="threshold", backend_kwargs={"threshold": 100},
                 voxel_size=(2.0, 0.5, 0.25), **kw)
"""


def _image(dtype, seed=5, shape=(22, 27, 25)):
    """Blobs (objects cut by many block faces) whose voxels vary inside an object."""
    rng = np.random.default_rng(seed)
    fg = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.55
    vals = rng.uniform(101, 4000, shape) if dtype.kind == "f" else rng.integers(101, 4000, shape)
    return np.where(fg, vals, rng.integers(0, 50, shape)).astype(dtype)


def _oracle(img, lab):
    idx = np.arange(1, int(lab.max()) + 1)
    f = img.astype(np.float64)
    return (np.asarray(ndimage.sum(f, lab, idx)), np.asarray(ndimage.maximum(f, lab, idx)),
            np.asarray(ndimage.mean(f, lab, idx)))


def _check(rows, img, lab, suffix=""):
    s, m, mean = _oracle(img, lab)
    assert rows["id"].tolist() == list(range(1, lab.max() + 1))
    if img.dtype.kind == "f":
        assert np.allclose(rows[f"intensity_sum{suffix}"], s, atol=1e-3, rtol=1e-12)
        assert np.allclose(rows[f"intensity_max{suffix}"], m, atol=1e-3)
    else:  # integers: exact
        assert rows[f"intensity_sum{suffix}"].tolist() == s.astype(np.int64).tolist()
        assert rows[f"intensity_max{suffix}"].tolist() == m.astype(np.int64).tolist()
    assert np.allclose(rows[f"intensity_mean{suffix}"], mean, atol=6e-4)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_intensity_columns_one_and_three_ranks(tmp_path, dtype):
    img = _image(np.dtype(dtype))
    import zarr

    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=img.shape, dtype=img.dtype, chunks=(11, 9, 25))
    z[...] = img
    lab1, _ = distributed_eval(img, BLOCKS, tmp_path / "one.zarr", backend="threshold",
                               backend_kwargs={"threshold": 100}, voxel_size=(2.0, 0.5, 0.25))
    lab1 = lab1[...]
    assert lab1.max() > 20
    one = read_table(tmp_path / "one.objects.csv")
    _check(one, img, lab1)
    assert np.allclose(one["volume_phys"], one["voxels"] * 0.25)
    run_mpi(3, ["-c", WORKER, tmp_path / "in.zarr", tmp_path / "three.zarr"], timeout=240)
    assert (tmp_path / "three.objects.csv").read_bytes() == (tmp_path / "one.objects.csv").read_bytes()
    units = json.loads((tmp_path / "one.objects.units.json").read_text())
    cols = dict(units["columns"])
    assert cols["intensity_mean"].startswith(f"input intensity ({np.dtype(dtype).name} values)")
    assert "summed" in cols["intensity_sum"] and cols["volume_phys"].endswith("^3")


def test_intensity_per_channel(tmp_path):
    a, b = _image(np.dtype(np.uint16), 7), _image(np.dtype(np.uint16), 8)
    img = np.stack([a, (b // 3).astype(np.uint16)], axis=-1)   # channel 0 is the one segmented
    lab, _ = distributed_eval(img, BLOCKS, tmp_path / "c.zarr", backend="threshold",
                              backend_kwargs={"threshold": 100}, channel_axis=3)
    lab = lab[...]
    rows = read_table(tmp_path / "c.objects.csv")
    _check(rows, img[..., 0], lab, "_c0")
    _check(rows, img[..., 1], lab, "_c1")
    assert "volume_phys" not in rows and "intensity_mean" not in rows


def test_reduce_intensity_is_in_block_order():
    ids = np.array([3, 1, 3, 1])
    block = np.array([7, 2, 1, 0])
    isum = np.array([[0.1], [0.2], [0.3], [0.4]])
    got = table.reduce_intensity(ids, block, isum, isum)
    want = table.reduce_intensity(ids[::-1], block[::-1], isum[::-1], isum[::-1])
    assert got["intensity_sum"].tobytes() == want["intensity_sum"].tobytes()
    assert got["intensity_max"][:, 0].tolist() == [0.4, 0.3]
