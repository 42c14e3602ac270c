"""TIFF inputs: single files (also OME-TIFF / ImageJ hyperstacks), stacks of slices and grids
of tiles, opened lazily through tifffile's zarr interface (:func:`mpicellpose.volumes.readers.open_volume_spec`
chooses them)."""
from __future__ import annotations

import glob as _glob
import logging
import os
import re

from ..errors import InputError, InputNotFoundError, needs
from .storage import zarr_module
from .volume import VoxelSize, make_volume

log = logging.getLogger(__name__)

DEFAULT_TILE_PATTERN = r"_(Z)(\d+)(Y)(\d+)(X)(\d+)"


def wrap_folder_of_tiffs(filename_pattern=None, block_index_pattern=r"_(Z)(\d+)(Y)(\d+)(X)(\d+)", *,
                        filname_pattern=None):
    r"""A virtual zarr array over a grid of TIFF tiles, without copying the data.

    ``filname_pattern`` is accepted for ``filename_pattern``: the reference's documentation spells it so.

    Uses tifffile's ``FileSequence`` zarr interface: files matching the glob
    ``filename_pattern`` are placed on a grid by the indices that ``block_index_pattern``
    (a regular expression with axis-name / index group pairs) extracts from their names,
    and the grid axes are tiled with the tiles' own axes (``axestiled``), as in the
    reference.

    Returns
    -------
    zarr array (read-only) over all tiles, shape = grid shape * tile shape.

    Examples
    --------
    >>> import tempfile, os, tifffile
    >>> import numpy as np
    >>> d = tempfile.mkdtemp()
    >>> for y in range(2):
    ...     for x in range(3):
    ...         tifffile.imwrite(os.path.join(d, f"t_Y{y}X{x}.tif"), np.full((4, 5), 3 * y + x, np.uint8))
    >>> a = wrap_folder_of_tiffs(os.path.join(d, "*.tif"), r"_(Y)(\d+)(X)(\d+)")
    >>> a.shape, int(a[7, 14])
    ((8, 15), 5)
    """
    try:
        import tifffile
    except ImportError:
        raise needs("tifffile") from None

    if filname_pattern is not None:
        if filename_pattern is not None and filename_pattern != filname_pattern:
            raise TypeError("give filename_pattern or filname_pattern (its spelling in the reference's "
                            "documentation), not both")
        filename_pattern = filname_pattern
    if filename_pattern is None:
        raise TypeError("wrap_folder_of_tiffs() needs filename_pattern, a glob of the tiles")
    files = sorted(_glob.glob(str(filename_pattern)))
    if not files:
        raise InputNotFoundError(f"no files match {str(filename_pattern)!r}")
    try:
        seq = tifffile.TiffSequence(files, pattern=block_index_pattern)
    except ValueError as exc:
        raise InputError(f"TIFF tile names matching {str(filename_pattern)!r} do not follow the pattern "
                         f"{block_index_pattern!r} ({exc}), e.g. {os.path.basename(files[0])!r}") from None
    n_grid = len(seq.shape)
    store = seq.aszarr(axestiled={i: i for i in range(n_grid)})
    return _open_store(store)


def _open_store(store):
    zarr = zarr_module()
    try:
        return zarr.open(store, mode="r")
    except TypeError:
        return zarr.open_array(store, mode="r")


_TIFF_AXES = {"Z": "z", "Y": "y", "X": "x", "C": "c", "T": "t"}


def _tiff_axes(letters: str, shape) -> tuple:
    """Map tifffile's series axis letters to our names (unknown axes -> z or dim_i)."""
    out = []
    unknown = []
    for i, ch in enumerate(letters):
        if ch in _TIFF_AXES:
            out.append(_TIFF_AXES[ch])
        elif ch == "S" and i == len(letters) - 1 and shape[i] in (3, 4) and "C" not in letters:
            out.append("c")  # RGB(A) samples
        else:
            out.append(None)
            unknown.append(i)
    if len(unknown) == 1 and "z" not in out:
        out[unknown[0]] = "z"
    else:
        for i in unknown:
            out[i] = f"dim_{i}"
    return tuple(out)


