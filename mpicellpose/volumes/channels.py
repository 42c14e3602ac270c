"""Choosing channels of a multi-channel input, lazily: ``--channel 1,0`` (cytoplasm 1, nucleus 0).

:func:`select_channels` turns an opened :class:`mpicellpose.volumes.volume.Volume` into one whose
channel axis holds the chosen channels in the chosen order (:class:`ChannelView`: nothing
is read until a block is sliced).  The channel axis is the input's own ``c`` axis (OME-Zarr,
OME-TIFF, ImageJ, ``axes=``) or, for an array without axis names, ``--channel-axis``.
Everything downstream (block reads, global normalisation per channel, the backend) sees only
the chosen channels, in order.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import ConfigError, InputError
from .volume import AxisView, default_axes


#: Key of the per-channel bounds ``[[low, high], ...]`` in the ``normalize`` dict of a multi-channel
#: input (:func:`mpicellpose.cellpose.segmenter.apply_fixed_bounds` applies them; Cellpose never sees the key).
#: ``lowhigh`` there holds the first channel's (the one segmented).
CHANNEL_BOUNDS = "lowhigh_per_channel"


class ChannelView:
    """A lazy view of ``base`` keeping, along ``axis``, the channels ``index`` in that order.

    One read per slice: the span of the chosen channels is read, then they are picked.

    Examples
    --------
    >>> a = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    >>> v = ChannelView(a, 0, (2, 0))
    >>> v.shape, bool((v[:, 1:3] == a[[2, 0], 1:3]).all()), bool((v[1, 2] == a[0, 2]).all())
    ((2, 4, 5), True, True)
    """

    def __init__(self, base, axis: int, index):
        self.base, self.axis, self.index = base, int(axis), tuple(int(i) for i in index)
        self.fixed = {}  # nothing selected away (mpicellpose.tools.preview walks .base through views)

    @property
    def shape(self) -> tuple:
        s = [int(n) for n in self.base.shape]
        s[self.axis] = len(self.index)
        return tuple(s)

    @property
    def dtype(self):
        return np.dtype(self.base.dtype)

    @property
    def ndim(self) -> int:
        return len(self.base.shape)

    @property
    def chunks(self):
        ch = getattr(self.base, "chunks", None)
        if ch is None:
            return None
        ch = [int(c) for c in ch]
        ch[self.axis] = len(self.index)
        return tuple(ch)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"<ChannelView channels {list(self.index)} of axis {self.axis} of {type(self.base).__name__}>"

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key):
        key = AxisView._expand(self, key)  # integers, slices, one Ellipsis
        k = key[self.axis]
        if not isinstance(k, slice):
            return np.asarray(self.base[tuple(key[:self.axis] + [self.index[k]] + key[self.axis + 1:])])
        chosen = self.index[k]
        lo, hi = (min(chosen), max(chosen) + 1) if chosen else (0, 0)
        out = np.asarray(self.base[tuple(key[:self.axis] + [slice(lo, hi)] + key[self.axis + 1:])])
        at = sum(isinstance(x, slice) for x in key[:self.axis])  # where the channel axis is in ``out``
        return np.take(out, [c - lo for c in chosen], axis=at)


def _channel_names(vol) -> list:
    """OME-Zarr ``omero`` channel labels of ``vol`` ([] when there are none)."""
    if not vol.is_ome or not vol.group_path:
        return []
    try:
        from .ngff import ome_metadata
        from .storage import node_attrs, open_zarr_node

        meta = ome_metadata(node_attrs(open_zarr_node(vol.group_path)))[1]
        return [str(c.get("label", "")) if isinstance(c, dict) else "" for c in
                (meta.get("omero") or {}).get("channels") or ()]
    except Exception:  # noqa: BLE001 - no names: indices still work
        return []


def _index(value, n, names, what, axis) -> int:
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        raise InputError(f"{what} has no channel named {value!r} (channels: {names or 'unnamed'}; "
                         f"give indices 0..{n - 1})")
    if not -n <= int(value) < n:
        raise InputError(f"channel {value} is out of range: {what} has {n} channel(s) along axis {axis} "
                         f"(0..{n - 1})")
    return int(value) % n


def select_channels(vol, channels, axis=None):
    """``vol`` with its channel axis reduced to ``channels``, in that order (lazy).

    Parameters
    ----------
    vol : Volume
        As opened, with all channels.
    channels : sequence of int or str
        Indices (negative from the end) or OME-Zarr ``omero`` channel labels.
    axis : int, optional
        The channel axis of an input without axis names (``--channel-axis``); it must agree
        with the input's own ``c`` axis where there is one.

    Raises
    ------
    ConfigError
        A bad ``axis``.
    InputError
        No channel axis, a channel out of range or unknown, a channel given twice.

    Examples
    --------
    >>> from mpicellpose.volumes.volume import make_volume
    >>> v = select_channels(make_volume(np.zeros((5, 6, 7, 3), np.uint8)), [2, 0], axis=-1)
    >>> v.shape, v.channel_axis, v.axes
    ((5, 6, 7, 2), 3, ('z', 'y', 'x', 'c'))
    """
    what = vol.source or "input"
    nd = len(vol.shape)
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise ConfigError(f"channel_axis must be an integer, got {axis!r}")
        if not -nd <= int(axis) < nd:
            raise ConfigError(f"channel_axis {axis} is out of range for an input with {nd} axes {vol.shape}")
        axis = int(axis) % nd
        if vol.channel_axis is not None and axis != vol.channel_axis:
            raise ConfigError(f"channel_axis {axis} is not the channel axis of {what}: its axes are {vol.axes} "
                              f"(channels on axis {vol.channel_axis}); leave --channel-axis out or give "
                              f"{vol.channel_axis}")
    else:
        axis = vol.channel_axis
    if axis is None:
        raise InputError(f"{what} has no channel axis (axes {vol.axes}, shape {vol.shape}); channel "
                         f"{list(channels)} cannot be chosen: give --channel-axis (e.g. 0 for C,Z,Y,X, -1 for "
                         f"Z,Y,X,C)")
    n = int(vol.shape[axis])
    names = _channel_names(vol) if any(isinstance(c, str) for c in channels) else []
    index = tuple(_index(c, n, names, what, axis) for c in channels)
    if len(set(index)) != len(index):
        raise InputError(f"channel {list(channels)} names one channel of {what} twice")
    if vol.channel_axis is None and tuple(vol.axes) == default_axes(nd):  # no names: z, y, x around the c axis
        axes = list(default_axes(nd - 1))
        axes.insert(axis, "c")
        axes = tuple(axes)
    else:
        axes = tuple("c" if i == axis else a for i, a in enumerate(vol.axes))
    return replace(vol, array=ChannelView(vol.array, axis, index), axes=axes, channel_axis=axis)
