"""``mpicellpose convert``: streaming copies into (OME-)zarr, in-process and under mpiexec."""
from __future__ import annotations

import argparse
import os
import textwrap

import numpy as np
import pytest

from mpicellpose.volumes import convert as cv
from mpicellpose.volumes import ngff_io, storage
from mpicellpose.cli import convert as cv_cli
from mpicellpose.errors import ConfigError, DistributedError

tifffile = pytest.importorskip("tifffile")


@pytest.fixture
def data():
    return np.random.default_rng(5).integers(0, 60000, (6, 21, 26)).astype(np.uint16)


class CountingArray:
    """An array-like that remembers the size of every read (to prove streaming)."""

    def __init__(self, arr, chunks=None):
        self.arr, self.shape, self.dtype, self.chunks = arr, arr.shape, arr.dtype, chunks
        self.reads = []

    def __getitem__(self, key):
        out = self.arr[key]
        self.reads.append(out.size)
        return out


def _cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="mpicellpose")
    sub = parser.add_subparsers()
    cv_cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_tiff_to_zarr_round_trip_and_chunks(tmp_path, data):
    tifffile.imwrite(tmp_path / "s.tif", data)
    r = cv.convert(str(tmp_path / "s.tif"), str(tmp_path / "o.zarr"), chunks=(4, 8, 8))
    out = storage.open_array(r.path)
    assert r.path == str(tmp_path / "o.zarr") and out.chunks == (4, 8, 8) and r.axes == ("z", "y", "x")
    np.testing.assert_array_equal(out[...], data)
    assert out.attrs["mpicellpose"]["converted_from"] == str(tmp_path / "s.tif")


def test_streams_in_units_of_whole_chunks(tmp_path, data):
    src = CountingArray(data, chunks=(1, 21, 26))  # like a TIFF: one chunk per plane
    r = cv.convert(src, str(tmp_path / "o.zarr"), chunks=4, budget=4 * 8 * 26 * 2)
    np.testing.assert_array_equal(storage.open_array(r.path)[...], data)
    assert max(src.reads) <= 4 * 8 * 26 and sum(src.reads) == data.size  # every voxel read once
    assert r.n_units == len(src.reads) > 1


def test_hdf5_to_ome_zarr_v3_with_voxel_size(tmp_path, data):
    h5py = pytest.importorskip("h5py")
    if storage.zarr_major() < 3:
        pytest.skip("zarr v3 output needs zarr-python 3")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("img/raw", data=data)
    r = cv.convert(f"{tmp_path / 'v.h5'}:/img/raw", str(tmp_path / "o.ome.zarr"), zarr_format=3, as_ome=True,
                   voxel_size=(3.0, 0.25, 0.25), unit="um", chunks=16)
    assert r.path == str(tmp_path / "o.ome.zarr" / "0")
    v = ngff_io.open_volume(tmp_path / "o.ome.zarr")
    assert v.ngff_version == "0.5" and v.voxel_size.size == (3.0, 0.25, 0.25)
    assert v.voxel_size.units == ("micrometer",) * 3
    np.testing.assert_array_equal(v.array[...], data)
    assert tuple(storage.open_array(r.path).metadata.dimension_names) == ("z", "y", "x")


def test_ome_output_reorders_channels_first_and_keeps_metadata(tmp_path):
    hyper = np.random.default_rng(2).integers(0, 255, (4, 2, 10, 12)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "h.tif", hyper, imagej=True, metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"},
                     resolution=(2.0, 2.0))
    r = cv.convert(str(tmp_path / "h.tif"), str(tmp_path / "h.ome.zarr"), as_ome=True, chunks=8)
    assert r.axes == ("c", "z", "y", "x") and r.chunks == (2, 4, 8, 8)
    v = ngff_io.open_volume(tmp_path / "h.ome.zarr")
    assert v.voxel_size.size == (2.0, 0.5, 0.5)
    np.testing.assert_array_equal(v.array[...], hyper.transpose(1, 0, 2, 3))
    # an OME-Zarr input, one channel of it, to a plain array
    r2 = cv.convert(str(tmp_path / "h.ome.zarr"), str(tmp_path / "c1.zarr"), channel=1)
    np.testing.assert_array_equal(storage.open_array(r2.path)[...], hyper[:, 1])


