"""OME-Zarr (OME-NGFF) support: read multiscale images, write label images and pyramids.

Two versions of the specification are handled:

* NGFF 0.4 on the zarr v2 on-disk format: the metadata (``multiscales``, ``omero``,
  ``labels``, ``image-label``) sits directly in a group's ``.zattrs``;
* NGFF 0.5 on the zarr v3 on-disk format: the same keys sit under ``attributes["ome"]``
  of the group's ``zarr.json``, together with ``"version": "0.5"``.

Reading gives a :class:`Volume`: a lazily sliced array with the chosen resolution
level, time point and channel, its axis names and its physical voxel size.  Writing
turns the label array of a run into an NGFF ``labels`` image, inside the input's
OME-Zarr group (``<image>/labels/<name>/0``) or as a stand-alone OME-Zarr, and
:func:`build_pyramid` adds lower resolution levels in parallel.

Only :mod:`mpicellpose.comm` talks MPI; this module receives a communicator and uses
its rank/size, and the collective agreement of :class:`mpicellpose.comm.Mailbox`
between pyramid levels.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

NGFF_FOR_FORMAT = {2: "0.4", 3: "0.5"}
SPATIAL = ("z", "y", "x")
LABEL_METHODS = ("mode", "nearest")

# spellings seen in TIFF / HDF5 metadata -> UDUNITS names that NGFF requires
_UNIT_ALIASES = {
    "um": "micrometer", "µm": "micrometer", "\u00b5m": "micrometer", "micron": "micrometer",
    "microns": "micrometer", "micrometre": "micrometer", "micrometers": "micrometer",
    "nm": "nanometer", "nanometre": "nanometer", "nanometers": "nanometer",
    "mm": "millimeter", "millimetre": "millimeter", "cm": "centimeter", "m": "meter",
    "pm": "picometer", "a": "angstrom", "å": "angstrom",
    "s": "second", "sec": "second", "ms": "millisecond", "min": "minute", "h": "hour",
}


# --------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class VoxelSize:
    """Physical size of a voxel along each spatial axis.

    Attributes
    ----------
    axes : tuple of str
        Spatial axis names, e.g. ``("z", "y", "x")``.
    size : tuple of float
        Physical size per axis (the NGFF ``scale`` of the level).
    units : tuple of (str or None)
        Unit per axis (``"micrometer"`` ...), None where unknown.
    origin : tuple of float
        Physical position of the first voxel's centre (the NGFF ``translation``).

    Examples
    --------
    >>> vs = VoxelSize(("z", "y", "x"), (2.0, 0.5, 0.5))
    >>> vs.origin, vs.as_dict()["z"]
    ((0.0, 0.0, 0.0), 2.0)
    """

    axes: tuple
    size: tuple
    units: tuple = ()
    origin: tuple = ()

    def __post_init__(self):
        axes = tuple(str(a) for a in self.axes)
        size = tuple(float(s) for s in self.size)
        if len(size) != len(axes):
            raise InputError(f"voxel size {size} does not have one value per axis {axes}")
        if not all(math.isfinite(s) and s > 0 for s in size):
            raise InputError(f"voxel sizes must be positive finite numbers, got {size}")
        units = tuple(self.units) if self.units else (None,) * len(axes)
        origin = tuple(float(o) for o in self.origin) if self.origin else (0.0,) * len(axes)
        if len(units) != len(axes) or len(origin) != len(axes):
            raise InputError(f"voxel size units {units} / origin {origin} do not match the axes {axes}")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "units", tuple(normalize_unit(u) for u in units))
        object.__setattr__(self, "origin", origin)

    def as_dict(self) -> dict:
        """``{axis: size}``."""
        return dict(zip(self.axes, self.size))


class AxisView:
    """A lazy view of an array with some axes fixed to one index and the rest reordered.

    Nothing is read until the view is sliced; ``view[key]`` turns ``key`` (integers,
    slices with steps, ``Ellipsis``) into one read of the underlying array.

    Parameters
    ----------
    base : array-like
        Anything with ``shape``, ``dtype`` and basic slicing (zarr, h5py, numpy).
    fixed : dict, optional
        ``{base axis: index}`` for the axes that are selected away.
    order : sequence of int, optional
        The remaining base axes in the order the view shows them (default: as in base).

    Examples
    --------
    >>> a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    >>> v = AxisView(a, fixed={0: 1}, order=(2, 1, 3))
    >>> v.shape
    (4, 3, 5)
    >>> bool((v[1:3, :, 4] == a[1, :, 1:3, 4].T).all())
    True
    """

    def __init__(self, base, fixed: dict | None = None, order=None):
        self.base = base
        nd = len(base.shape)
        fixed = {} if fixed is None else dict(fixed)
        norm = {}
        for ax, idx in fixed.items():
            ax = int(ax)
            n = int(base.shape[ax])
            idx = int(idx)
            if not -n <= idx < n:
                raise InputError(f"index {idx} is out of range for an axis of length {n}")
            norm[ax] = idx % n
        self.fixed = norm
        free = [a for a in range(nd) if a not in norm]
        self.order = tuple(free) if order is None else tuple(int(a) for a in order)
        if sorted(self.order) != free:
            raise InputError(f"axis order {self.order} must list each of the axes {free} once")

    @property
    def shape(self) -> tuple:
        return tuple(int(self.base.shape[a]) for a in self.order)

    @property
    def dtype(self):
        return np.dtype(self.base.dtype)

    @property
    def ndim(self) -> int:
        return len(self.order)

    @property
    def chunks(self):
        ch = getattr(self.base, "chunks", None)
        if ch is None:
            return None
        return tuple(int(ch[a]) for a in self.order)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"<AxisView shape={self.shape} dtype={self.dtype} of {type(self.base).__name__}>"

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def _expand(self, key) -> list:
        if not isinstance(key, tuple):
            key = (key,)
        n_ell = sum(k is Ellipsis for k in key)
        if n_ell > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if n_ell:
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            fill = self.ndim - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices ({len(key)}) for a view with {self.ndim} axes")
        key = tuple(key) + (slice(None),) * (self.ndim - len(key))
        for k in key:
            if not isinstance(k, (slice, int, np.integer)) or isinstance(k, bool):
                raise IndexError(f"only integers and slices are supported, got {type(k).__name__}")
        return list(key)

    def __getitem__(self, key):
        key = self._expand(key)
        full = [slice(None)] * len(self.base.shape)
        for ax, idx in self.fixed.items():
            full[ax] = idx
        for k, ax in zip(key, self.order):
            full[ax] = k
        out = np.asarray(self.base[tuple(full)])
        kept = [ax for k, ax in zip(key, self.order) if isinstance(k, slice)]
        in_base_order = sorted(kept)
        perm = [in_base_order.index(ax) for ax in kept]
        if perm != list(range(len(perm))):
            out = np.transpose(out, perm)
        return out


@dataclass
class Volume:
    """An input volume: a lazily sliced array plus what is known about its axes.

    Attributes
    ----------
    array : array-like
        ``shape``, ``dtype`` and slicing; reads only what is sliced.
    axes : tuple of str
        Name of each axis of ``array`` (``"c"`` channel, ``"t"`` time, ``"z","y","x"``).
    channel_axis : int or None
        Position of the channel axis in ``array``, None without one.
    voxel_size : VoxelSize or None
        Physical voxel size of the spatial axes, None when the file does not say.
    is_ome : bool
        True when read from an OME-Zarr (NGFF) image group.
    group_path : str or None
        The OME-Zarr image group (where ``labels/`` go), None when not OME.
    level : str or None
        Path of the chosen resolution level inside ``group_path``.
    zarr_format : int or None
        On-disk zarr format (2 or 3) of a zarr input, None for other files.
    ngff_version : str or None
        ``"0.4"``, ``"0.5"`` ... for OME-Zarr inputs.
    kind : str
        ``"ome-zarr"``, ``"zarr"``, ``"hdf5"``, ``"tiff"``, ``"tiff-tiles"``,
        ``"tiff-stack"``, ``"n5"`` or ``"array"``.
    source : str or None
        The path or spec the volume was opened from.

    Examples
    --------
    >>> vol = make_volume(np.zeros((2, 5, 6, 7), np.uint8), ("c", "z", "y", "x"), channel=1)
    >>> vol.shape, vol.axes, vol.channel_axis, vol.spatial_axes
    ((5, 6, 7), ('z', 'y', 'x'), None, ('z', 'y', 'x'))
    """

    array: Any
    axes: tuple
    channel_axis: int | None = None
    voxel_size: VoxelSize | None = None
    is_ome: bool = False
    group_path: str | None = None
    level: str | None = None
    zarr_format: int | None = None
    ngff_version: str | None = None
    kind: str = "array"
    source: str | None = None
    handle: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple:
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self):
        return np.dtype(self.array.dtype)

    @property
    def spatial_axes(self) -> tuple:
        """Axis names without the channel and time axes."""
        return tuple(a for i, a in enumerate(self.axes) if i != self.channel_axis and a not in ("c", "t"))

    @property
    def spatial_shape(self) -> tuple:
        return tuple(s for i, (s, a) in enumerate(zip(self.shape, self.axes))
                     if i != self.channel_axis and a not in ("c", "t"))

    def close(self) -> None:
        """Close the file handle kept open for an HDF5 input (no-op otherwise)."""
        if self.handle is not None:
            try:
                self.handle.close()
            finally:
                self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def to_ngff_order(self) -> "Volume":
        """The same volume with axes in NGFF order (t, c, then space, z-y-x); lazy.

        Examples
        --------
        >>> v = make_volume(np.zeros((4, 2, 5, 6), np.uint8), ("z", "c", "y", "x"))
        >>> w = v.to_ngff_order()
        >>> w.axes, w.shape, w.channel_axis
        (('c', 'z', 'y', 'x'), (2, 4, 5, 6), 0)
        """
        rank = {"t": 0, "c": 1}
        spatial_rank = {"z": 0, "y": 1, "x": 2}
        keyed = sorted(range(len(self.axes)),
                       key=lambda i: (rank.get(self.axes[i], 2), spatial_rank.get(self.axes[i], -1), i))
        if keyed == list(range(len(self.axes))):
            return self
        arr = self.array
        if isinstance(arr, AxisView):
            new = AxisView(arr.base, arr.fixed, [arr.order[i] for i in keyed])
        else:
            new = AxisView(arr, None, keyed)
        axes = tuple(self.axes[i] for i in keyed)
        return replace(self, array=new, axes=axes, channel_axis=axes.index("c") if "c" in axes else None)


# --------------------------------------------------------------------------- small helpers
def normalize_unit(unit):
    """Map common unit spellings to the UDUNITS names NGFF uses; None stays None.

    Examples
    --------
    >>> normalize_unit("um"), normalize_unit("micron"), normalize_unit("nanometer"), normalize_unit("pixel")
    ('micrometer', 'micrometer', 'nanometer', None)
    """
    if unit is None:
        return None
    u = str(unit).strip()
    if not u or u.lower() in ("pixel", "pixels", "px", "none", "unknown"):
        return None
    return _UNIT_ALIASES.get(u.lower(), _UNIT_ALIASES.get(u, u))


def anisotropy(voxel_size) -> float:
    """z voxel size divided by the mean of the y and x sizes (3D volumes).

    Parameters
    ----------
    voxel_size : VoxelSize or sequence of 3 floats (z, y, x)

    Examples
    --------
    >>> anisotropy((2.0, 0.5, 0.5))
    4.0
    >>> anisotropy(VoxelSize(("z", "y", "x"), (1.0, 1.0, 0.5)))
    1.3333333333333333
    """
    if isinstance(voxel_size, VoxelSize):
        d = voxel_size.as_dict()
        if not all(a in d for a in SPATIAL):
            raise InputError(f"anisotropy needs z, y and x voxel sizes, got axes {voxel_size.axes}")
        z, y, x = d["z"], d["y"], d["x"]
    else:
        vals = [float(v) for v in voxel_size]
        if len(vals) != 3:
            raise InputError(f"anisotropy needs three voxel sizes (z, y, x), got {vals}")
        z, y, x = vals
    if not all(math.isfinite(v) and v > 0 for v in (z, y, x)):
        raise InputError(f"voxel sizes must be positive, got {(z, y, x)}")
    return z / ((y + x) / 2.0)


def default_axes(ndim: int) -> tuple:
    """Axis names for an array that carries none: the last axes are z, y, x.

    Examples
    --------
    >>> default_axes(2), default_axes(3), default_axes(4)
    (('y', 'x'), ('z', 'y', 'x'), ('dim_0', 'z', 'y', 'x'))
    """
    tail = SPATIAL[-min(ndim, 3):] if ndim else ()
    return tuple(f"dim_{i}" for i in range(ndim - len(tail))) + tail


def make_volume(array, axes=None, *, channel=None, timepoint=None, voxel_size=None, **fields) -> Volume:
    """Build a :class:`Volume` from an array and axis names, selecting a channel / time point.

    A time axis of length 1 is dropped; a longer one needs ``timepoint``.  ``channel``
    (an index) removes the channel axis; without it the channel axis stays and
    ``channel_axis`` says where.

    Examples
    --------
    >>> v = make_volume(np.zeros((1, 3, 4, 5), np.uint8), ("t", "c", "y", "x"))
    >>> v.axes, v.channel_axis, v.shape
    (('c', 'y', 'x'), 0, (3, 4, 5))
    """
    shape = tuple(int(s) for s in array.shape)
    axes = default_axes(len(shape)) if axes is None else tuple(str(a) for a in axes)
    if len(axes) != len(shape):
        raise InputError(f"{len(axes)} axis names {axes} for an array with {len(shape)} axes {shape}")
    if len(set(axes)) != len(axes):
        raise InputError(f"axis names {axes} are not unique")
    fixed = {}
    what = fields.get("source") or "input"
    if "t" in axes:
        ti = axes.index("t")
        nt = shape[ti]
        if timepoint is None:
            if nt != 1:
                raise InputError(f"{what} has {nt} time points (axes {axes}, shape {shape}); choose one with "
                                 f"timepoint (--timepoint)")
            timepoint = 0
        fixed[ti] = _check_index(timepoint, nt, "timepoint", what)
    elif timepoint not in (None, 0):
        raise InputError(f"{what} has no time axis (axes {axes}); timepoint={timepoint!r} cannot be used")
    if channel is not None:
        if "c" not in axes:
            raise InputError(f"{what} has no channel axis (axes {axes}); channel={channel!r} cannot be used"
                             " (for an array without axis names use channel_axis)")
        ci = axes.index("c")
        fixed[ci] = _check_index(channel, shape[ci], "channel", what)
    if fixed:
        if isinstance(array, AxisView):
            base_fixed = dict(array.fixed)
            for i, idx in fixed.items():
                base_fixed[array.order[i]] = idx
            array = AxisView(array.base, base_fixed, [a for i, a in enumerate(array.order) if i not in fixed])
        else:
            array = AxisView(array, fixed)
        axes = tuple(a for i, a in enumerate(axes) if i not in fixed)
    channel_axis = axes.index("c") if "c" in axes else None
    if voxel_size is not None and not isinstance(voxel_size, VoxelSize):
        sp = [a for a in axes if a not in ("c", "t")]
        voxel_size = VoxelSize(sp[-len(voxel_size):], voxel_size)
    return Volume(array=array, axes=axes, channel_axis=channel_axis, voxel_size=voxel_size, **fields)


def _check_index(value, n, name, what) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer index, got {value!r}")
    if not -n <= int(value) < n:
        raise InputError(f"{name} {value} is out of range: {what} has {n} along that axis (0..{n - 1})")
    return int(value) % n


# --------------------------------------------------------------------------- zarr access
def _zarr():
    from .io import _zarr as z

    return z()


def _node_format(node) -> int:
    meta = getattr(node, "metadata", None)
    return int(getattr(meta, "zarr_format", 2) or 2)


def _attrs(node) -> dict:
    attrs = node.attrs
    try:
        return dict(attrs.asdict())
    except AttributeError:
        return dict(attrs)


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


def is_ome_zarr(path) -> bool:
    """True when ``path`` is a zarr group with NGFF ``multiscales`` metadata.

    Examples
    --------
    >>> import tempfile
    >>> is_ome_zarr(tempfile.mkdtemp())
    False
    """
    try:
        node = _zarr().open(str(path), mode="r")
    except Exception:
        return False
    if hasattr(node, "dtype"):
        return False
    _, meta = ome_metadata(_attrs(node))
    return bool(meta.get("multiscales"))


def _axes_of(ms: dict, ndim: int) -> tuple:
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


def _transforms(transforms, ndim):
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


def _level_transform(ms: dict, dataset: dict, ndim: int):
    scale, trans = _transforms(dataset.get("coordinateTransformations"), ndim)
    gs, gt = _transforms(ms.get("coordinateTransformations"), ndim)
    return scale * gs, trans * gs + gt


def _pick_level(datasets, level, group_path):
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
            return _pick_level(datasets, int(level), group_path)
    raise InputError(f"level {level!r} is not one of the resolution levels {paths} of {group_path!r} "
                     f"(give an index 0..{len(paths) - 1} or a path)")


def _channel_index(channel, meta, axes_names, shape, what):
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
    from .io import open_zarr_node

    path = str(path)
    node = open_zarr_node(path)
    zarr = _zarr()
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
        return make_volume(node, None, channel=channel, timepoint=timepoint, zarr_format=_node_format(node),
                           kind="zarr", source=path)
    version, meta = ome_metadata(_attrs(node))
    if dataset is not None:
        try:
            sub = node[dataset]
        except Exception:
            keys = sorted(list(node.array_keys()) + list(node.group_keys()))
            raise InputError(f"zarr group {path!r} has no dataset {dataset!r} (members: {keys})") from None
        if hasattr(sub, "dtype"):
            if meta.get("multiscales"):
                return _open_ome(node, path, dataset, channel, timepoint)
            return make_volume(sub, None, channel=channel, timepoint=timepoint, zarr_format=_node_format(sub),
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
    version, meta = ome_metadata(_attrs(group))
    ms_list = meta.get("multiscales") or []
    if not isinstance(ms_list, list) or not ms_list or not isinstance(ms_list[0], dict):
        raise InputError(f"OME-Zarr {path!r} has malformed 'multiscales' metadata")
    ms = ms_list[0]
    datasets = [d for d in ms.get("datasets") or () if isinstance(d, dict) and "path" in d]
    if not datasets:
        raise InputError(f"OME-Zarr {path!r} lists no datasets in its 'multiscales' metadata")
    i = _pick_level(datasets, level, path)
    ds = datasets[i]
    try:
        arr = group[str(ds["path"])]
    except Exception:
        raise InputError(f"OME-Zarr {path!r} lists level {ds['path']!r} but has no such array") from None
    ndim = len(arr.shape)
    axes = _axes_of(ms, ndim)
    if len(axes) != ndim:
        raise InputError(f"OME-Zarr {path!r}: {len(axes)} axes in the metadata but level {ds['path']!r} has "
                         f"{ndim} dimensions {tuple(arr.shape)}")
    names = tuple(a["name"] for a in axes)
    scale, trans = _level_transform(ms, ds, ndim)
    sp = [j for j, a in enumerate(axes) if a.get("type") == "space"]
    vs = None
    if sp:
        vs = VoxelSize(tuple(names[j] for j in sp), tuple(scale[j] for j in sp),
                       tuple(axes[j].get("unit") for j in sp), tuple(trans[j] for j in sp))
    ch = _channel_index(channel, meta, names, arr.shape, repr(path))
    return make_volume(arr, names, channel=ch, timepoint=timepoint, voxel_size=vs, is_ome=True,
                       group_path=str(path), level=str(ds["path"]), zarr_format=_node_format(group),
                       ngff_version=version, kind="ome-zarr", source=str(path))


# --------------------------------------------------------------------------- writing metadata
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
    f = _per_axis_factor(factor, ndim)
    return [tuple(int(x) ** k for x in f) for k in range(int(n_levels))]


def _per_axis_factor(factor, ndim) -> tuple:
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
        entry["metadata"] = {"method": "mpicellpose.ome.downsample_labels",
                             "kwargs": {"method": method, "factor": list(_per_axis_factor(factor, len(spatial)))}}
    return entry


def _node_kind(path) -> str | None:
    """'array', 'group' or None (nothing there) from the metadata files on disk."""
    p = Path(str(path))
    if (p / ".zarray").exists():
        return "array"
    if (p / ".zgroup").exists():
        return "group"
    meta = p / "zarr.json"
    if meta.exists():
        import json

        try:
            return str(json.loads(meta.read_text()).get("node_type", "group"))
        except (OSError, ValueError):
            return "group"
    return None


def _open_group_for_write(path, zarr_format):
    """Open (or create) a zarr group of the given on-disk format for adding attributes."""
    from .io import zarr_major

    zarr = _zarr()
    p = str(path)
    kind = _node_kind(p)
    if kind == "array":
        raise InputError(f"{p!r} is a zarr array, not a group")
    if zarr_major() < 3 and zarr_format != 2:
        raise InputError("zarr-python 2 can only write NGFF 0.4 (zarr v2); install zarr>=3 for NGFF 0.5")
    if kind == "group":
        g = zarr.open_group(p, mode="r+")
        if _node_format(g) != zarr_format:
            raise InputError(f"{p!r} is a zarr v{_node_format(g)} group; cannot add NGFF "
                             f"{NGFF_FOR_FORMAT[zarr_format]} (zarr v{zarr_format}) metadata to it")
        return g
    if zarr_major() >= 3:
        return zarr.open_group(p, mode="a", zarr_format=zarr_format)
    return zarr.open_group(p, mode="a")


def _update_ome_attrs(group, version: str, updates: dict) -> None:
    """Merge ``updates`` into a group's OME metadata in the layout of ``version``."""
    attrs = _attrs(group)
    if version == "0.4":
        attrs.update(updates)
        group.attrs.update(updates)
    else:
        ome = dict(attrs.get("ome") or {})
        ome["version"] = version
        ome.update(updates)
        group.attrs.update({"ome": ome})


