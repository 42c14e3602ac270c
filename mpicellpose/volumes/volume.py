"""The input volume model: axes, voxel size, lazy axis views (pure: no files, no MPI).

A :class:`Volume` is a lazily sliced array plus what is known about it: the name of
each axis (``"t"``, ``"c"``, ``"z"``, ``"y"``, ``"x"``), where the channel axis is and
the physical voxel size.  :func:`make_volume` builds one from an array and axis names,
selecting a channel and a time point through an :class:`AxisView` (nothing is read).
The readers (:mod:`mpicellpose.volumes.readers`, :mod:`mpicellpose.volumes.ngff_io`) return volumes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import InputError

SPATIAL = ("z", "y", "x")


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