def _tiff_voxel(tf, axes):
    """Voxel size from ImageJ metadata (spacing for z, resolution tags for y/x)."""
    if not tf.is_imagej:
        return None
    meta = tf.imagej_metadata or {}
    page = tf.pages[0]
    try:
        xr = page.tags["XResolution"].value
        yr = page.tags["YResolution"].value
        x = xr[1] / xr[0]
        y = yr[1] / yr[0]
    except (KeyError, ZeroDivisionError, TypeError, IndexError):
        return None
    unit = meta.get("unit")
    spatial = [a for a in axes if a in ("z", "y", "x")]
    sizes = {"x": x, "y": y, "z": float(meta.get("spacing", 1.0))}
    try:
        return VoxelSize(tuple(spatial), tuple(sizes[a] for a in spatial),
                         tuple([unit] * len(spatial)))
    except InputError:
        return None


def _open_tiff(path, axes, sel):
    try:
        import tifffile
    except ImportError:
        raise needs("tifffile") from None
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            letters = series.axes
            shape = tuple(series.shape)
            voxel = None
            if axes is None:
                axes = _tiff_axes(letters, shape)
                voxel = _tiff_voxel(tf, axes)
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
    except (tifffile.TiffFileError, ValueError, IndexError) as exc:
        raise InputError(f"input {path!r} is not a readable TIFF file: {exc}") from None
    arr = _open_store(store)
    if hasattr(arr, "array_keys"):  # a pyramidal TIFF gives a group of levels
        arr = arr[sorted(arr.array_keys())[0]]
    return make_volume(arr, axes, **sel, voxel_size=voxel, kind="tiff", source=path)


def _open_tiff_glob(pattern, tile_pattern, axes, sel):
    try:
        import tifffile
    except ImportError:
        raise needs("tifffile") from None
    files = sorted(_glob.glob(pattern))
    if not files:
        raise InputNotFoundError(f"no files match {pattern!r}")
    tp = tile_pattern or DEFAULT_TILE_PATTERN
    if all(re.search(tp, os.path.basename(f)) for f in files):
        arr = wrap_folder_of_tiffs(pattern, tp)
        return make_volume(arr, axes, **sel, kind="tiff-tiles", source=pattern)
    if tile_pattern is not None:
        bad = [os.path.basename(f) for f in files if not re.search(tp, os.path.basename(f))][:3]
        raise InputError(f"TIFF files {bad} matching {pattern!r} do not follow the tile pattern {tp!r}")
    # one file per z slice, in name order; compare a few headers (not all: cheap on a parallel FS)
    probe = sorted({0, len(files) // 2, len(files) - 1})
    kinds = {}
    for i in probe:
        try:
            with tifffile.TiffFile(files[i]) as tf:
                kinds[files[i]] = (tuple(tf.series[0].shape), str(tf.series[0].dtype))
        except (tifffile.TiffFileError, OSError, IndexError) as exc:
            raise InputError(f"{files[i]!r} is not a readable TIFF file: {exc}") from None
    if len(set(kinds.values())) > 1:
        raise InputError(f"TIFF files matching {pattern!r} cannot be stacked (all must have the same shape and "
                         f"type): " + ", ".join(f"{os.path.basename(f)} {k[0]} {k[1]}" for f, k in kinds.items()))
    seq = tifffile.TiffSequence(files, pattern=None)
    try:
        store = seq.aszarr()
    except ValueError as exc:
        raise InputError(f"TIFF files matching {pattern!r} cannot be stacked (all must have the same shape and "
                         f"type): {exc}") from None
    arr = _open_store(store)
    nd = len(arr.shape)
    if axes is None and nd == 3:
        axes = ("z", "y", "x")
    log.debug("stacked %d TIFF files as %s", len(files), tuple(arr.shape))
    return make_volume(arr, axes, **sel, kind="tiff-stack", source=pattern)