def array_options(zarr_format: int, axes) -> dict:
    """Extra :func:`mpicellpose.io.create_array` arguments for an NGFF level array.

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


def write_multiscales_metadata(group_path, axes, voxel_size=None, *, zarr_format: int | None = None,
                               n_levels: int = 1, factor=2, method: str = "mode", name: str | None = None,
                               extra: dict | None = None) -> dict:
    """Write (replace) the ``multiscales`` metadata of an image group; return the entry.

    ``zarr_format`` defaults to the format of the group's level-0 array ``0``.
    ``extra`` holds further OME keys (``omero``, ``image-label``...) merged in.

    Examples
    --------
    >>> import tempfile, os
    >>> from mpicellpose.io import create_array
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
    group = _open_group_for_write(group_path, fmt)
    updates = {"multiscales": [entry]}
    updates.update(extra or {})
    _update_ome_attrs(group, version, updates)
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
    :func:`build_pyramid` (which rewrites the level list when it adds levels).

    Parameters
    ----------
    group_path : str
        The label image group (see :func:`label_paths` / :func:`standalone_label_paths`).
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
    >>> from mpicellpose.io import create_array
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
        lg = _open_group_for_write(labels_dir, fmt)
        present = list(ome_metadata(_attrs(lg))[1].get("labels") or [])
        key = os.path.basename(str(group_path).rstrip("/"))
        if key not in present:
            present.append(key)
        _update_ome_attrs(lg, version, {"labels": present})
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
        g = _zarr().open_group(p, mode="r")
    except Exception:
        return []
    return list(ome_metadata(_attrs(g))[1].get("labels") or [])


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
    from .io import create_array, remove_path

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


