"""OME-Zarr (OME-NGFF) on disk: open multiscale images, write images and label metadata.

Reading gives a :class:`mpicellpose.volumes.volume.Volume`: a lazily sliced array with the
chosen resolution level, time point and channel, its axis names and its physical voxel
size.  Writing turns the label array of a run into an NGFF ``labels`` image, inside the
input's OME-Zarr group (``<image>/labels/<name>/0``) or as a stand-alone OME-Zarr; the
metadata dicts themselves are built by :mod:`mpicellpose.volumes.ngff`, and
:func:`mpicellpose.volumes.pyramid.build_pyramid` adds lower resolution levels in parallel.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import InputError
from .ngff import (NGFF_FOR_FORMAT, array_options, axes_of, channel_index, level_transform, multiscales_metadata,
                   ome_metadata, pick_level)
from .storage import (array_format, create_array, node_attrs, node_kind, open_zarr_node, remove_path, zarr_major,
                      zarr_module)
from .volume import Volume, VoxelSize, make_volume

log = logging.getLogger(__name__)


def is_ome_zarr(path) -> bool:
    """True when ``path`` is a zarr group with NGFF ``multiscales`` metadata.

    Examples
    --------
    >>> import tempfile
    >>> is_ome_zarr(tempfile.mkdtemp())
    False
    """
    try:
        node = zarr_module().open(str(path), mode="r")
    except Exception:
        return False
    if hasattr(node, "dtype"):
        return False
    _, meta = ome_metadata(node_attrs(node))
    return bool(meta.get("multiscales"))


def label_image_of(array_path):
    """The NGFF label image (a group with ``image-label`` metadata) holding the labels array at
    ``array_path`` (its level 0), or None for a plain zarr array."""
    parent = os.path.dirname(os.path.normpath(str(array_path)))
    for group in (str(array_path), parent):
        if node_kind(group) != "group":
            continue
        try:
            _, meta = ome_metadata(node_attrs(zarr_module().open(group, mode="r")))
        except Exception:  # noqa: BLE001 - a hint only
            continue
        if meta.get("image-label") is not None:
            return group
    return None


def napari_hint(array_path) -> str:
    """How to open the labels at ``array_path`` as a labels layer in napari (one line).

    >>> napari_hint("/data/labels.zarr")
    "view in napari as labels: napari --layer-type labels /data/labels.zarr (Python: viewer.add_labels(zarr.open('/data/labels.zarr')))"
    """
    group = label_image_of(array_path)
    if group is not None:
        image = os.path.dirname(os.path.dirname(group)) if os.path.basename(os.path.dirname(group)) == "labels" else None
        target = image if image and is_ome_zarr(image) else group
        return (f"view in napari: napari {target} (OME-Zarr labels: the napari-ome-zarr plugin opens them as a "
                f"labels layer)")
    return (f"view in napari as labels: napari --layer-type labels {array_path} (Python: "
            f"viewer.add_labels(zarr.open({str(array_path)!r})))")


def open_volume(path, level=0, channel=None, timepoint=None, *, dataset=None) -> Volume:
    """Open an OME-Zarr image (or a plain zarr array / group + dataset) lazily.

    Parameters
    ----------
    path : str or Path
        An OME-Zarr image group (NGFF 0.4 on zarr v2, 0.5 on zarr v3), one of its level
        arrays (``image.ome.zarr/0``), a plain zarr array, or a zarr group with
        ``dataset``.
    level : int or str
        Resolution level: index into ``multiscales[0].datasets`` or its path.
    channel : int or str, optional
        Keep only this channel (index, or ``omero`` channel label).  Without it a
        channel axis stays in the array and ``Volume.channel_axis`` says where.
    timepoint : int, optional
        Time point to take; required when the image has more than one.
    dataset : str, optional
        Array (or image subgroup) inside a group that is not itself an OME image.

    Returns
    -------
    Volume

    Examples
    --------
    >>> import tempfile, os
    >>> d = os.path.join(tempfile.mkdtemp(), "img.ome.zarr")
    >>> _ = write_image(d, np.arange(2 * 4 * 6 * 8, dtype=np.uint16).reshape(2, 4, 6, 8),
    ...                 ("c", "z", "y", "x"), voxel_size=(2.0, 0.5, 0.5), chunks=(1, 4, 6, 8))
    >>> vol = open_volume(d, channel=1)
    >>> vol.axes, vol.shape, vol.voxel_size.size, vol.is_ome
    (('z', 'y', 'x'), (4, 6, 8), (2.0, 0.5, 0.5), True)
    >>> int(vol.array[0, 0, 1])
    193
    """
    path = str(path)
    node = open_zarr_node(path)
    zarr = zarr_module()
    if hasattr(node, "dtype"):  # an array: maybe one level of an OME image
        if dataset is not None:
            raise InputError(f"input {path!r} is a zarr array; dataset={dataset!r} does not apply")
        parent = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(os.path.abspath(path))
        if level in (0, None) and is_ome_zarr(parent):
            try:
                return _open_ome(zarr.open_group(parent, mode="r"), parent, name, channel, timepoint)
            except InputError:
                pass
        return make_volume(node, None, channel=channel, timepoint=timepoint, zarr_format=array_format(node),
                           kind="zarr", source=path)
    version, meta = ome_metadata(node_attrs(node))
    if dataset is not None:
        try:
            sub = node[dataset]
        except Exception:
            keys = sorted(list(node.array_keys()) + list(node.group_keys()))
            raise InputError(f"zarr group {path!r} has no dataset {dataset!r} (members: {keys})") from None
        if hasattr(sub, "dtype"):
            if meta.get("multiscales"):
                return _open_ome(node, path, dataset, channel, timepoint)
            return make_volume(sub, None, channel=channel, timepoint=timepoint, zarr_format=array_format(sub),
                               kind="zarr", source=f"{path}/{dataset}")
        return open_volume(os.path.join(path, dataset), level, channel, timepoint)
    if meta.get("multiscales"):
        return _open_ome(node, path, level, channel, timepoint)
    if "bioformats2raw.layout" in meta and "0" in set(node.group_keys()):
        return open_volume(os.path.join(path, "0"), level, channel, timepoint)
    arrays = sorted(node.array_keys())
    groups = sorted(node.group_keys())
    raise InputError(f"zarr group {path!r} is not an OME-Zarr image (no 'multiscales' metadata); choose an array "
                     f"with dataset (--dataset): arrays {arrays}" + (f", groups {groups}" if groups else ""))


def _open_ome(group, path, level, channel, timepoint) -> Volume:
    version, meta = ome_metadata(node_attrs(group))
    ms_list = meta.get("multiscales") or []
    if not isinstance(ms_list, list) or not ms_list or not isinstance(ms_list[0], dict):
        raise InputError(f"OME-Zarr {path!r} has malformed 'multiscales' metadata")
    ms = ms_list[0]
    datasets = [d for d in ms.get("datasets") or () if isinstance(d, dict) and "path" in d]
    if not datasets:
        raise InputError(f"OME-Zarr {path!r} lists no datasets in its 'multiscales' metadata")
    i = pick_level(datasets, level, path)
    ds = datasets[i]
    try:
        arr = group[str(ds["path"])]
    except Exception:
        raise InputError(f"OME-Zarr {path!r} lists level {ds['path']!r} but has no such array") from None
    ndim = len(arr.shape)
    axes = axes_of(ms, ndim)
    if len(axes) != ndim:
        raise InputError(f"OME-Zarr {path!r}: {len(axes)} axes in the metadata but level {ds['path']!r} has "
                         f"{ndim} dimensions {tuple(arr.shape)}")
    names = tuple(a["name"] for a in axes)
    scale, trans = level_transform(ms, ds, ndim)
    sp = [j for j, a in enumerate(axes) if a.get("type") == "space"]
    vs = None
    if sp:
        vs = VoxelSize(tuple(names[j] for j in sp), tuple(scale[j] for j in sp),
                       tuple(axes[j].get("unit") for j in sp), tuple(trans[j] for j in sp))
    ch = channel_index(channel, meta, names, arr.shape, repr(path))
    return make_volume(arr, names, channel=ch, timepoint=timepoint, voxel_size=vs, is_ome=True,
                       group_path=str(path), level=str(ds["path"]), zarr_format=array_format(group),
                       ngff_version=version, kind="ome-zarr", source=str(path))


def open_group_for_write(path, zarr_format):
    """Open (or create) a zarr group of the given on-disk format for adding attributes."""
    zarr = zarr_module()
    p = str(path)
    kind = node_kind(p)
    if kind == "array":
        raise InputError(f"{p!r} is a zarr array, not a group")
    if zarr_major() < 3 and zarr_format != 2:
        raise InputError("zarr-python 2 can only write NGFF 0.4 (zarr v2); install zarr>=3 for NGFF 0.5")
    if kind == "group":
        g = zarr.open_group(p, mode="r+")
        if array_format(g) != zarr_format:
            raise InputError(f"{p!r} is a zarr v{array_format(g)} group; cannot add NGFF "
                             f"{NGFF_FOR_FORMAT[zarr_format]} (zarr v{zarr_format}) metadata to it")
        return g
    if zarr_major() >= 3:
        return zarr.open_group(p, mode="a", zarr_format=zarr_format)
    return zarr.open_group(p, mode="a")


def update_ome_attrs(group, version: str, updates: dict) -> None:
    """Merge ``updates`` into a group's OME metadata in the layout of ``version``."""
    attrs = node_attrs(group)
    if version == "0.4":
        attrs.update(updates)
        group.attrs.update(updates)
    else:
        ome = dict(attrs.get("ome") or {})
        ome["version"] = version
        ome.update(updates)
        group.attrs.update({"ome": ome})


