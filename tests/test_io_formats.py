"""Input formats through io.open_volume_spec: HDF5, TIFF, tile / slice globs, zarr, N5, errors."""
from __future__ import annotations

import numpy as np
import pytest

from mpicellpose.volumes import readers, storage, tiff, volume
from mpicellpose.errors import InputError, InputNotFoundError

tifffile = pytest.importorskip("tifffile")


@pytest.fixture
def vol3():
    return np.random.default_rng(7).integers(0, 5000, (5, 12, 17)).astype(np.uint16)


# --------------------------------------------------------------------------- HDF5
@pytest.fixture
def h5file(tmp_path, vol3):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw/ch0", data=vol3, chunks=(2, 6, 6))
        d = f.create_dataset("raw/ch1", data=vol3 + 1)
        d.attrs["element_size_um"] = [2.0, 0.4, 0.4]
        f.create_dataset("meta/counts", data=np.arange(3))
    return path


def test_hdf5_spec_forms_read_lazily_and_identically(h5file, vol3):
    with readers.open_volume_spec(f"{h5file}:/raw/ch0") as v:
        assert v.kind == "hdf5" and v.shape == vol3.shape and v.axes == ("z", "y", "x")
        assert v.channel_axis is None and v.voxel_size is None
        np.testing.assert_array_equal(v.array[1:4, 2:9:3, -5:], vol3[1:4, 2:9:3, -5:])
        assert type(v.array).__module__.startswith("h5py")  # not a numpy copy
    with readers.open_volume_spec(str(h5file), dataset="raw/ch0") as v:
        np.testing.assert_array_equal(v.array[...], vol3)
    assert v.handle is None  # closed by the context manager


def test_hdf5_voxel_size_from_element_size_um(h5file):
    with readers.open_volume_spec(f"{h5file}:raw/ch1") as v:
        assert v.voxel_size.size == (2.0, 0.4, 0.4)
        assert v.voxel_size.units == ("micrometer",) * 3
        assert volume.anisotropy(v.voxel_size) == pytest.approx(5.0)


def test_hdf5_missing_dataset_lists_what_exists(h5file):
    with pytest.raises(InputError) as e:
        readers.open_volume_spec(f"{h5file}:/raw/nope")
    msg = str(e.value)
    assert "/raw/nope" in msg and "/raw/ch0" in msg and "/meta/counts" in msg
    with pytest.raises(InputError, match="holds 3 datasets"):
        readers.open_volume_spec(str(h5file))
    with pytest.raises(InputError, match="is a group"):
        readers.open_volume_spec(f"{h5file}:/raw")
    with pytest.raises(InputNotFoundError):
        readers.open_volume_spec(str(h5file.parent / "absent.h5") + ":/x")


def test_hdf5_single_dataset_and_dimension_labels(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "one.hdf5"
    data = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("img", data=data)
        for i, name in enumerate("czyx"):
            d.dims[i].label = name
    with readers.open_volume_spec(str(path)) as v:
        assert v.axes == ("c", "z", "y", "x") and v.channel_axis == 0
    with readers.open_volume_spec(str(path), channel=1) as v:
        assert v.axes == ("z", "y", "x") and v.shape == (3, 4, 5)
        np.testing.assert_array_equal(v.array[:, 1, ::2], data[1, :, 1, ::2])


# --------------------------------------------------------------------------- TIFF
def test_tiff_stack_is_lazy_zarr_and_round_trips(tmp_path, vol3):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, vol3)
    v = readers.open_volume_spec(str(path))
    assert v.kind == "tiff" and v.shape == vol3.shape and v.axes == ("z", "y", "x")
    assert hasattr(v.array, "chunks")  # a zarr view on the file, not an in-memory copy
    np.testing.assert_array_equal(v.array[2:4, 3:7, 1:16:5], vol3[2:4, 3:7, 1:16:5])
    tifffile.imwrite(tmp_path / "tiled.tif", vol3, tile=(16, 16))
    np.testing.assert_array_equal(readers.open_volume_spec(str(tmp_path / "tiled.tif")).array[...], vol3)


def test_tiff_2d_and_unknown_extension_by_magic(tmp_path, vol3):
    tifffile.imwrite(tmp_path / "plane.tif", vol3[0])
    v = readers.open_volume_spec(str(tmp_path / "plane.tif"))
    assert v.axes == ("y", "x") and v.shape == vol3[0].shape
    (tmp_path / "plane.data").write_bytes((tmp_path / "plane.tif").read_bytes())
    assert readers.input_kind(str(tmp_path / "plane.data")) == "tiff"