# --------------------------------------------------------------------------- pyramids
def downsample_labels(block, factor=2, method: str = "mode") -> np.ndarray:
    """Downsample a label block by an integer factor per axis (pure).

    ``"mode"``: each output voxel is the most frequent non-zero label of its cell of
    ``factor`` voxels per axis (ties go to the smallest label; 0 only when the whole
    cell is background).  ``"nearest"``: the first voxel of each cell (stride
    sampling).  Cells cut by the block's far edge use the voxels present, so the
    output shape is ``ceil(shape / factor)``.

    Examples
    --------
    >>> b = np.array([[1, 2, 0, 0],
    ...               [2, 1, 0, 3]], np.uint32)
    >>> downsample_labels(b, 2).tolist()  # 1 and 2 tie: the smaller wins
    [[1, 3]]
    >>> downsample_labels(b, 2, "nearest").tolist()
    [[1, 0]]
    >>> downsample_labels(np.array([[5, 5, 7]]), (1, 2)).tolist()
    [[5, 7]]
    """
    block = np.asarray(block)
    f = _per_axis_factor(factor, block.ndim)
    if method not in LABEL_METHODS:
        raise InputError(f"method must be one of {LABEL_METHODS}, got {method!r}")
    if method == "nearest" or all(x == 1 for x in f):
        return np.ascontiguousarray(block[tuple(slice(None, None, x) for x in f)])
    out_shape = tuple(-(-s // x) for s, x in zip(block.shape, f))
    padded_shape = tuple(o * x for o, x in zip(out_shape, f))
    if padded_shape != block.shape:
        padded = np.zeros(padded_shape, block.dtype)
        padded[tuple(slice(0, s) for s in block.shape)] = block
    else:
        padded = block
    # (o0, f0, o1, f1, ...) -> (o0, o1, ..., f0 * f1 * ...)
    inter = []
    for o, x in zip(out_shape, f):
        inter += [o, x]
    cells = padded.reshape(inter)
    nd = block.ndim
    cells = cells.transpose(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    k = int(np.prod(f))
    cells = np.sort(cells.reshape(-1, k), axis=1)
    counts = np.zeros(cells.shape, np.int32)
    for j in range(k):
        counts[:, j] = np.count_nonzero(cells == cells[:, j:j + 1], axis=1)
    counts[cells == 0] = 0
    # rows are sorted ascending: the first maximum is the smallest label with that count
    pick = np.argmax(counts, axis=1)
    out = cells[np.arange(cells.shape[0]), pick]
    return out.reshape(out_shape).astype(block.dtype, copy=False)


def pyramid_shapes(shape, n_levels: int, factor=2) -> list:
    """Shapes of levels 0..n_levels (level 0 first).

    Examples
    --------
    >>> pyramid_shapes((5, 9, 9), 2)
    [(5, 9, 9), (3, 5, 5), (2, 3, 3)]
    """
    f = _per_axis_factor(factor, len(shape))
    out = [tuple(int(s) for s in shape)]
    for _ in range(int(n_levels)):
        out.append(tuple(-(-s // x) for s, x in zip(out[-1], f)))
    return out


def _chunk_boxes(shape, chunks):
    grid = [range(0, s, c) for s, c in zip(shape, chunks)]
    for starts in np.ndindex(*[len(g) for g in grid]):
        yield tuple((int(g[i]), int(min(g[i] + c, s))) for g, i, c, s in zip(grid, starts, chunks, shape))


def contiguous_share(n_items: int, rank: int, size: int) -> range:
    """The contiguous run of ``range(n_items)`` that ``rank`` of ``size`` handles.

    Examples
    --------
    >>> [list(contiguous_share(5, r, 2)) for r in range(2)]
    [[0, 1], [2, 3, 4]]
    """
    return range(n_items * rank // size, n_items * (rank + 1) // size)


def mirror_levels(image_group, level=0, axes=None) -> dict:
    """How to build a label pyramid that matches an OME-Zarr image's own levels.

    NGFF asks a label image in ``<image>/labels`` to have as many levels as the image.
    For the image levels after ``level`` (the one that was segmented), this returns
    their spatial ``shapes``, the per-level integer ``factor`` (rounded ratio of
    consecutive shapes) and the image's ``transforms`` (scale, translation) restricted
    to ``axes`` (default: the image's spatial axes).

    Returns
    -------
    dict with ``n_levels``, ``factor`` (list of tuples), ``shapes`` (list of tuples),
    ``transforms`` (list of (scale, translation), level ``level`` first).

    Examples
    --------
    >>> import tempfile, os
    >>> from mpicellpose.io import create_array
    >>> g = os.path.join(tempfile.mkdtemp(), "img.ome.zarr")
    >>> for k, shp in enumerate([(4, 9, 11), (4, 4, 5)]):
    ...     _ = create_array(os.path.join(g, str(k)), shp, shp, np.uint8)
    >>> _ = write_multiscales_metadata(g, "zyx", (2.0, 0.5, 0.5), n_levels=2, factor=(1, 2, 2))
    >>> m = mirror_levels(g)
    >>> m["n_levels"], m["factor"], m["shapes"]
    (1, [(1, 2, 2)], [(4, 4, 5)])
    """
    group = _zarr().open_group(str(image_group), mode="r")
    _, meta = ome_metadata(_attrs(group))
    ms = (meta.get("multiscales") or [None])[0]
    if not isinstance(ms, dict):
        raise InputError(f"{str(image_group)!r} is not an OME-Zarr image (no 'multiscales' metadata)")
    datasets = [d for d in ms.get("datasets") or () if isinstance(d, dict) and "path" in d]
    start = _pick_level(datasets, level, str(image_group))
    first = group[str(datasets[start]["path"])]
    ndim = len(first.shape)
    ax = _axes_of(ms, ndim)
    names = [a["name"] for a in ax]
    if axes is None:
        keep = [i for i, a in enumerate(ax) if a.get("type") == "space"]
    else:
        missing = [a for a in axes if a not in names]
        if missing:
            raise InputError(f"axes {missing} are not axes of the image {str(image_group)!r} ({names})")
        keep = [names.index(a) for a in axes]
    shapes, factors, transforms = [], [], []
    prev = tuple(int(first.shape[i]) for i in keep)
    for k in range(start, len(datasets)):
        arr = group[str(datasets[k]["path"])]
        shp = tuple(int(arr.shape[i]) for i in keep)
        sc, tr = _level_transform(ms, datasets[k], ndim)
        transforms.append(([float(sc[i]) for i in keep], [float(tr[i]) for i in keep]))
        if k > start:
            factors.append(tuple(max(1, int(round(p / max(c, 1)))) for p, c in zip(prev, shp)))
            shapes.append(shp)
        prev = shp
    return {"n_levels": len(shapes), "factor": factors, "shapes": shapes, "transforms": transforms}


def build_pyramid(group_path, n_levels=None, comm=None, factor=2, method: str = "mode", *, like=None,
                  like_level=0) -> list:
    """Write label levels ``1..n_levels`` from level ``0`` of an NGFF image group (collective).

    Every rank of ``comm`` calls it.  Level k is computed from level k-1 with
    :func:`downsample_labels`; the output chunks of a level (chunked like level 0, or
    smaller at the top) are split into contiguous runs, one per rank, so each chunk is
    written by exactly one rank; all ranks wait for each other between levels.  Rank 0
    then rewrites the group's ``multiscales`` to list every level (scale times the
    factor, translation moved to the cell centre for ``"mode"``), keeping the axes,
    level-0 scale and other metadata written before by :func:`write_labels_metadata`.
    An error on any rank is raised on every rank.

    Parameters
    ----------
    group_path : str
        Image group holding level ``0`` and ``multiscales`` metadata.
    n_levels : int, optional
        Number of levels to add (required unless ``like`` is given).
    comm : communicator, optional
        Default: a one-rank communicator.
    factor : int, tuple of int, or list of those
        Downsampling per level and axis (``(1, 2, 2)`` keeps z); a list gives one
        factor per level.
    method : {"mode", "nearest"}
    like : str, optional
        An OME-Zarr image whose levels after ``like_level`` the labels must mirror
        (labels inside ``<image>/labels``): level shapes, factors and coordinate
        transformations are taken from it (see :func:`mirror_levels`).
    like_level : int or str
        The image level the labels were computed from.

    Returns
    -------
    list of tuple : the shape of every level, level 0 first.

    Examples
    --------
    >>> import tempfile, os
    >>> from mpicellpose.io import create_array, open_array
    >>> g = os.path.join(tempfile.mkdtemp(), "lab.ome.zarr")
    >>> a = create_array(os.path.join(g, "0"), (4, 4), (2, 2), np.uint32)
    >>> a[...] = np.array([[1, 1, 0, 0], [1, 2, 0, 3], [0, 0, 4, 4], [0, 0, 4, 4]])
    >>> _ = write_labels_metadata(g, ("y", "x"), (0.5, 0.5))
    >>> build_pyramid(g, 2)
    [(4, 4), (2, 2), (1, 1)]
    >>> open_array(os.path.join(g, "1"))[...].tolist()
    [[1, 3], [0, 4]]
    >>> open_volume(g, level=1).voxel_size.size
    (1.0, 1.0)
    """
    from . import comm as mpi
    from .io import create_array, open_array

    if method not in LABEL_METHODS:
        raise InputError(f"method must be one of {LABEL_METHODS}, got {method!r}")
    if like is None and (isinstance(n_levels, bool) or not isinstance(n_levels, (int, np.integer))
                         or n_levels < 0):
        raise InputError(f"n_levels must be a non-negative integer, got {n_levels!r}")
    comm = mpi.SelfComm() if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    box = mpi.Mailbox(comm)
    group_path = str(group_path)
    err = None
    shapes = factors = transforms = info = None
    try:
        level0 = open_array(os.path.join(group_path, "0"))
        shape0 = tuple(int(s) for s in level0.shape)
        chunks0 = tuple(int(c) for c in level0.chunks)
        fmt = _node_format(level0)
        try:
            g = _zarr().open_group(group_path, mode="r")
        except Exception:
            raise InputError(f"{group_path!r} is not a zarr group; call write_labels_metadata first") from None
        version, meta = ome_metadata(_attrs(g))
        ms = (meta.get("multiscales") or [None])[0]
        if not isinstance(ms, dict):
            raise InputError(f"{group_path!r} has no 'multiscales' metadata; call write_labels_metadata first")
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes") or ()] or \
            list(default_axes(len(shape0)))
        if like is not None:
            plan = mirror_levels(like, like_level, axes)
            if len(plan["transforms"][0][0]) != len(shape0):
                raise InputError(f"labels {group_path!r} and image {str(like)!r} have different axes")
            n = plan["n_levels"] if n_levels is None else min(int(n_levels), plan["n_levels"])
            if n_levels is not None and int(n_levels) != plan["n_levels"] and rank == 0:
                log.warning("image %s has %d level(s) after the segmented one; writing %d label level(s)",
                            like, plan["n_levels"], n)
            n_levels = n
            factors = plan["factor"][:n]
            shapes = [shape0] + plan["shapes"][:n]
            transforms = plan["transforms"][: n + 1]
        else:
            if isinstance(factor, list):
                if len(factor) != n_levels:
                    raise InputError(f"{len(factor)} factors for {n_levels} levels")
                factors = [_per_axis_factor(f, len(shape0)) for f in factor]
            else:
                factors = [_per_axis_factor(factor, len(shape0))] * int(n_levels)
            shapes = [shape0]
            for f in factors:
                shapes.append(tuple(-(-s // x) for s, x in zip(shapes[-1], f)))
        info = (ms, version, fmt)
        if rank == 0:
            for k in range(1, n_levels + 1):
                ch = tuple(min(c, s) for c, s in zip(chunks0, shapes[k]))
                create_array(os.path.join(group_path, str(k)), shapes[k], ch, level0.dtype, zarr_format=fmt,
                             overwrite=True, **array_options(fmt, axes))
    except Exception as exc:
        err = exc
    box.agree(err, where="creating the pyramid levels")
    for k in range(1, n_levels + 1):
        err = None
        try:
            f = factors[k - 1]
            src = open_array(os.path.join(group_path, str(k - 1)))
            dst = open_array(os.path.join(group_path, str(k)), mode="r+")
            boxes = list(_chunk_boxes(shapes[k], tuple(int(c) for c in dst.chunks)))
            for i in contiguous_share(len(boxes), rank, size):
                out_box = boxes[i]
                read = tuple(slice(a * x, min(b * x, s)) for (a, b), x, s in zip(out_box, f, shapes[k - 1]))
                down = downsample_labels(src[read], f, method)
                want = tuple(b - a for a, b in out_box)
                if down.shape != want:  # the target level was rounded down (or up) by the image
                    fitted = np.zeros(want, down.dtype)
                    common = tuple(slice(0, min(d, w)) for d, w in zip(down.shape, want))
                    fitted[common] = down[common]
                    down = fitted
                dst[tuple(slice(a, b) for a, b in out_box)] = down
        except Exception as exc:
            err = exc
        box.agree(err, where=f"writing pyramid level {k}")
    err = None
    if rank == 0:
        try:
            ms, version, fmt = info
            _rewrite_levels(group_path, ms, version, fmt, factors, method, transforms)
        except Exception as exc:
            err = exc
    box.agree(err, where="writing the pyramid metadata")
    if rank == 0:
        log.info("pyramid of %s: %d level(s) %s (%s)", group_path, n_levels + 1, shapes, method)
    return shapes


def _rewrite_levels(group_path, ms, version, fmt, factors, method, transforms=None):
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes") or ()]
    nd = len(axes)
    first = next((d for d in ms.get("datasets") or () if isinstance(d, dict) and str(d.get("path")) == "0"), None)
    scale0, origin0 = (np.ones(nd), np.zeros(nd)) if first is None else \
        _transforms(first.get("coordinateTransformations"), nd)
    datasets = []
    cum = np.ones(nd)
    for k in range(len(factors) + 1):
        if k:
            cum = cum * np.asarray(factors[k - 1], float)
        if transforms is not None:
            sc, tr = np.asarray(transforms[k][0], float), np.asarray(transforms[k][1], float)
        else:
            sc = scale0 * cum
            tr = origin0 + (cum - 1.0) / 2.0 * scale0 if method == "mode" else origin0
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(v) for v in sc]},
            {"type": "translation", "translation": [float(v) for v in tr]},
        ]})
    entry = dict(ms)
    entry["datasets"] = datasets
    entry["metadata"] = {"method": "mpicellpose.ome.downsample_labels",
                         "kwargs": {"method": method, "factor": [list(f) for f in factors]}}
    group = _open_group_for_write(group_path, fmt)
    _update_ome_attrs(group, version or NGFF_FOR_FORMAT[fmt], {"multiscales": [entry]})