def write_multiscales_metadata(group_path, axes, voxel_size=None, *, zarr_format: int | None = None,
                               n_levels: int = 1, factor=2, method: str = "mode", name: str | None = None,
                               extra: dict | None = None) -> dict:
    """Write (replace) the ``multiscales`` metadata of an image group; return the entry.

    ``zarr_format`` defaults to the format of the group's level-0 array ``0``.
    ``extra`` holds further OME keys (``omero``, ``image-label``...) merged in.

    Examples
    --------
    >>> import tempfile, os
    >>> from mpicellpose.volumes.storage import create_array
    >>> g = os.path.join(tempfile.mkdtemp(), "x.ome.zarr")
    >>> _ = create_array(os.path.join(g, "0"), (4, 5), (4, 5), np.uint8)
    >>> write_multiscales_metadata(g, ("y", "x"), (0.5, 0.5))["datasets"][0]["path"]
    '0'
    >>> open_volume(g).voxel_size.size
    (0.5, 0.5)
    """
    fmt = _format_of(group_path, zarr_format)
    version = NGFF_FOR_FORMAT[fmt]
    entry = multiscales_metadata(axes, voxel_size, n_levels=n_levels, factor=factor, method=method,
                                 name=name, version=version)
    group = open_group_for_write(group_path, fmt)
    updates = {"multiscales": [entry]}
    updates.update(extra or {})
    update_ome_attrs(group, version, updates)
    return entry