def test_imagej_hyperstack_axes_channel_and_voxel_size(tmp_path):
    data = np.random.default_rng(1).integers(0, 200, (4, 2, 10, 12)).astype(np.uint8)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX", "spacing": 3.0, "unit": "um"},
                     resolution=(1 / 0.5, 1 / 0.5))
    v = readers.open_volume_spec(str(path))
    assert v.axes == ("z", "c", "y", "x") and v.channel_axis == 1
    assert v.voxel_size.size == pytest.approx((3.0, 0.5, 0.5))
    assert v.voxel_size.units == ("micrometer",) * 3
    v1 = readers.open_volume_spec(str(path), channel=1)
    assert v1.axes == ("z", "y", "x")
    np.testing.assert_array_equal(v1.array[...], data[:, 1])
    n = v.to_ngff_order()
    assert n.axes == ("c", "z", "y", "x") and n.channel_axis == 0
    np.testing.assert_array_equal(n.array[1, 2:4, :, 3], data[2:4, 1, :, 3])
    with pytest.raises(InputError, match="channel 2 is out of range"):
        readers.open_volume_spec(str(path), channel=2)


# --------------------------------------------------------------------------- globs of TIFFs
def _write_tiles(d, grid, tile):
    d.mkdir()
    full = np.zeros(tuple(g * t for g, t in zip(grid, tile)), np.uint16)
    for idx in np.ndindex(*grid):
        block = np.random.default_rng(sum(idx)).integers(1, 999, tile).astype(np.uint16)
        sl = tuple(slice(i * t, (i + 1) * t) for i, t in zip(idx, tile))
        full[sl] = block
        tifffile.imwrite(d / f"tile_Z{idx[0]}Y{idx[1]}X{idx[2]}.tif", block, photometric="minisblack")
    return full


def test_tile_glob_places_tiles_on_their_grid(tmp_path):
    full = _write_tiles(tmp_path / "tiles", (2, 3, 2), (3, 4, 5))
    arr = tiff.wrap_folder_of_tiffs(tmp_path / "tiles" / "*.tif")
    assert arr.shape == full.shape == (6, 12, 10)
    np.testing.assert_array_equal(arr[...], full)
    v = readers.open_volume_spec(str(tmp_path / "tiles" / "*.tif"))
    assert v.kind == "tiff-tiles" and v.axes == ("z", "y", "x")
    np.testing.assert_array_equal(v.array[2:5, 3:9, 4:7], full[2:5, 3:9, 4:7])


def test_slice_glob_and_folder_stack_in_name_order(tmp_path, vol3):
    d = tmp_path / "slices"
    d.mkdir()
    for i in range(vol3.shape[0]):
        tifffile.imwrite(d / f"z{i:04d}.tif", vol3[i])
    for spec in (str(d / "z*.tif"), str(d)):
        v = readers.open_volume_spec(spec)
        assert v.kind == "tiff-stack" and v.shape == vol3.shape
        np.testing.assert_array_equal(v.array[...], vol3)
    with pytest.raises(InputNotFoundError, match="no files match"):
        readers.open_volume_spec(str(d / "nothing*.tif"))
    with pytest.raises(InputError, match="tile pattern"):
        readers.open_volume_spec(str(d / "*.tif"), tile_pattern=r"_(Y)(\d+)(X)(\d+)")