def test_refuses_to_overwrite_and_same_path(tmp_path, data):
    storage.numpy_array_to_zarr(tmp_path / "in.zarr", data, 8)
    cv.convert(str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"))
    with pytest.raises(DistributedError, match="exists; pass --overwrite"):
        cv.convert(str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"))
    r = cv.convert(str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"), overwrite=True, chunks=5)
    assert r.chunks == (5, 5, 5)
    with pytest.raises(DistributedError, match="same path as the input"):
        cv.convert(str(tmp_path / "in.zarr"), str(tmp_path / "in.zarr"), overwrite=True)
    assert storage.open_array(tmp_path / "in.zarr")[...].shape == data.shape  # untouched
    with pytest.raises(ConfigError, match="chunks"):
        cv.convert(str(tmp_path / "in.zarr"), str(tmp_path / "x.zarr"), chunks="0")
    with pytest.raises(DistributedError, match="one value per spatial axis"):
        cv.convert(str(tmp_path / "in.zarr"), str(tmp_path / "x.zarr"), voxel_size=(1, 2))


def test_cli_in_process(tmp_path, data, capsys):
    d = tmp_path / "tiles"
    d.mkdir()
    for z in range(2):
        for y in range(3):
            tifffile.imwrite(d / f"t_Z{z}Y{y}X0.tif", data[z * 3:(z + 1) * 3, y * 7:(y + 1) * 7],
                             photometric="minisblack")
    assert _cli(["convert", str(d / "*.tif"), str(tmp_path / "t.ome.zarr"), "--ome", "--chunks", "3,7,13",
                 "--voxel-size", "2,1,1"]) == 0
    v = ngff_io.open_volume(tmp_path / "t.ome.zarr")
    assert v.voxel_size.size == (2.0, 1.0, 1.0) and storage.open_array(tmp_path / "t.ome.zarr" / "0").chunks == (3, 7, 13)
    np.testing.assert_array_equal(v.array[...], data)
    assert _cli(["convert", str(d / "*.tif"), str(tmp_path / "t.ome.zarr")]) == 1
    assert "exists" in capsys.readouterr().err
    assert _cli(["convert", str(tmp_path / "nothing.h5:/x"), str(tmp_path / "n.zarr")]) == 1


CLI_SCRIPT = textwrap.dedent("""
    import argparse, sys
    from mpicellpose.cli import convert
    parser = argparse.ArgumentParser()
    convert.register(parser.add_subparsers())
    args = parser.parse_args(sys.argv[1:])
    sys.exit(args.func(args))
""")


@pytest.mark.mpi
def test_convert_under_mpiexec_two_ranks(tmp_path, data):
    from conftest import run_mpi

    tifffile.imwrite(tmp_path / "s.tif", data, tile=(16, 16))
    script = tmp_path / "cli.py"
    script.write_text(CLI_SCRIPT)
    out = tmp_path / "o.ome.zarr"
    run_mpi(2, [script, "convert", tmp_path / "s.tif", out, "--ome", "--chunks", "2,8,8", "--zarr-format", "2"],
            timeout=120)
    v = ngff_io.open_volume(out)
    np.testing.assert_array_equal(v.array[...], data)
    assert storage.open_array(out / "0").chunks == (2, 8, 8)
    proc = run_mpi(2, [script, "convert", tmp_path / "s.tif", out], timeout=120, check=False)
    assert proc.returncode != 0 and "exists" in proc.stderr


def test_unit_shape_and_output_chunks_rules():
    assert cv.unit_shape((10, 10), (4, 4), (10, 1), 1) == (10, 4)  # spans a whole input chunk
    assert cv.unit_shape((10, 100), (4, 10), (1, 100), 1) == (4, 100)
    assert cv.output_chunks((2, 3, 40, 50), ("t", "c", "y", "x"), (16,)) == (1, 3, 16, 16)
    with pytest.raises(ConfigError, match="one per spatial axis"):
        cv.output_chunks((3, 40, 50), ("z", "y", "x"), (16, 16))
    assert os.path.basename(cv.__file__) == "convert.py"