def _format_of(group_path, zarr_format):
    if zarr_format is not None:
        if int(zarr_format) not in NGFF_FOR_FORMAT:
            raise InputError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
        return int(zarr_format)
    level0 = os.path.join(str(group_path), "0")
    if os.path.exists(os.path.join(level0, "zarr.json")):
        return 3
    if os.path.exists(os.path.join(str(group_path), "zarr.json")):
        return 3
    return 2


def write_labels_metadata(group_path, axes, voxel_size=None, *, name: str | None = None, image_group=None,
                          zarr_format: int | None = None, n_levels: int = 1, factor=2, method: str = "mode",
                          colors=None, properties=None) -> dict:
    """Make the label array ``<group_path>/0`` an NGFF label image; return the entry.

    Writes the group's ``multiscales`` (axes and scale copied from the input level, one
    dataset per level) and ``image-label`` metadata.  With ``image_group`` (the input
    OME-Zarr image holding ``group_path`` under ``labels/``) the label is also listed
    in ``<image_group>/labels``'s ``labels`` list (other names there are kept) and its
    ``source`` points back to the image.  Call it on one rank, before
    :func:`mpicellpose.volumes.pyramid.build_pyramid` (which rewrites the level list when it adds levels).

    Parameters
    ----------
    group_path : str
        The label image group (see :func:`mpicellpose.volumes.ngff.label_paths` /
        :func:`~mpicellpose.volumes.ngff.standalone_label_paths`).
    axes : sequence of str
        Spatial axis names of the labels, e.g. ``Volume.spatial_axes``.
    voxel_size : VoxelSize or sequence of float, optional
        ``Volume.voxel_size`` of the segmented input level (scale 1 when None).
    name : str, optional
        Name in the metadata (default: the group's directory name).
    image_group : str, optional
        The OME image group the labels belong to.
    zarr_format : {2, 3}, optional
        Default: that of ``<group_path>/0`` (2 = NGFF 0.4, 3 = NGFF 0.5).
    n_levels, factor, method
        Pyramid levels to list (1 = level 0 only).
    colors : dict, optional
        ``{label value: (r, g, b, a)}`` for ``image-label.colors``.
    properties : list of dict, optional
        ``image-label.properties`` entries (each with ``label-value``).

    Examples
    --------
    >>> import tempfile, os
    >>> from mpicellpose.volumes.ngff import label_paths
    >>> from mpicellpose.volumes.storage import create_array
    >>> img = os.path.join(tempfile.mkdtemp(), "img.ome.zarr")
    >>> _ = write_image(img, np.zeros((4, 6, 8), np.uint16), ("z", "y", "x"), voxel_size=(2, 1, 1))
    >>> grp, arr0 = label_paths(img, "cells")
    >>> _ = create_array(arr0, (4, 6, 8), (4, 6, 8), np.uint32)
    >>> entry = write_labels_metadata(grp, ("z", "y", "x"), open_volume(img).voxel_size, image_group=img)
    >>> entry["datasets"][0]["coordinateTransformations"][0]["scale"]
    [2.0, 1.0, 1.0]
    >>> labels_of(img)
    ['cells']
    """
    fmt = _format_of(group_path, zarr_format)
    version = NGFF_FOR_FORMAT[fmt]
    name = name or os.path.basename(str(group_path).rstrip("/"))
    image_label: dict = {}
    if version == "0.4":
        image_label["version"] = "0.4"
    if image_group is not None:
        rel = os.path.relpath(os.path.abspath(str(image_group)), os.path.abspath(str(group_path)))
        image_label["source"] = {"image": rel.replace(os.sep, "/") + "/"}
    if colors:
        image_label["colors"] = [{"label-value": int(k), "rgba": [int(c) for c in v]}
                                 for k, v in sorted(colors.items())]
    if properties:
        image_label["properties"] = [dict(p) for p in properties]
    entry = write_multiscales_metadata(group_path, axes, voxel_size, zarr_format=fmt, n_levels=n_levels,
                                       factor=factor, method=method, name=name,
                                       extra={"image-label": image_label})
    if image_group is not None:
        labels_dir = os.path.join(str(image_group), "labels")
        if os.path.abspath(os.path.dirname(os.path.abspath(str(group_path)))) != os.path.abspath(labels_dir):
            raise InputError(f"label group {str(group_path)!r} is not inside {labels_dir!r}; use label_paths()")
        lg = open_group_for_write(labels_dir, fmt)
        present = list(ome_metadata(node_attrs(lg))[1].get("labels") or [])
        key = os.path.basename(str(group_path).rstrip("/"))
        if key not in present:
            present.append(key)
        update_ome_attrs(lg, version, {"labels": present})
    log.debug("NGFF %s label metadata written to %s", version, group_path)
    return entry