def test_slices_of_different_shapes_fail_clearly(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    tifffile.imwrite(d / "a.tif", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(d / "b.tif", np.zeros((5, 4), np.uint8))
    with pytest.raises(InputError, match="cannot be stacked"):
        readers.open_volume_spec(str(d / "*.tif"))


# --------------------------------------------------------------------------- zarr, N5, errors
def test_zarr_array_group_and_v3(tmp_path, vol3):
    storage.numpy_array_to_zarr(tmp_path / "a.zarr", vol3, 4)
    v = readers.open_volume_spec(str(tmp_path / "a.zarr"))
    assert v.kind == "zarr" and not v.is_ome and v.voxel_size is None and v.zarr_format == 2
    np.testing.assert_array_equal(v.array[...], vol3)
    import zarr

    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    g.create_array("raw", shape=vol3.shape, chunks=(2, 4, 4), dtype=vol3.dtype)[...] = vol3
    v = readers.open_volume_spec(str(tmp_path / "g.zarr"), dataset="raw")
    assert v.zarr_format == 3
    np.testing.assert_array_equal(v.array[1], vol3[1])
    with pytest.raises(InputError, match="not an OME-Zarr image.*raw"):
        readers.open_volume_spec(str(tmp_path / "g.zarr"))
    with pytest.raises(InputError, match="no dataset 'nope'"):
        readers.open_volume_spec(str(tmp_path / "g.zarr"), dataset="nope")


def test_axes_option_for_arrays_without_names(tmp_path):
    data = np.zeros((2, 3, 4, 5), np.uint8)
    storage.numpy_array_to_zarr(tmp_path / "c.zarr", data, 2)
    assert readers.open_volume_spec(str(tmp_path / "c.zarr")).axes == ("dim_0", "z", "y", "x")
    v = readers.open_volume_spec(str(tmp_path / "c.zarr"), axes="czyx")
    assert v.channel_axis == 0
    with pytest.raises(InputError, match="no channel axis"):
        readers.open_volume_spec(str(tmp_path / "c.zarr"), channel=0)


def test_n5_is_refused_clearly_on_zarr3(tmp_path):
    if storage.zarr_major() < 3:
        pytest.skip("zarr-python 2 reads N5")
    d = tmp_path / "vol.n5"
    d.mkdir()
    (d / "attributes.json").write_text('{"n5": "2.0.0"}')
    assert readers.input_kind(str(d)) == "n5"
    with pytest.raises(InputError, match="N5"):
        readers.open_volume_spec(str(d))


def test_unknown_and_missing_inputs(tmp_path):
    (tmp_path / "notes.dat").write_text("hello")
    with pytest.raises(InputError, match="cannot tell what kind of input"):
        readers.open_volume_spec(str(tmp_path / "notes.dat"))
    with pytest.raises(InputNotFoundError):
        readers.open_volume_spec(str(tmp_path / "missing.zarr"))
    with pytest.raises(InputError, match="unknown input option"):
        readers.open_volume_spec(str(tmp_path / "notes.dat"), levle=1)
    with pytest.raises(InputError, match="without 'dtype'"):
        readers.open_volume_spec(object.__new__(type("X", (), {"shape": (2,), "__getitem__": lambda s, k: 0})))


def test_array_like_passthrough_and_time_axis():
    data = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    v = readers.open_volume_spec(data)
    assert v.kind == "array" and v.array is data
    with pytest.raises(InputError, match="3 time points"):
        readers.open_volume_spec(data, axes="tyx")
    v = readers.open_volume_spec(data, axes="tyx", timepoint=-1)
    np.testing.assert_array_equal(v.array[...], data[2])


# --------------------------------------------------------------------------- AxisView
def test_axis_view_matches_numpy_on_many_keys():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 100, (3, 4, 5, 6))
    view = volume.AxisView(base, fixed={1: -1}, order=(3, 0, 2))
    ref = base[:, -1].transpose(2, 0, 1)
    assert view.shape == ref.shape and view.ndim == 3
    keys = [Ellipsis, (slice(1, 5, 2),), (2, Ellipsis), (Ellipsis, 3), (slice(None, None, -1), 1),
            (-1, slice(0, 2), slice(1, None, 3)), (np.int64(4), 0, 0)]
    for k in keys:
        np.testing.assert_array_equal(view[k], ref[k], err_msg=repr(k))
    with pytest.raises(IndexError):
        view[[0, 1]]
    with pytest.raises(IndexError):
        view[0, 0, 0, 0]
    np.testing.assert_array_equal(np.asarray(view), ref)


def test_create_array_ngff_options(tmp_path):
    a = storage.create_array(tmp_path / "v2.zarr", (4, 4), (2, 2), np.uint8, dimension_separator="/")
    a[...] = 1
    assert (tmp_path / "v2.zarr" / "1" / "1").exists()
    if storage.zarr_major() >= 3:
        b = storage.create_array(tmp_path / "v3.zarr", (4, 4), (2, 2), np.uint8, zarr_format=3,
                                 dimension_names=("y", "x"))
        assert tuple(b.metadata.dimension_names) == ("y", "x")
