"""OME-NGFF metadata, pure: parse and build the dicts (no files, no zarr).

Two versions of the specification are handled:

* NGFF 0.4 on the zarr v2 on-disk format: the metadata (``multiscales``, ``omero``,
  ``labels``, ``image-label``) sits directly in a group's ``.zattrs``;
* NGFF 0.5 on the zarr v3 on-disk format: the same keys sit under ``attributes["ome"]``
  of the group's ``zarr.json``, together with ``"version": "0.5"``.

Reading and writing OME-Zarr groups on disk is :mod:`mpicellpose.volumes.ngff_io`; label
pyramids are :mod:`mpicellpose.volumes.pyramid`.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .volume import SPATIAL, VoxelSize, default_axes

NGFF_FOR_FORMAT = {2: "0.4", 3: "0.5"}
LABEL_METHODS = ("mode", "nearest")
# what the "metadata.method" of a label pyramid names (the function that computed its levels)
DOWNSAMPLE_FUNCTION = "mpicellpose.volumes.pyramid.downsample_labels"


def ome_metadata(attrs: dict) -> tuple:
    """Split a group's attributes into ``(ngff_version, dict of OME keys)``.

    NGFF 0.5 keeps its keys under ``"ome"``; earlier versions at the top level with the
    version inside each ``multiscales`` entry.  ``version`` is None when the attributes
    carry no OME metadata.

    Examples
    --------
    >>> ome_metadata({"ome": {"version": "0.5", "multiscales": [{}]}})[0]
    '0.5'
    >>> ome_metadata({"multiscales": [{"version": "0.4"}]})[0]
    '0.4'
    >>> ome_metadata({"foo": 1})
    (None, {})
    """
    ome = attrs.get("ome")
    if isinstance(ome, dict):
        return str(ome.get("version", "0.5")), ome
    keys = ("multiscales", "omero", "labels", "image-label", "plate", "well", "bioformats2raw.layout")
    found = {k: attrs[k] for k in keys if k in attrs}
    if not found:
        return None, {}
    version = None
    ms = found.get("multiscales")
    if isinstance(ms, list) and ms and isinstance(ms[0], dict):
        version = ms[0].get("version")
    for k in ("image-label", "plate", "well"):
        if version is None and isinstance(found.get(k), dict):
            version = found[k].get("version")
    return str(version or "0.4"), found


def axes_of(ms: dict, ndim: int) -> tuple:
    axes = ms.get("axes")
    if not axes:
        return ("t", "c", "z", "y", "x")[-ndim:] if ndim <= 5 else default_axes(ndim)
    out = []
    for a in axes:
        if isinstance(a, dict):
            out.append(dict(a))
        else:
            out.append({"name": str(a)})
    for a in out:
        if "type" not in a:
            n = a["name"]
            a["type"] = "time" if n == "t" else "channel" if n == "c" else "space" if n in SPATIAL else None
    return tuple(out)


def transforms_of(transforms, ndim):
    """(scale, translation) from a list of NGFF coordinate transformations."""
    scale = np.ones(ndim)
    trans = np.zeros(ndim)
    for t in transforms or ():
        if not isinstance(t, dict):
            continue
        if t.get("type") == "scale" and "scale" in t:
            s = np.asarray(t["scale"], float)
            if s.size == ndim:
                trans = trans * s
                scale = scale * s
        elif t.get("type") == "translation" and "translation" in t:
            v = np.asarray(t["translation"], float)
            if v.size == ndim:
                trans = trans + v
    return scale, trans


def level_transform(ms: dict, dataset: dict, ndim: int):
    scale, trans = transforms_of(dataset.get("coordinateTransformations"), ndim)
    gs, gt = transforms_of(ms.get("coordinateTransformations"), ndim)
    return scale * gs, trans * gs + gt


def pick_level(datasets, level, group_path):
    paths = [str(d.get("path")) for d in datasets]
    if isinstance(level, (int, np.integer)) and not isinstance(level, bool):
        if not -len(paths) <= int(level) < len(paths):
            raise InputError(f"OME-Zarr {group_path!r} has {len(paths)} resolution level(s) {paths}; "
                             f"level {level} does not exist")
        return int(level) % len(paths)
    if isinstance(level, str):
        if level in paths:
            return paths.index(level)
        if level.lstrip("-").isdigit():
            return pick_level(datasets, int(level), group_path)
    raise InputError(f"level {level!r} is not one of the resolution levels {paths} of {group_path!r} "
                     f"(give an index 0..{len(paths) - 1} or a path)")


def channel_index(channel, meta, axes_names, shape, what):
    if channel is None or isinstance(channel, (int, np.integer)):
        return channel
    names = []
    omero = meta.get("omero") or {}
    for ch in omero.get("channels") or ():
        names.append(str(ch.get("label", "")) if isinstance(ch, dict) else "")
    if str(channel) in names:
        return names.index(str(channel))
    if str(channel).lstrip("-").isdigit():
        return int(channel)
    raise InputError(f"{what} has no channel named {channel!r} (channels: {names or 'unnamed'})")


def _axis_entry(name, unit=None) -> dict:
    kind = "time" if name == "t" else "channel" if name == "c" else "space" if name in SPATIAL else None
    e = {"name": name}
    if kind:
        e["type"] = kind
    if unit:
        e["unit"] = unit
    return e


def level_factors(n_levels: int, factor, ndim: int) -> list:
    """Cumulative downsampling factor per axis for levels 0..n_levels-1.

    Examples
    --------
    >>> level_factors(3, 2, 2)
    [(1, 1), (2, 2), (4, 4)]
    >>> level_factors(2, (1, 2, 2), 3)
    [(1, 1, 1), (1, 2, 2)]
    """
    f = per_axis_factor(factor, ndim)
    return [tuple(int(x) ** k for x in f) for k in range(int(n_levels))]


def per_axis_factor(factor, ndim) -> tuple:
    if isinstance(factor, (int, np.integer)) and not isinstance(factor, bool):
        f = (int(factor),) * ndim
    else:
        f = tuple(int(x) for x in factor)
    if len(f) != ndim or any(x < 1 for x in f):
        raise InputError(f"downsampling factor {factor!r} must be a positive integer or one per axis ({ndim})")
    return f


def multiscales_metadata(axes, voxel_size=None, *, n_levels: int = 1, factor=2, method: str = "mode",
                         name: str | None = None, version: str = "0.4") -> dict:
    """One NGFF ``multiscales`` entry for levels ``"0"``, ``"1"``, ... (pure).

    Level k's scale is the level-0 scale times the cumulative factor.  Its translation
    puts each voxel where the voxels it summarizes are: the cell centre for ``"mode"``
    (and any averaging), the first voxel of the cell for ``"nearest"`` (stride sampling).

    Parameters
    ----------
    axes : sequence of str
        All axis names (``c`` / ``t`` / spatial).
    voxel_size : VoxelSize or sequence of float, optional
        Spatial sizes (and units / origin); non-spatial axes get scale 1.
    n_levels, factor, method
        Pyramid description (``factor`` applies to the spatial axes only).
    name : str, optional
    version : {"0.4", "0.5"}
        0.4 puts ``version`` in the entry; 0.5 keeps it at the ``ome`` level instead.

    Examples
    --------
    >>> m = multiscales_metadata(("z", "y", "x"), (2.0, 0.5, 0.5), n_levels=2)
    >>> m["datasets"][1]["coordinateTransformations"][0]["scale"]
    [4.0, 1.0, 1.0]
    >>> m["datasets"][1]["coordinateTransformations"][1]["translation"]
    [1.0, 0.25, 0.25]
    """
    if method not in LABEL_METHODS:
        raise InputError(f"method must be one of {LABEL_METHODS}, got {method!r}")
    axes = tuple(str(a) for a in axes)
    spatial = [i for i, a in enumerate(axes) if a not in ("c", "t")]
    if isinstance(voxel_size, VoxelSize):
        vs = voxel_size
    elif voxel_size is not None:
        vals = tuple(float(v) for v in voxel_size)
        if len(vals) != len(spatial):
            raise InputError(f"voxel size {vals} needs one value per spatial axis {[axes[i] for i in spatial]}")
        vs = VoxelSize(tuple(axes[i] for i in spatial), vals)
    else:
        vs = VoxelSize(tuple(axes[i] for i in spatial), (1.0,) * len(spatial))
    by_axis = {a: (s, u, o) for a, s, u, o in zip(vs.axes, vs.size, vs.units, vs.origin)}
    scale0 = np.ones(len(axes))
    origin = np.zeros(len(axes))
    units = [None] * len(axes)
    for i in spatial:
        if axes[i] in by_axis:
            scale0[i], units[i], origin[i] = by_axis[axes[i]]
    facs = level_factors(n_levels, factor, len(spatial))
    datasets = []
    for k, f in enumerate(facs):
        full = np.ones(len(axes))
        full[spatial] = f
        sc = scale0 * full
        if method == "mode":
            tr = origin + (full - 1.0) / 2.0 * scale0
        else:
            tr = origin.copy()
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(v) for v in sc]},
            {"type": "translation", "translation": [float(v) for v in tr]},
        ]})
    entry = {"axes": [_axis_entry(a, u) for a, u in zip(axes, units)], "datasets": datasets}
    if name:
        entry["name"] = str(name)
    if version == "0.4":
        entry["version"] = "0.4"
    if n_levels > 1:
        entry["metadata"] = {"method": DOWNSAMPLE_FUNCTION,
                             "kwargs": {"method": method, "factor": list(per_axis_factor(factor, len(spatial)))}}
    return entry


def array_options(zarr_format: int, axes) -> dict:
    """Extra :func:`mpicellpose.volumes.storage.create_array` arguments for an NGFF level array.

    NGFF 0.4 (zarr v2) wants ``/`` as chunk-key separator; NGFF 0.5 (zarr v3) wants the
    axis names as ``dimension_names``.

    Examples
    --------
    >>> array_options(2, "zyx")
    {'dimension_separator': '/'}
    >>> array_options(3, ("z", "y", "x"))
    {'dimension_names': ('z', 'y', 'x')}
    """
    if int(zarr_format) == 2:
        return {"dimension_separator": "/"}
    return {"dimension_names": tuple(str(a) for a in axes)}


def label_paths(input_group, name: str) -> tuple:
    """Where a label image called ``name`` goes inside an OME-Zarr image group.

    Returns
    -------
    (group_path, level0_array_path) : ``<input_group>/labels/<name>`` and ``.../0``.

    Examples
    --------
    >>> label_paths("/data/img.ome.zarr", "cells")
    ('/data/img.ome.zarr/labels/cells', '/data/img.ome.zarr/labels/cells/0')
    """
    name = str(name)
    if not name or "/" in name or name in (".", ".."):
        raise InputError(f"labels name must be a plain name (no '/'), got {name!r}")
    group = os.path.join(str(input_group), "labels", name)
    return group, os.path.join(group, "0")


def standalone_label_paths(output) -> tuple:
    """``(group_path, level0_array_path)`` of a stand-alone OME-Zarr label image.

    Examples
    --------
    >>> standalone_label_paths("/out/labels.ome.zarr")
    ('/out/labels.ome.zarr', '/out/labels.ome.zarr/0')
    """
    out = str(output).rstrip("/")
    return out, os.path.join(out, "0")
