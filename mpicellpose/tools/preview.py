"""PNG previews of a label volume: orthogonal mid-planes with label outlines (and the image
underneath when given), plus a max projection; a quick look at seams without napari.

``mpicellpose preview LABELS [--image INPUT] [--out preview.png] [--blocksize N]``
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from ..errors import needs

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


#: Outline colours: saturated hues only (every colour has a channel at or near 0), so that no
#: outline is white, grey or beige and none disappears on a bright nucleus; yellow is left out
#: because block faces are drawn in yellow.  Outlines also get a dark halo (see :func:`panel`).
PALETTE = np.array([
    (1.00, 0.10, 0.10),  # red
    (1.00, 0.50, 0.00),  # orange
    (0.55, 0.90, 0.00),  # lime
    (0.00, 0.80, 0.20),  # green
    (0.00, 0.80, 0.85),  # cyan
    (0.00, 0.55, 1.00),  # azure
    (0.10, 0.25, 1.00),  # blue
    (0.55, 0.10, 1.00),  # violet
    (1.00, 0.00, 1.00),  # magenta
    (1.00, 0.00, 0.50),  # rose
])


def _colour(labels2d):
    """Stable colour per label ID from :data:`PALETTE` (0 -> black); consecutive IDs, which
    segment gives to nearby objects, never share a colour (golden-ratio steps round the palette)."""
    lab = np.asarray(labels2d)
    step = np.mod(lab.astype(np.float64) * 0.6180339887498949, 1.0)
    rgb = PALETTE[np.minimum((step * len(PALETTE)).astype(np.intp), len(PALETTE) - 1)]
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
    # a dark halo one pixel wide on both sides of each outline: the colour stands out on
    # bright and on dark image regions alike
    halo = ndimage.binary_dilation(edge) & ~edge
    out[halo] *= 0.15
    out[edge] = _colour(lab)[edge]
    if face_lines:
        for axis, coords in face_lines.items():
            for c in coords:
                sl = [slice(None), slice(None)]
                sl[axis] = slice(c, c + 1)
                out[tuple(sl)] = 0.5 * out[tuple(sl)] + 0.5 * np.array([1.0, 1.0, 0.0])
    return out


def _fmt_size(values, sep=" x ") -> str:
    return sep.join(f"{v:g}" for v in values)


_UNIT_SHORT = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m",
               "angstrom": "Å"}


def details_line(n_objects, shape, blocksize=None, blocks_are="blocks", voxel_size=None, voxel_unit=None) -> str:
    """The facts under a preview's title: object count, block grid and voxel size.

    Examples
    --------
    >>> details_line(477, (160, 160, 160), (80, 160, 160), voxel_size=(2, 0.5, 0.5), voxel_unit="micrometer")
    '477 objects | blocks 80 x 160 x 160, grid 2 x 1 x 1 | voxel 2 x 0.5 x 0.5 µm'
    >>> details_line(1, (10, 12), voxel_size=None)
    '1 object | no block grid recorded | voxel size unknown'
    """
    parts = [f"{n_objects} object{'' if n_objects == 1 else 's'}"]
    if blocksize:
        grid = [-(-int(s) // int(b)) for s, b in zip(shape, blocksize)]
        parts.append(f"{blocks_are} {_fmt_size(blocksize)}, grid {_fmt_size(grid)}")
    else:
        parts.append("no block grid recorded")
    if voxel_size:
        unit = _UNIT_SHORT.get(str(voxel_unit), voxel_unit) if voxel_unit and voxel_unit != "voxel" else ""
        parts.append(f"voxel {_fmt_size(voxel_size)}" + (f" {unit}" if unit else " (no unit)"))
    else:
        parts.append("voxel size unknown")
    return " | ".join(parts)


def _projection_and_count(lab, slab: int = 64):
    """Max projection along axis 0 and the number of distinct non-zero labels, reading
    ``slab`` planes at a time (never the whole volume at once)."""
    shape = tuple(lab.shape)
    proj = None
    ids = np.zeros(0, dtype=np.uint64)
    for z0 in range(0, shape[0], slab):
        part = np.asarray(lab[z0:z0 + slab])
        m = part.max(axis=0)
        proj = m if proj is None else np.maximum(proj, m)
        ids = np.union1d(ids, np.unique(part).astype(np.uint64))
    return proj, int(np.count_nonzero(ids))


def write_preview(labels, path, image=None, blocksize=None, title=None, *, n_objects=None, voxel_size=None,
                  voxel_unit=None, blocks_are="blocks") -> str:
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
    title : str, optional
        First line of the figure title; a second line gives the object count, the block grid
        and the voxel size (:func:`details_line`).
    n_objects : int, optional
        Object count for the title (default: counted in the labels).
    voxel_size, voxel_unit : sequence of float, str, optional
        Physical voxel size per axis, shown in the title.
    blocks_are : str
        What ``blocksize`` is, for the title: ``"blocks"`` (a run's blocks) or ``"chunks"``.
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

    def aspect(axes):  # pixel height / width, so that a ZX plane shows anisotropic voxels to scale
        if not voxel_size or len(voxel_size) != nd:
            return 1.0
        return float(voxel_size[axes[0]]) / float(voxel_size[axes[1]])

    panels = []
    if nd == 2:
        l2 = np.asarray(lab[...])
        im = None if image is None else np.asarray(image[...])
        panels.append(("labels", panel(l2, im, faces((0, 1))), aspect((0, 1))))
        counted = int(np.count_nonzero(np.unique(l2)))
    else:
        mid = [s // 2 for s in shape]
        views = [("YX, z=%d" % mid[0], (slice(mid[0], mid[0] + 1), slice(None), slice(None)), (1, 2)),
                 ("ZX, y=%d" % mid[1], (slice(None), slice(mid[1], mid[1] + 1), slice(None)), (0, 2)),
                 ("ZY, x=%d" % mid[2], (slice(None), slice(None), slice(mid[2], mid[2] + 1)), (0, 1))]
        for name, sl, axes in views:
            l2 = np.squeeze(np.asarray(lab[sl]))
            im = None if image is None else np.squeeze(np.asarray(image[sl]))
            panels.append((name, panel(l2, im, faces(axes)), aspect(axes)))
        proj, counted = _projection_and_count(lab)
        panels.append(("max projection (z)", panel(proj, None, faces((1, 2))), aspect((1, 2))))
    fig, axs = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, rgb, pixel_aspect) in zip(axs[0], panels):
        ax.imshow(rgb, interpolation="nearest", aspect=pixel_aspect)
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    info = details_line(counted if n_objects is None else int(n_objects), shape, bs, blocks_are, voxel_size,
                        voxel_unit)
    fig.suptitle(f"{title}\n{info}" if title else info, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.88))  # room for the two title lines
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _base_array(arr):
    """The stored array under lazy views (where a zarr array keeps its attributes)."""
    while hasattr(arr, "base") and hasattr(arr, "fixed"):
        arr = arr.base
    return arr


def _run_record(vol) -> dict:
    """attrs['mpicellpose'] of a label array written by segment ({} otherwise)."""
    try:
        rec = dict(getattr(_base_array(vol.array), "attrs", {}).get("mpicellpose", {}) or {})
    except Exception:  # attributes unreadable: the preview works without them
        return {}
    return rec


def _open(spec, what, dataset=None, **options):
    from ..volumes import readers
    from ..errors import InputError

    options = {k: v for k, v in options.items() if v is not None}
    try:
        return readers.open_volume_spec(spec, dataset, **options)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def _display_image(vol, shape):
    """The image volume as an array of the labels' spatial shape (first channel if several)."""
    from ..volumes.volume import AxisView

    arr = vol.array
    if vol.channel_axis is not None:
        n = int(arr.shape[vol.channel_axis])
        log.warning("the image has %d channels; showing channel 0 (choose another with --channel)", n)
        arr = AxisView(arr, {vol.channel_axis: 0})
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"image shape {tuple(arr.shape)} differs from labels shape {tuple(shape)}")
    return arr