def labels_of(image_group) -> list:
    """Names listed in ``<image_group>/labels`` (empty when there is none).

    Examples
    --------
    >>> import tempfile
    >>> labels_of(tempfile.mkdtemp())
    []
    """
    p = os.path.join(str(image_group), "labels")
    if not os.path.isdir(p):
        return []
    try:
        g = zarr_module().open_group(p, mode="r")
    except Exception:
        return []
    return list(ome_metadata(node_attrs(g))[1].get("labels") or [])


def write_image(path, data, axes, *, voxel_size=None, chunks=None, zarr_format: int = 2, name=None,
                overwrite: bool = False):
    """Write a small in-memory array as a one-level OME-Zarr image (tests, examples).

    Large volumes go through ``mpicellpose convert --ome``, which streams.

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.ome.zarr")
    >>> arr = write_image(p, np.ones((3, 4), np.uint8), "yx")
    >>> is_ome_zarr(p), arr.shape
    (True, (3, 4))
    """
    data = np.asarray(data)
    axes = tuple(axes)
    if os.path.exists(str(path)):
        if not overwrite:
            raise FileExistsError(f"{str(path)!r} exists")
        remove_path(path)
    chunks = data.shape if chunks is None else chunks
    arr = create_array(os.path.join(str(path), "0"), data.shape, chunks, data.dtype, zarr_format=zarr_format,
                       **array_options(zarr_format, axes))
    arr[...] = data
    write_multiscales_metadata(path, axes, voxel_size, zarr_format=zarr_format, name=name)
    return arr
