"""PNG previews of a label volume: orthogonal mid-planes with label outlines (and the image
underneath when given), plus a max projection; a quick look at seams without napari.

``mpicellpose preview LABELS [--image INPUT] [--out preview.png] [--blocksize N]``
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from .errors import needs

log = logging.getLogger(__name__)


def outlines(labels2d: np.ndarray) -> np.ndarray:
    """Boolean mask of pixels on a label's boundary (against background or another label)."""
    lab = np.asarray(labels2d)
    fg = lab > 0
    edge = np.zeros(lab.shape, bool)
    for axis in range(lab.ndim):
        d = np.diff(lab, axis=axis) != 0
        lo = [slice(None)] * lab.ndim
        hi = [slice(None)] * lab.ndim
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        edge[tuple(lo)] |= d
        edge[tuple(hi)] |= d
    return edge & fg


def _colour(labels2d):
    """Pseudo-random, stable colour per label ID (0 -> black)."""
    lab = np.asarray(labels2d).astype(np.uint64)
    h = (lab * np.uint64(2654435761)) & np.uint64(0xFFFFFF)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(255) for s in (16, 8, 0)], axis=-1).astype(np.float64) / 255
    rgb = 0.35 + 0.65 * rgb
    rgb[lab == 0] = 0
    return rgb


def _norm(img):
    img = np.asarray(img, dtype=np.float64)
    lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
    return np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def panel(labels2d, image2d=None, face_lines=None):
    """RGB image: the image in grey (or label colours at low alpha) with coloured outlines."""
    lab = np.asarray(labels2d)
    if image2d is not None:
        base = np.repeat(_norm(image2d)[..., None], 3, axis=-1)
    else:
        base = 0.45 * _colour(lab)
    out = base.copy()
    edge = outlines(lab)
    out[edge] = _colour(lab)[edge]
    if face_lines:
        for axis, coords in face_lines.items():
            for c in coords:
                sl = [slice(None), slice(None)]
                sl[axis] = slice(c, c + 1)
                out[tuple(sl)] = 0.5 * out[tuple(sl)] + 0.5 * np.array([1.0, 1.0, 0.0])
    return out


def write_preview(labels, path, image=None, blocksize=None, title=None) -> str:
    """Write a PNG with mid-planes (YX, ZX, ZY for 3D) and a max projection of the labels.

    Parameters
    ----------
    labels : array-like (2D or 3D)
    path : str
        PNG file to write.
    image : array-like, optional
        The raw image (same spatial shape), shown in grey under the outlines.
    blocksize : tuple of int, optional
        Draw the block faces (yellow) so seams can be checked.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise needs("matplotlib", "viz") from None
    lab = labels
    shape = tuple(lab.shape)
    nd = len(shape)
    bs = tuple(blocksize) if blocksize is not None else None

    def faces(axes):
        if bs is None:
            return None
        return {i: list(range(bs[a], shape[a], bs[a])) for i, a in enumerate(axes)}

    panels = []
    if nd == 2:
        l2 = np.asarray(lab[...])
        im = None if image is None else np.asarray(image[...])
        panels.append(("labels", panel(l2, im, faces((0, 1)))))
    else:
        mid = [s // 2 for s in shape]
        views = [("YX, z=%d" % mid[0], (slice(mid[0], mid[0] + 1), slice(None), slice(None)), (1, 2)),
                 ("ZX, y=%d" % mid[1], (slice(None), slice(mid[1], mid[1] + 1), slice(None)), (0, 2)),
                 ("ZY, x=%d" % mid[2], (slice(None), slice(None), slice(mid[2], mid[2] + 1)), (0, 1))]
        for name, sl, axes in views:
            l2 = np.squeeze(np.asarray(lab[sl]))
            im = None if image is None else np.squeeze(np.asarray(image[sl]))
            panels.append((name, panel(l2, im, faces(axes))))
        full = np.asarray(lab[...])
        proj = full.max(axis=0)
        panels.append(("max projection (z)", panel(proj, None, faces((1, 2)))))
    fig, axs = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, rgb) in zip(axs[0], panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def register(sub) -> None:
    p = sub.add_parser("preview", help="write a PNG preview of a label volume (mid-planes with outlines)",
                       description="Write orthogonal mid-planes with label outlines (over the image when given) "
                                   "and a max projection, with block faces drawn, to check seams by eye.")
    p.add_argument("labels", help="label zarr array")
    p.add_argument("--image", default=None, help="input zarr array shown under the outlines")
    p.add_argument("--dataset", default=None, help="array inside an --image zarr group")
    p.add_argument("--out", default=None, help="PNG path (default LABELS stem + .preview.png)")
    p.add_argument("--blocksize", default=None, help="draw block faces every N|Z,Y,X voxels (default: the label chunks)")
    p.set_defaults(func=main)


def main(args) -> int:
    import sys

    from . import io as mio
    from .driver import output_stem
    from .geometry import per_axis

    try:
        lab = mio.open_input(args.labels, what="labels")
        img = mio.open_input(args.image, args.dataset, what="image") if args.image else None
        if img is not None and tuple(img.shape) != tuple(lab.shape):
            raise ValueError(f"image shape {tuple(img.shape)} differs from labels shape {tuple(lab.shape)}")
        bs = per_axis(args.blocksize, len(lab.shape), "blocksize", minimum=1) if args.blocksize else \
            tuple(getattr(lab, "chunks", None) or ()) or None
        out = args.out or output_stem(args.labels) + ".preview.png"
        write_preview(lab, out, img, bs, title=str(args.labels))
    except Exception as exc:
        sys.stderr.write(f"mpicellpose: error: {exc}\n")
        return 1
    sys.stdout.write(f"preview written to {out}\n")
    return 0
