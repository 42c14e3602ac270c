"""mpicellpose preview: a PNG a person can look at, with outlines and block faces."""
import re

import numpy as np
import pytest
from scipy import ndimage

import cases
from mpicellpose import cli, distributed_eval
from mpicellpose.volumes.storage import numpy_array_to_zarr
from mpicellpose.tools.preview import outlines


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
    from mpicellpose.tools.preview import PALETTE, panel

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


def test_preview_image_shows_the_raw_image_under_the_outlines(tmp_path, monkeypatch):
    """``preview --image``: every slice panel shows the raw image's own plane in grey (R = G = B,
    brightness following the image) and the outlines in colour on top; without it, label colours."""
    pytest.importorskip("matplotlib")
    from mpicellpose.tools import preview

    from mpicellpose.synthetic.nuclei import make_nuclei

    img, _ = make_nuclei((20, 32, 30), seed=82, mean_diameter=10)  # textured: the grey levels must follow it
    numpy_array_to_zarr(tmp_path / "in.zarr", img, 10)
    distributed_eval(str(tmp_path / "in.zarr"), 10, tmp_path / "lab.zarr", backend="threshold",
                     backend_kwargs={"threshold": 600})
    seen = []
    real = preview.panel
    monkeypatch.setattr(preview, "panel", lambda l2, im=None, faces=None: seen.append((l2, im, real(l2, im, faces)))
                        or seen[-1][2])
    assert cli.main(["preview", str(tmp_path / "lab.zarr"), "--image", str(tmp_path / "in.zarr")]) == 0
    planes = [img[10], img[:, 16], img[:, :, 15]]  # the mid planes YX, ZX, ZY
    assert len(seen) == 4 and seen[3][1] is None  # + the max projection of the labels, without image
    for (lab2, im2, rgb), want in zip(seen[:3], planes):
        np.testing.assert_array_equal(im2, want)
        yy, xx = np.indices(lab2.shape)
        off_faces = (yy % 10 != 0) & (xx % 10 != 0)  # the block faces (blocks of 10) are drawn in yellow
        under = ~ndimage.binary_dilation(outlines(lab2)) & off_faces  # away from outlines and their dark rim
        grey = rgb[under]
        assert np.allclose(grey[:, 0], grey[:, 1]) and np.allclose(grey[:, 1], grey[:, 2])
        assert np.corrcoef(grey[:, 0], np.clip(want[under], *np.percentile(want, [1, 99.5])))[0, 1] > 0.99
        assert (rgb[outlines(lab2) & off_faces].max(axis=1) >= 0.8).all()  # coloured outlines on top
    seen.clear()
    assert cli.main(["preview", str(tmp_path / "lab.zarr"), "--out", str(tmp_path / "no-image.png")]) == 0
    lab2, im2, rgb = seen[0]
    yy, xx = np.indices(lab2.shape)
    under = ~ndimage.binary_dilation(outlines(lab2)) & (yy % 10 != 0) & (xx % 10 != 0)
    assert im2 is None and (rgb[under & (lab2 == 0)] == 0).all()  # black background
    inside = rgb[under & (lab2 > 0)]
    assert len(inside) and (inside.max(axis=1) - inside.min(axis=1) > 0.1).all()  # label colours, not grey


# Python's warning lines ("file.py:12: UserWarning: ..."), the source line it echoes, Cellpose's own
# logger (">>>> ..." stage messages, tqdm bars) and torch's TorchScript deprecations
LIBRARY_NOISE = re.compile(r"(User|Deprecation|Future|Runtime)Warning:|warnings\.warn\(|^\s*coo = torch|>>>>|"
                           r"torch\.jit|\d+%\|")


@pytest.mark.mpi
@pytest.mark.cellpose
def test_demo_runs_and_its_log_has_no_library_warnings(tmp_path):
    """What a first run shows a person (issue 14): ``mpiexec -n 2 mpicellpose demo`` reports its
    result, writes the preview, and prints nothing from the libraries (each of Cellpose's torch
    warnings used to appear once per rank)."""
    pytest.importorskip("cellpose")
    from conftest import run_mpi

    proc = run_mpi(2, ["-m", "mpicellpose", "demo", "--size", "32", "--out", tmp_path / "demo", "--threads", "1"],
                   timeout=400)
    log = proc.stdout + proc.stderr
    noise = [ln for ln in log.splitlines() if LIBRARY_NOISE.search(ln)]
    assert not noise, "\n".join(noise)
    assert re.search(r"F1 \(IoU 0\.5\) = [01]\.\d{3}", proc.stdout), proc.stdout
    assert (tmp_path / "demo" / "preview.png").read_bytes()[:4] == b"\x89PNG"
    # our own messages appear once, from rank 0 (rank-specific ones may name another rank)
    starts = [ln for ln in proc.stderr.splitlines() if "planning;" in ln]
    assert len(starts) == 1 and "[rank 0]" in starts[0]
