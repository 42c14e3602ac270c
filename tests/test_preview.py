"""mpicellpose preview: a PNG a person can look at, with outlines and block faces."""
import numpy as np
import pytest

import cases
from mpicellpose import cli, distributed_eval
from mpicellpose.io import numpy_array_to_zarr
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
