"""The whole pipeline on OME-Zarr and other inputs: labels inside the image (NGFF labels, with a
pyramid built by the ranks), standalone .ome.zarr output, voxel sizes, HDF5 and TIFF inputs."""
import numpy as np
import pytest
import zarr
from scipy import ndimage

import cases
from conftest import read_table, run_mpi
from mpicellpose import distributed_eval
from mpicellpose.volumes import ngff_io
from mpicellpose.synthetic.metrics import label_equivalent

T = ["--backend", "threshold", "--threshold", "100"]


def reader_nodes(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return [({type(s).__name__ for s in n.specs}, [tuple(d.shape) for d in n.data]) for n in
            Reader(parse_url(str(path)))()]


@pytest.mark.mpi
@pytest.mark.parametrize("fmt", [2, 3])
def test_segment_ome_zarr_into_the_image_with_pyramid(tmp_path, fmt):
    pytest.importorskip("ome_zarr")
    img = cases.blobs((24, 40, 36), 71)
    path = tmp_path / "img.ome.zarr"
    ngff_io.write_image(path, img, "zyx", voxel_size=(2.0, 0.5, 0.5), chunks=(8, 8, 12), zarr_format=fmt)
    proc = run_mpi(2, ["-m", "mpicellpose", "segment", path, "--labels-name", "cells", "--blocksize", "8,16,12",
                       "--pyramid", "2"] + T, timeout=180)
    lab = zarr.open(str(path / "labels" / "cells" / "0"), mode="r")
    assert label_equivalent(lab[...], ndimage.label(img > 100)[0])
    assert lab.attrs["mpicellpose"]["complete"] is True
    assert lab.attrs["mpicellpose"]["voxel_size"] == [2.0, 0.5, 0.5]
    # the table sits beside the image, centroids in physical units
    rows = read_table(tmp_path / "img.cells.objects.csv")
    assert np.allclose(rows["centroid_z_phys"], 2 * rows["centroid_z"], atol=1e-3)
    nodes = reader_nodes(path)
    label_nodes = [n for n in nodes if "Label" in n[0]]
    assert label_nodes and label_nodes[0][1][0] == (24, 40, 36) and len(label_nodes[0][1]) == 3
    # every pyramid level holds only labels of level 0 ('mode' never invents IDs)
    lvl1 = zarr.open(str(path / "labels" / "cells" / "1"), mode="r")[...]
    assert set(np.unique(lvl1)) <= set(np.unique(lab[...]))
    # re-running refuses nothing and changes nothing (our own output)
    again = run_mpi(1, ["-m", "mpicellpose", "segment", path, "--labels-name", "cells", "--blocksize", "8,16,12",
                        "--pyramid", "2"] + T, timeout=120)
    assert np.array_equal(zarr.open(str(path / "labels" / "cells" / "0"), mode="r")[...], lab[...])


def test_standalone_ome_output_and_other_labels_kept(tmp_path):
    pytest.importorskip("ome_zarr")
    img = cases.blobs((20, 24, 22), 72)
    src = tmp_path / "img.ome.zarr"
    ngff_io.write_image(src, img, "zyx", chunks=(10, 12, 11))
    lab, _ = distributed_eval(str(src), 10, tmp_path / "seg.ome.zarr", backend="threshold",
                              backend_kwargs={"threshold": 100}, pyramid=1)
    assert label_equivalent(lab[...], ndimage.label(img > 100)[0])
    assert (tmp_path / "seg.objects.csv").exists()
    nodes = reader_nodes(tmp_path / "seg.ome.zarr")
    assert any("Multiscales" in n[0] and len(n[1]) == 2 for n in nodes)
    # labels written into the image next to an existing label image keep it listed
    distributed_eval(str(src), 10, None, backend="threshold", backend_kwargs={"threshold": 100}, labels_name="a")
    distributed_eval(str(src), 10, None, backend="threshold", backend_kwargs={"threshold": 50}, labels_name="b")
    assert sorted(ngff_io.labels_of(src)) == ["a", "b"]


def test_hdf5_and_tiff_inputs(tmp_path):
    h5py = pytest.importorskip("h5py")
    import tifffile

    img = cases.blobs((16, 30, 26), 73)
    ref = ndimage.label(img > 100)[0]
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("/raw/vol", data=img, chunks=(8, 10, 13))
    tifffile.imwrite(tmp_path / "v.tif", img)
    a, _ = distributed_eval(f"{tmp_path}/v.h5:/raw/vol", 9, tmp_path / "a.zarr", backend="threshold",
                            backend_kwargs={"threshold": 100})
    b, _ = distributed_eval(str(tmp_path / "v.tif"), 9, tmp_path / "b.zarr", backend="threshold",
                            backend_kwargs={"threshold": 100})
    assert label_equivalent(a[...], ref) and np.array_equal(a[...], b[...])


def test_foreign_label_group_is_not_replaced(tmp_path):
    img = cases.blobs((12, 16, 16), 74)
    src = tmp_path / "img.ome.zarr"
    ngff_io.write_image(src, img, "zyx")
    (src / "labels" / "theirs").mkdir(parents=True)
    (src / "labels" / "theirs" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="was not made by mpicellpose"):
        distributed_eval(str(src), 8, None, backend="threshold", backend_kwargs={"threshold": 100},
                         labels_name="theirs")
    assert (src / "labels" / "theirs" / "keep.txt").read_text() == "precious"
