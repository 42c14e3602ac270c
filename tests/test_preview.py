"""mpicellpose preview: a PNG a person can look at, with outlines and block faces."""
import numpy as np
import pytest
from scipy import ndimage

import cases
from mpicellpose import cli, distributed_eval
from mpicellpose.storage import numpy_array_to_zarr
from mpicellpose.preview import outlines


def test_outlines_mark_label_borders_only():
    lab = np.zeros((6, 6), int)
    lab[1:5, 1:3] = 1
    lab[1:5, 3:5] = 2
    edge = outlines(lab)
    assert edge[1, 1] and edge[2, 2] and edge[2, 3] and not edge[0, 0]
    assert not edge[lab == 0].any()


def test_preview_command_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    img = cases.blobs((20, 32, 30), 81)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, 10)
    distributed_eval(str(tmp_path / "in.zarr"), 10, tmp_path / "lab.zarr", backend="threshold",
                     backend_kwargs={"threshold": 100})
    assert cli.main(["preview", str(tmp_path / "lab.zarr"), "--image", str(tmp_path / "in.zarr")]) == 0
    png = tmp_path / "lab.preview.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
    import matplotlib.image as mpimg

    pix = mpimg.imread(str(png))
    assert pix.shape[1] > 3 * pix.shape[0]  # four panels side by side
    assert cli.main(["preview", str(tmp_path / "lab.zarr"), "--image", str(tmp_path / "nope.zarr")]) == 1


def test_preview_reads_a_tiff_image_and_titles_count_grid_and_scale(tmp_path, capsys, monkeypatch):
    """segment reads TIFF, so preview does too: --image my.tif (and TIFF labels)."""
    pytest.importorskip("matplotlib")
    tifffile = pytest.importorskip("tifffile")
    import matplotlib.figure

    img = cases.blobs((20, 32, 30), 81)
    tif = tmp_path / "my.tif"
    tifffile.imwrite(tif, img, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"},
                     resolution=(1 / 0.5, 1 / 0.5))
    lab_path = tmp_path / "lab.zarr"
    assert cli.main(["segment", str(tif), str(lab_path), "--backend", "threshold", "--threshold", "100",
                     "--blocksize", "10,16,15"]) == 0
    import zarr

    n = zarr.open(str(lab_path), mode="r").attrs["mpicellpose"]["n_objects"]
    titles = []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, **kw: (titles.append(t), real(self, t, **kw))[1])
    capsys.readouterr()
    assert cli.main(["preview", str(lab_path), "--image", str(tif)]) == 0, capsys.readouterr().err
    assert (tmp_path / "lab.preview.png").read_bytes()[:4] == b"\x89PNG"
    # the run's blocks (not guessed), the object count and the TIFF's voxel size
    assert titles[-1] == (f"{lab_path}\n{n} objects | blocks 10 x 16 x 15, grid 2 x 2 x 2 | "
                          "voxel 2 x 0.5 x 0.5 µm")

    labels = np.asarray(zarr.open(str(lab_path), mode="r")[...])
    tifffile.imwrite(tmp_path / "lab2.tif", labels)
    assert cli.main(["preview", str(tmp_path / "lab2.tif"), "--image", str(tif), "--blocksize", "10"]) == 0
    assert (tmp_path / "lab2.preview.png").read_bytes()[:4] == b"\x89PNG"
    assert titles[-1].endswith(f"{n} objects | blocks 10 x 10 x 10, grid 2 x 4 x 3 | voxel 2 x 0.5 x 0.5 µm")
    err = capsys.readouterr().err
    assert "not a readable zarr" not in err
    assert cli.main(["preview", str(lab_path), "--image", str(tmp_path / "nope.tif")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_outlines_keep_their_colour_on_bright_nuclei():
    from mpicellpose.preview import PALETTE, panel

    assert (PALETTE.min(axis=1) <= 0.1).all()  # saturated: never white, grey or beige
    lab = np.zeros((12, 12), int)
    lab[2:10, 2:6] = 1
    lab[2:10, 6:10] = 2
    rgb = panel(lab, np.ones(lab.shape))  # a uniformly bright image: the worst case
    edge = outlines(lab)
    assert (rgb[edge].min(axis=1) <= 0.1).all() and (rgb[edge].max(axis=1) >= 0.8).all()
    halo = ndimage.binary_dilation(edge) & ~edge
    assert halo.any() and (rgb[halo].max(axis=1) <= 0.2).all()  # dark rim around each outline
    assert not np.array_equal(rgb[3, 2], rgb[3, 9])  # neighbouring labels: different colours