def default_png(labels) -> str:
    """Where the preview of ``labels`` goes without ``--out``: next to it, with its extension
    replaced by ``.preview.png`` (an HDF5 ``:/dataset`` and glob patterns dropped).

    Examples
    --------
    >>> default_png("run/labels.zarr"), default_png("seg.ome.tif"), default_png("seg.h5:/labels/nuclei")
    ('run/labels.preview.png', 'seg.preview.png', 'seg.preview.png')
    >>> default_png("tiles/lab_*.tif")
    'tiles/labels.preview.png'

    Labels inside a zarr container (such as an OME-Zarr image's ``labels/NAME``) get their
    preview next to the container, not inside it:

    >>> default_png("data/embryo.ome.zarr/labels/nuclei")
    'data/embryo.nuclei.preview.png'
    """
    import os

    from ..volumes.readers import parse_hdf5_spec

    s = str(labels).rstrip("/")
    h5 = parse_hdf5_spec(s)
    if h5 is not None:
        s = h5[0]
    parts = s.split("/")
    inner = [i for i, part in enumerate(parts[:-1]) if part.lower().endswith((".zarr", ".n5"))]
    if inner:
        rest = [part for part in parts[inner[0] + 1:] if part]
        if rest and rest[0] == "labels" and len(rest) > 1:
            rest = rest[1:]
        container = default_png("/".join(parts[:inner[0] + 1]))[: -len(".preview.png")]
        return f"{container}.{'.'.join(rest)}.preview.png"
    if any(ch in os.path.basename(s) for ch in "*?["):
        return os.path.join(os.path.dirname(s), "labels.preview.png")
    low = s.lower()
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".hdf5", ".h5",
                   ".hdf", ".he5", ".nxs", ".n5"):
        if low.endswith(suffix):
            return s[: -len(suffix)] + ".preview.png"
    return s + ".preview.png"


