"""2D images in the common picture formats (PNG, JPEG, BMP, GIF, WebP), read with Pillow.

A picture is small: it is read whole.  A grey picture is one channel; a colour picture keeps its
colour channels as a channel axis (``Y, X, C``: 0 red, 1 green, 2 blue; an alpha channel is
dropped), except when they are all equal (a grey image saved as RGB), which is one channel.  A
one-channel model then needs ``--channel`` to say which colour holds the stain (see
:mod:`mpicellpose.cellpose.model_channels`), as Cellpose's own "channel to segment" does.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError, needs
from .volume import make_volume

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_image(path: str) -> np.ndarray:
    """The picture's pixels: (Y, X) or (Y, X, C) without alpha, in the file's own integer type."""
    try:
        from PIL import Image
    except ImportError:
        raise needs("Pillow") from None
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            arr = np.asarray(im)
            mode = im.mode
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the image {path!r}: {exc}") from None
    if arr.ndim == 3 and mode in ("RGBA", "LA"):
        arr = arr[..., :-1]  # the alpha channel is not data
    if arr.ndim == 3 and (arr.shape[-1] == 1 or all(np.array_equal(arr[..., 0], arr[..., c])
                                                    for c in range(1, arr.shape[-1]))):
        arr = arr[..., 0]  # a grey picture stored with colour channels
    return np.ascontiguousarray(arr)


def open_image(path: str, axes, sel):
    """A :class:`~mpicellpose.volumes.volume.Volume` over the picture at ``path``."""
    arr = read_image(path)
    if axes is None:
        axes = ("y", "x", "c") if arr.ndim == 3 else ("y", "x")
    return make_volume(arr, axes, **sel, kind="image", source=path)
