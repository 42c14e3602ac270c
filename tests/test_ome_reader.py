"""What napari's OME-Zarr reader sees (issue 14): a 2D and a 3D output of ``segment``, written inside
the OME-Zarr image (``labels/NAME``) and as a standalone ``.ome.zarr``, open with the ``ome-zarr``
Python reader (``ome_zarr.reader.Reader`` over ``ome_zarr.io.parse_url``, which the
``napari-ome-zarr`` plugin uses) as a *label* image with the run's shape, dtype, voxel size and
values.  ``ome-zarr`` is in the ``test`` extra (setup.cfg)."""
import numpy as np
import pytest
import zarr

from mpicellpose import cli
from mpicellpose.volumes import ngff_io

ome_zarr = pytest.importorskip("ome_zarr")

CASES = {  # name: (spatial axes, shape, voxel size, blocksize)
    "2d": ("yx", (40, 36), (0.5, 0.25), "20,18"),
    "3d": ("zyx", (12, 40, 36), (2.0, 0.5, 0.5), "6,20,18"),
}


def _nodes(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    reader = Reader(parse_url(str(path)))
    return list(reader())


def _image(tmp_path, name):
    axes, shape, vs, _ = CASES[name]
    rng = np.random.default_rng(3)
    img = (rng.random(shape) > 0.7).astype(np.uint16) * 500 + 100
    path = tmp_path / f"{name}.ome.zarr"
    ngff_io.write_image(path, img, axes, voxel_size=vs)
    return path, img


def _check_label_node(node, lab, vs):
    specs = {type(s).__name__ for s in node.specs}
    assert "Label" in specs and "Multiscales" in specs, specs
    level0 = node.data[0]
    assert tuple(level0.shape) == lab.shape and np.dtype(level0.dtype) == np.uint32
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx(list(vs))
    np.testing.assert_array_equal(np.asarray(level0), lab)
    assert node.metadata.get("name") or node.metadata.get("axes")  # something napari can title / place


@pytest.mark.parametrize("name", sorted(CASES))
def test_segment_output_opens_as_a_label_image(tmp_path, name):
    axes, shape, vs, bs = CASES[name]
    src, img = _image(tmp_path, name)
    args = ["--backend", "threshold", "--threshold", "300", "--blocksize", bs]
    # 1) inside the image, as labels/cells (napari shows it over the image)
    assert cli.main(["segment", str(src), "--labels-name", "cells"] + args) == 0
    inside = zarr.open(str(src / "labels" / "cells" / "0"), mode="r")[...]
    assert inside.max() > 3
    nodes = _nodes(src)
    assert {type(s).__name__ for s in nodes[0].specs} == {"Multiscales"}  # the image comes first
    label_nodes = [n for n in nodes if "Label" in {type(s).__name__ for s in n.specs}]
    assert len(label_nodes) == 1
    _check_label_node(label_nodes[0], inside, vs)
    # 2) a standalone label image
    out = tmp_path / f"{name}-cells.ome.zarr"
    assert cli.main(["segment", str(src), str(out)] + args) == 0
    standalone = _nodes(out)
    assert len(standalone) == 1
    _check_label_node(standalone[0], inside, vs)
