"""2D pictures (PNG, JPEG, ...), the most common 2D formats of Cellpose users: read as they are (grey: one
channel; colour: a channel axis; alpha dropped), segmented and converted like any other input."""
from __future__ import annotations

import numpy as np
import pytest

from mpicellpose import cli, distributed_eval
from mpicellpose.errors import InputError
from mpicellpose.synthetic.metrics import label_equivalent
from mpicellpose.volumes.readers import input_kind, open_volume_spec

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    g = np.zeros((60, 80), np.uint8)
    g[5:20, 5:30] = 200
    g[30:55, 40:75] = 120
    Image.fromarray(g).save(d / "grey.png")
    Image.fromarray(np.stack([g] * 3, -1)).save(d / "grey_rgb.png")
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., 1], rgba[..., 2], rgba[..., 3] = g, g // 2, 255
    Image.fromarray(rgba).save(d / "colour.png")
    Image.fromarray(g).save(d / "grey.jpg", quality=100)
    Image.fromarray((g.astype(np.uint16) * 200)).save(d / "deep.png")  # 16-bit grey
    (d / "noext").write_bytes((d / "grey.png").read_bytes())
    return d, g


def test_pictures_open_as_volumes(pictures):
    d, g = pictures
    for name, shape, axes in (("grey.png", (60, 80), ("y", "x")), ("grey_rgb.png", (60, 80), ("y", "x")),
                              ("colour.png", (60, 80, 3), ("y", "x", "c")), ("noext", (60, 80), ("y", "x"))):
        vol = open_volume_spec(str(d / name))
        assert (vol.kind, vol.shape, vol.axes) == ("image", shape, axes), name
    assert np.array_equal(open_volume_spec(str(d / "grey.png")).array[...], g)
    colour = open_volume_spec(str(d / "colour.png"))
    assert colour.channel_axis == 2 and np.array_equal(colour.array[..., 1], g)  # alpha dropped
    assert open_volume_spec(str(d / "deep.png")).array[...].max() == 200 * 200
    assert np.abs(open_volume_spec(str(d / "grey.jpg")).array[...].astype(int) - g).max() <= 3
    assert input_kind(str(d / "grey.jpg")) == "image"
    with pytest.raises(InputError, match="does not apply to the image file"):
        open_volume_spec(str(d / "grey.png"), dataset="x")


def test_a_picture_is_segmented_and_converted(pictures, tmp_path, capsys):
    d, g = pictures
    labels, _ = distributed_eval(str(d / "grey.png"), 32, str(tmp_path / "a.zarr"), backend="threshold",
                                 backend_kwargs={"threshold": 100})
    from scipy import ndimage

    assert label_equivalent(labels[...], ndimage.label(g > 100)[0])
    assert cli.main(["segment", str(d / "colour.png"), str(tmp_path / "b.zarr"), "--channel", "1", "--backend",
                     "threshold", "--threshold", "100", "--blocksize", "32"]) == 0
    assert cli.main(["convert", str(d / "colour.png"), str(tmp_path / "c.zarr")]) == 0
    import zarr

    assert zarr.open(str(tmp_path / "c.zarr"), mode="r").shape == (60, 80, 3)


def test_a_colour_picture_with_a_one_channel_model_asks_which_colour(pictures, tmp_path, capsys):
    d, _ = pictures
    rc = cli.main(["segment", str(d / "colour.png"), str(tmp_path / "o.zarr"), "--model", "demo"])
    err = capsys.readouterr().err
    assert rc == 1 and "colour picture: channel 0 red, 1 green, 2 blue" in err and "--channel 0" in err, err
