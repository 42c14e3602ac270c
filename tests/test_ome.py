"""OME-Zarr: reading NGFF 0.4 / 0.5 images, label metadata, label pyramids, validation by ome-zarr."""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

from mpicellpose.volumes import ngff, ngff_io, pyramid, readers, storage, volume
from mpicellpose.errors import DistributedError, InputError

FORMATS = [2] + ([3] if storage.zarr_major() >= 3 else [])
VS = volume.VoxelSize(("z", "y", "x"), (2.0, 0.5, 0.5), ("micrometer",) * 3)


def _image(path, fmt, data=None, axes="czyx", **kw):
    if data is None:
        data = np.arange(2 * 6 * 10 * 12, dtype=np.uint16).reshape(2, 6, 10, 12)
    ngff_io.write_image(path, data, axes, voxel_size=kw.pop("voxel_size", VS), zarr_format=fmt,
                        chunks=kw.pop("chunks", None), **kw)
    return data


def _labels(shape, seed=0, n=6):
    return np.random.default_rng(seed).integers(0, n, shape).astype(np.uint32)


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("fmt", FORMATS)
def test_open_volume_reads_axes_scale_and_version(tmp_path, fmt):
    p = tmp_path / "img.ome.zarr"
    data = _image(p, fmt)
    v = ngff_io.open_volume(p)
    assert v.is_ome and v.kind == "ome-zarr" and v.group_path == str(p) and v.level == "0"
    assert v.ngff_version == {2: "0.4", 3: "0.5"}[fmt] and v.zarr_format == fmt
    assert v.axes == ("c", "z", "y", "x") and v.channel_axis == 0 and v.shape == data.shape
    assert v.voxel_size.size == (2.0, 0.5, 0.5) and v.voxel_size.units == ("micrometer",) * 3
    assert v.spatial_axes == ("z", "y", "x") and v.spatial_shape == (6, 10, 12)
    assert volume.anisotropy(v.voxel_size) == pytest.approx(4.0)
    c1 = ngff_io.open_volume(p, channel=1)
    assert c1.axes == ("z", "y", "x") and c1.channel_axis is None
    np.testing.assert_array_equal(c1.array[2:4, ::3, 5], data[1, 2:4, ::3, 5])
    # a path to a level array inside the image still knows it is OME
    lvl = readers.open_volume_spec(str(p / "0"), channel=0)
    assert lvl.is_ome and lvl.voxel_size.size == (2.0, 0.5, 0.5)