def render_preview(labels, out=None, *, image=None, dataset=None, level=None, channel=None, timepoint=None,
                   tile_pattern=None, blocksize=None) -> str:
    """Write the PNG preview of the label volume ``labels`` (any input segment reads) to ``out``
    (default :func:`default_png`), over ``image`` when given; returns the PNG path.

    Block faces are drawn every ``blocksize`` voxels, else at the blocks of the run that wrote
    the labels, else at the label chunks.  The title gives the object count (when the run that
    wrote the labels finished), the block grid and the voxel size (from the files, else from the
    run's record).  ``dataset``, ``channel``, ``timepoint`` and ``tile_pattern`` select the image;
    ``level`` the OME-Zarr level of both.
    """
    from ..grid.geometry import per_axis

    vols = []
    try:
        lab_vol = _open(labels, "labels", level=level)
        vols.append(lab_vol)
        if lab_vol.channel_axis is not None:
            raise ValueError(f"labels {labels!r} have a channel axis (axes {lab_vol.axes}); give one label "
                             "volume")
        lab = lab_vol.array
        img = None
        img_vol = None
        if image:
            from ..config import channel_selection

            channel = channel_selection(channel)  # "1" -> 1; of "1,0" (segment's syntax) the first is shown
            channel = channel[0] if isinstance(channel, tuple) else channel
            img_vol = _open(image, "image", dataset, level=level, channel=channel,
                            timepoint=timepoint, tile_pattern=tile_pattern)
            vols.append(img_vol)
            img = _display_image(img_vol, lab.shape)
        record = _run_record(lab_vol)
        nd = len(lab.shape)
        blocks_are = "blocks"
        if blocksize:
            bs = per_axis(blocksize, nd, "blocksize", minimum=1)
        elif record.get("blocksize") and len(record["blocksize"]) == nd:
            bs = tuple(int(b) for b in record["blocksize"])
        else:
            bs = tuple(getattr(lab, "chunks", None) or ()) or None
            blocks_are = "chunks"
        known = []  # (size, unit) from the files: labels first, then the image
        for v in (lab_vol, img_vol):
            if v is not None and v.voxel_size is not None and len(v.voxel_size.size) == nd:
                units = {u for u in v.voxel_size.units if u}
                known.append((tuple(v.voxel_size.size), units.pop() if len(units) == 1 else None))
        voxel, unit = next((k for k in known if k[1]), known[0] if known else (None, None))
        if voxel is None and record.get("voxel_size"):
            voxel, unit = tuple(record["voxel_size"]), record.get("voxel_unit")
        n_objects = record.get("n_objects") if record.get("complete") else None
        out = out or default_png(labels)
        write_preview(lab, out, img, bs, title=str(labels), n_objects=n_objects, voxel_size=voxel,
                      voxel_unit=unit, blocks_are=blocks_are)
    finally:
        for v in vols:
            v.close()
    return out