def test_levels_channels_by_name_timepoints_and_errors(tmp_path):
    p = tmp_path / "t.ome.zarr"
    data = np.arange(3 * 2 * 4 * 8 * 8, dtype=np.uint16).reshape(3, 2, 4, 8, 8)
    ngff_io.write_image(p, data, "tczyx", voxel_size=(1.0, 0.3, 0.3))
    half = storage.create_array(p / "1", (3, 2, 4, 4, 4), (1, 1, 4, 4, 4), np.uint16, **ngff.array_options(2, "tczyx"))
    half[...] = data[..., ::2, ::2]
    ngff_io.write_multiscales_metadata(p, "tczyx", (1.0, 0.3, 0.3), n_levels=2, factor=(1, 2, 2), method="nearest",
                                       extra={"omero": {"channels": [{"label": "DAPI"}, {"label": "GFP"}]}})
    v = ngff_io.open_volume(p, level=1, channel="GFP", timepoint=2)
    assert v.axes == ("z", "y", "x") and v.level == "1" and v.voxel_size.size == (1.0, 0.6, 0.6)
    np.testing.assert_array_equal(v.array[...], data[2, 1, :, ::2, ::2])
    assert ngff_io.open_volume(p, level="1", timepoint=0).shape == (2, 4, 4, 4)
    with pytest.raises(InputError, match="3 time points"):
        ngff_io.open_volume(p)
    with pytest.raises(InputError, match=r"level 5 does not exist.*\['0', '1'\]|\['0', '1'\].*level 5"):
        ngff_io.open_volume(p, level=5, timepoint=0)
    with pytest.raises(InputError, match="no channel named 'RFP'"):
        ngff_io.open_volume(p, channel="RFP", timepoint=0)
    with pytest.raises(InputError, match="timepoint 3 is out of range"):
        ngff_io.open_volume(p, timepoint=3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_reads_images_written_by_ome_zarr(tmp_path):
    pytest.importorskip("ome_zarr")
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    img = np.random.default_rng(0).integers(0, 99, (2, 4, 16, 16)).astype(np.uint16)
    for fmt, zf in ((FormatV04(), 2), (FormatV05(), 3)):
        path = str(tmp_path / f"ext{zf}.ome.zarr")
        root = zarr.group(store=parse_url(path, mode="w", fmt=fmt).store, zarr_format=zf)
        write_image(img, root, axes="czyx", fmt=fmt, scale_factors=[2], scale={"c": 1.0, "z": 2.0, "y": 0.5, "x": 0.5})
        v = ngff_io.open_volume(path, level=1, channel=1)
        assert v.level == "s1" and v.shape == (4, 8, 8)
        assert v.voxel_size.size == (2.0, 1.0, 1.0) and v.voxel_size.origin == (0.0, 0.25, 0.25)
        np.testing.assert_array_equal(ngff_io.open_volume(path, channel=1).array[...], img[1])


# --------------------------------------------------------------------------- downsampling kernel
def _mode_reference(block, f):
    out_shape = tuple(-(-s // x) for s, x in zip(block.shape, f))
    out = np.zeros(out_shape, block.dtype)
    for idx in np.ndindex(*out_shape):
        cell = block[tuple(slice(i * x, (i + 1) * x) for i, x in zip(idx, f))].ravel()
        cell = cell[cell != 0]
        if cell.size:
            vals, counts = np.unique(cell, return_counts=True)
            out[idx] = vals[counts == counts.max()].min()
    return out


@pytest.mark.parametrize("shape,f", [((7, 9, 10), (2, 2, 2)), ((5, 8), (2, 2)), ((6, 7, 9), (1, 2, 3)),
                                     ((3, 3, 3), (2, 2, 2))])
def test_downsample_mode_matches_brute_force(shape, f):
    rng = np.random.default_rng(sum(shape))
    block = rng.integers(0, 4, shape).astype(np.uint64) * np.uint64(2**40)  # large IDs survive
    out = pyramid.downsample_labels(block, f, "mode")
    assert out.dtype == block.dtype
    np.testing.assert_array_equal(out, _mode_reference(block, f))


def test_downsample_rules_ties_background_nearest():
    b = np.zeros((2, 2, 2), np.uint32)
    assert pyramid.downsample_labels(b, 2).tolist() == [[[0]]]
    b[0, 0, 0] = 9
    assert pyramid.downsample_labels(b, 2).item() == 9  # one voxel of foreground beats 7 of background
    b[...] = [[[5, 3], [3, 5]], [[0, 0], [0, 0]]]
    assert pyramid.downsample_labels(b, 2).item() == 3  # tie 2:2 -> smaller label
    nearest = pyramid.downsample_labels(np.arange(25).reshape(5, 5), 2, "nearest")
    np.testing.assert_array_equal(nearest, np.arange(25).reshape(5, 5)[::2, ::2])
    with pytest.raises(InputError, match="method"):
        pyramid.downsample_labels(b, 2, "mean")
    with pytest.raises(InputError, match="factor"):
        pyramid.downsample_labels(b, (2, 2))


# --------------------------------------------------------------------------- label metadata + pyramid
def _zattrs(path):
    p = os.path.join(path, ".zattrs")
    if os.path.exists(p):
        return json.load(open(p))
    return json.load(open(os.path.join(path, "zarr.json")))["attributes"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_in_group_labels_metadata_and_pyramid(tmp_path, fmt):
    img = tmp_path / "img.ome.zarr"
    _image(img, fmt)
    vol = ngff_io.open_volume(img)
    # another tool's label is already listed: it must be kept
    other, other0 = ngff.label_paths(img, "nuclei")
    storage.create_array(other0, vol.spatial_shape, (6, 10, 12), np.uint32, zarr_format=fmt)
    ngff_io.write_labels_metadata(other, vol.spatial_axes, vol.voxel_size, image_group=img)
    group, arr0 = ngff.label_paths(img, "cells")
    assert (group, arr0) == (str(img / "labels" / "cells"), str(img / "labels" / "cells" / "0"))
    lab = _labels(vol.spatial_shape)
    a = storage.create_array(arr0, lab.shape, (4, 4, 8), np.uint32, zarr_format=fmt,
                             **ngff.array_options(fmt, vol.spatial_axes))
    a[...] = lab
    ngff_io.write_labels_metadata(group, vol.spatial_axes, vol.voxel_size, image_group=img,
                                  colors={1: (255, 0, 0, 255)})
    shapes = pyramid.build_pyramid(group, 2)
    assert shapes == [(6, 10, 12), (3, 5, 6), (2, 3, 3)]
    assert ngff_io.labels_of(img) == ["nuclei", "cells"]
    attrs = _zattrs(group)
    meta = attrs["ome"] if fmt == 3 else attrs
    assert (meta.get("version") if fmt == 3 else meta["multiscales"][0]["version"]) == ("0.5" if fmt == 3 else "0.4")
    assert meta["image-label"]["source"] == {"image": "../../"}
    assert meta["image-label"]["colors"] == [{"label-value": 1, "rgba": [255, 0, 0, 255]}]
    ds = meta["multiscales"][0]["datasets"]
    assert [d["path"] for d in ds] == ["0", "1", "2"]
    assert ds[1]["coordinateTransformations"][0]["scale"] == [4.0, 1.0, 1.0]
    assert ds[2]["coordinateTransformations"][1]["translation"] == [3.0, 0.75, 0.75]
    # each level is the mode-downsample of the previous, whatever the chunking
    l1 = storage.open_array(os.path.join(group, "1"))[...]
    np.testing.assert_array_equal(l1, _mode_reference(lab, (2, 2, 2)))
    np.testing.assert_array_equal(storage.open_array(os.path.join(group, "2"))[...], _mode_reference(l1, (2, 2, 2)))
    assert storage.open_array(os.path.join(group, "1")).chunks == (3, 4, 6)
    lv = ngff_io.open_volume(group, level=2)
    assert lv.voxel_size.size == (8.0, 2.0, 2.0) and lv.axes == ("z", "y", "x")


def test_mirror_image_levels_with_floor_shapes(tmp_path):
    img = tmp_path / "img.ome.zarr"
    _image(img, 2, np.zeros((1, 5, 9, 11), np.uint16))
    lvl1 = storage.create_array(img / "1", (1, 5, 4, 5), (1, 5, 4, 5), np.uint16, **ngff.array_options(2, "czyx"))
    lvl1[...] = 0
    ngff_io.write_multiscales_metadata(img, "czyx", VS, n_levels=2, factor=(1, 2, 2))
    vol = ngff_io.open_volume(img, channel=0)
    group, arr0 = ngff.label_paths(img, "cells")
    lab = _labels(vol.spatial_shape, seed=4)
    storage.create_array(arr0, lab.shape, lab.shape, np.uint32, **ngff.array_options(2, "zyx"))[...] = lab
    ngff_io.write_labels_metadata(group, vol.spatial_axes, vol.voxel_size, image_group=img)
    assert pyramid.build_pyramid(group, like=img) == [(5, 9, 11), (5, 4, 5)]
    np.testing.assert_array_equal(storage.open_array(os.path.join(group, "1"))[...],
                                  _mode_reference(lab, (1, 2, 2))[:, :4, :5])
    ds = _zattrs(group)["multiscales"][0]["datasets"]
    assert ds[1]["coordinateTransformations"][0]["scale"] == [2.0, 1.0, 1.0]


def test_standalone_nearest_pyramid_keeps_origin(tmp_path):
    group, arr0 = ngff.standalone_label_paths(tmp_path / "lab.ome.zarr")
    lab = _labels((4, 8, 8), seed=2)
    storage.create_array(arr0, lab.shape, (4, 8, 8), np.uint32)[...] = lab
    ngff_io.write_labels_metadata(group, "zyx", volume.VoxelSize("zyx", (1, 1, 1), origin=(0, 5, 5)))
    pyramid.build_pyramid(group, 1, factor=(1, 2, 2), method="nearest")
    ds = _zattrs(group)["multiscales"][0]["datasets"]
    assert ds[1]["coordinateTransformations"][1]["translation"] == [0.0, 5.0, 5.0]
    np.testing.assert_array_equal(storage.open_array(os.path.join(group, "1"))[...], lab[:, ::2, ::2])


def test_label_path_and_metadata_errors(tmp_path):
    with pytest.raises(InputError, match="plain name"):
        ngff.label_paths(tmp_path, "a/b")
    g = tmp_path / "nometa.zarr"
    storage.create_array(g / "0", (4, 4), (4, 4), np.uint8)
    with pytest.raises(DistributedError, match="write_labels_metadata first"):
        pyramid.build_pyramid(g, 1)  # errors inside the collective are raised the same on every rank
    with pytest.raises(InputError, match="not inside"):
        ngff_io.write_labels_metadata(g, "yx", image_group=tmp_path / "elsewhere.zarr")
    with pytest.raises(InputError, match="n_levels"):
        pyramid.build_pyramid(g, -1)


# --------------------------------------------------------------------------- the ome-zarr reader's view
def _reader_nodes(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = {}
    for node in Reader(parse_url(str(path)))():
        specs = {type(s).__name__ for s in node.specs}
        scales = [c[0]["scale"] for c in node.metadata.get("coordinateTransformations", [])]
        out[str(node.zgroup.store_path) if hasattr(node, "zgroup") else str(node)] = (
            specs, [tuple(d.shape) for d in node.data], scales)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_ome_zarr_reader_sees_labels_in_group_and_standalone(tmp_path, fmt):
    pytest.importorskip("ome_zarr")
    img = tmp_path / "img.ome.zarr"
    _image(img, fmt)
    vol = ngff_io.open_volume(img, channel=0)
    lab = _labels(vol.spatial_shape, seed=1)
    for group, arr0, parent in (ngff.label_paths(img, "cells") + (img,),
                                ngff.standalone_label_paths(tmp_path / "cells.ome.zarr") + (None,)):
        storage.create_array(arr0, lab.shape, (3, 5, 6), np.uint32, zarr_format=fmt,
                             **ngff.array_options(fmt, vol.spatial_axes))[...] = lab
        ngff_io.write_labels_metadata(group, vol.spatial_axes, vol.voxel_size, image_group=parent)
        pyramid.build_pyramid(group, 1)
    nodes = list(_reader_nodes(img).values())
    assert nodes[0][0] == {"Multiscales"} and nodes[0][1] == [(2, 6, 10, 12)]
    assert any(n[0] == {"Labels"} for n in nodes)
    label_node = next(n for n in nodes if "Label" in n[0])
    assert label_node[0] == {"Label", "Multiscales"}
    assert label_node[1] == [(6, 10, 12), (3, 5, 6)]
    assert label_node[2] == [[2.0, 0.5, 0.5], [4.0, 1.0, 1.0]]
    standalone = list(_reader_nodes(tmp_path / "cells.ome.zarr").values())
    assert standalone[0][0] == {"Label", "Multiscales"} and standalone[0][1] == [(6, 10, 12), (3, 5, 6)]
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    data = [n for n in Reader(parse_url(str(tmp_path / "cells.ome.zarr")))()][0].data
    np.testing.assert_array_equal(np.asarray(data[0]), lab)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ome_zarr_models_validate_the_result(tmp_path, fmt):
    models = pytest.importorskip("ome_zarr_models")
    import zarr

    img = tmp_path / "img.ome.zarr"
    _image(img, fmt)
    vol = ngff_io.open_volume(img, channel=0)
    group, arr0 = ngff.label_paths(img, "cells")
    storage.create_array(arr0, vol.spatial_shape, (3, 5, 6), np.uint32, zarr_format=fmt,
                         **ngff.array_options(fmt, vol.spatial_axes))[...] = _labels(vol.spatial_shape)
    ngff_io.write_labels_metadata(group, vol.spatial_axes, vol.voxel_size, image_group=img)
    pyramid.build_pyramid(group, like=img)  # same number of levels as the image (NGFF requires it)
    assert type(models.open_ome_zarr(zarr.open_group(str(img), mode="r"))).__name__ == "Image"
    assert type(models.open_ome_zarr(zarr.open_group(group, mode="r"))).__name__ == "ImageLabel"


# --------------------------------------------------------------------------- pyramid under MPI
PYRAMID_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from mpi4py import MPI
    from mpicellpose.volumes import pyramid
    group, n = sys.argv[1], int(sys.argv[2])
    pyramid.build_pyramid(group, n, MPI.COMM_WORLD, factor=(1, 2, 2))
    if sys.argv[3:] == ["fail"]:
        pyramid.build_pyramid(group + "-missing", 1, MPI.COMM_WORLD)
""")


@pytest.mark.mpi
def test_build_pyramid_on_two_ranks_equals_serial(tmp_path):
    from conftest import run_mpi

    lab = _labels((5, 23, 19), seed=9, n=9)
    groups = []
    for name in ("serial", "mpi"):
        group, arr0 = ngff.standalone_label_paths(tmp_path / f"{name}.ome.zarr")
        storage.create_array(arr0, lab.shape, (5, 4, 4), np.uint32)[...] = lab
        ngff_io.write_labels_metadata(group, "zyx", VS)
        groups.append(group)
    pyramid.build_pyramid(groups[0], 3, factor=(1, 2, 2))
    script = tmp_path / "pyr.py"
    script.write_text(PYRAMID_SCRIPT)
    run_mpi(2, [script, groups[1], 3], timeout=120)
    for k in range(4):
        np.testing.assert_array_equal(storage.open_array(os.path.join(groups[0], str(k)))[...],
                                      storage.open_array(os.path.join(groups[1], str(k)))[...])
    ms = [_zattrs(g)["multiscales"][0] for g in groups]
    assert ms[0]["datasets"] == ms[1]["datasets"] and len(ms[0]["datasets"]) == 4
    proc = run_mpi(2, [script, groups[1], 1, "fail"], timeout=120, check=False)
    assert proc.returncode != 0 and "DistributedError" in proc.stderr and "rank(s) failed" in proc.stderr


def test_build_pyramid_reports_errors_as_distributed_on_one_rank(tmp_path):
    with pytest.raises(DistributedError, match="creating the pyramid levels"):
        pyramid.build_pyramid(tmp_path / "absent", 1)


def test_docstring_examples_run():
    import doctest

    from mpicellpose.volumes import convert

    for mod in (volume, storage, readers, ngff, ngff_io, pyramid, convert):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0, mod.__name__
