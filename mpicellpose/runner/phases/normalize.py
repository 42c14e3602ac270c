"""Global intensity normalisation: percentiles of the whole volume, sampled in parallel.

Per-block normalisation makes neighbouring blocks differ in brightness at their seams and
makes the labels depend on the block size; the default samples up to 64 blocks spread over
the grid (honouring the mask), computes the percentiles once and gives every block the same
bounds (see docs/normalization.md for the measured trade-off).  With several channels (e.g.
cytoplasm and nucleus) every channel gets its own bounds, from the same sampled voxels.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ... import comm as mpi
from ...errors import InputError, agreed
from ...grid import geometry as geo
from ...volumes import readers
from ...volumes.channels import CHANNEL_BOUNDS
from ..runlog import log

NORM_SAMPLE_BLOCKS = 64
NORM_SAMPLE_VOXELS = 1 << 18


def sample_blocks(kept, n=NORM_SAMPLE_BLOCKS):
    """Up to ``n`` kept blocks spread evenly over the grid order (deterministic)."""
    kept = list(kept)
    if len(kept) <= n:
        return kept
    idx = np.unique(np.linspace(0, len(kept) - 1, n).round().astype(int))
    return [kept[i] for i in idx]


def sample_block_voxels(src, blk, shape, channel_axis, mask=None):
    """A strided sample of a block core's voxels (foreground of the mask only, if given):
    shape (channels, n), the same voxels of every channel (one channel without a channel axis)."""
    size = geo.box_size(blk.core)
    step = max(1, int(math.ceil((size / NORM_SAMPLE_VOXELS) ** (1.0 / len(blk.core)))))
    sl = [slice(a, b, step) for a, b in blk.core]
    full = list(sl)
    if channel_axis is not None:
        full.insert(channel_axis, slice(None))
    vals = np.asarray(src[tuple(full)], dtype=np.float64)
    vals = vals[None] if channel_axis is None else np.moveaxis(vals, channel_axis, 0)
    vals = vals.reshape(vals.shape[0], -1)
    if mask is not None:  # a boolean numpy array at any (lower) resolution
        coords = np.meshgrid(*[np.arange(s.start, s.stop, s.step) for s in sl], indexing="ij")
        idx = tuple(np.minimum((c * m // n), m - 1) for c, m, n in zip(coords, mask.shape, shape))
        vals = vals[:, mask[idx].ravel()]
    return vals


def channel_bounds(vals, pct):
    """``[[low, high], ...]`` per channel: the percentiles ``pct`` of each row of ``vals``
    (a flat channel gets ``high = low + 1``).

    >>> channel_bounds(np.array([[0., 10, 20], [5, 5, 5]]), [0, 100])
    [[0.0, 20.0], [5.0, 6.0]]
    """
    out = []
    for row in vals:
        lo, hi = (float(v) for v in np.percentile(row, pct))
        out.append([lo, hi if hi > lo else lo + 1.0])
    return out


def global_normalization(options, settings, kept, src, box):
    """Percentiles of the whole volume (sampled in parallel), or None when not wanted.

    Every rank calls it (``box``: the run's :class:`mpicellpose.comm.Mailbox`); ``kept``
    are the blocks in the mask; ``options``: the run's backend and mask
    (:class:`mpicellpose.runner.context.RunOptions`, or the configuration).  Returns the dict to pass as Cellpose's ``normalize`` on
    every rank.  The sample depends on the grid only, so the bounds are the same for any
    number of ranks (and for :func:`mpicellpose.process_block`).
    """
    if options.backend != "cellpose" or settings.normalize != "global":
        return None
    user = settings.eval_kwargs.get("normalize", True)
    if user is False or (isinstance(user, dict) and user.get("lowhigh") is not None):
        return None
    nchan = 1 if settings.channel_axis is None else int(src.shape[settings.channel_axis])
    pct = list((user or {}).get("percentile") or [1.0, 99.0]) if isinstance(user, dict) else [1.0, 99.0]
    rank, size = box.rank, box.size
    grid = settings.grid
    err, mine = None, []
    try:  # everything that can fail on one rank stays inside: the gather below is collective
        mask = options.mask
        if isinstance(mask, (str, os.PathLike)):
            mask = readers.open_input(mask, what="mask")
        if mask is not None and int(np.prod(mask.shape)) > (1 << 27):
            mask = None  # a huge mask: block-level skipping already honours it
        elif mask is not None:
            mask = np.asarray(mask[...]).astype(bool)
        for b in sample_blocks(kept)[rank::size]:
            mine.append(sample_block_voxels(src, grid.block(b), settings.shape, settings.channel_axis, mask))
    except Exception as exc:
        err = exc
    mine = np.concatenate(mine, axis=1) if mine else np.zeros((nchan, 0))
    parts = box.gather((mine, None if err is None else mpi.describe(err)), "sampling for normalisation")
    result = None
    if rank == 0:
        errors = [e for _, e in parts if e]
        vals = np.concatenate([v.reshape(nchan, -1) for v, _ in parts], axis=1)
        if errors:
            result = ("error", f"reading samples for normalisation failed: {errors[0]}")
        elif vals.size and not np.all(np.isfinite(vals)):
            result = ("error", f"input contains NaN/inf values ({int(np.count_nonzero(~np.isfinite(vals)))} "
                               f"in a sample of {vals.size} voxels); clean the input or mask them out")
        elif vals.size == 0:
            result = ("ok", None)
        else:
            bounds = channel_bounds(vals, pct)
            norm = dict(user) if isinstance(user, dict) else {}
            # lowhigh: the channel segmented (the first); CHANNEL_BOUNDS: every channel's, in order
            norm.update({"normalize": True, "lowhigh": bounds[0], "percentile": None})
            if nchan > 1:
                norm[CHANNEL_BOUNDS] = bounds
            result = ("ok", {"normalize": norm, "percentile": pct, "sampled_voxels": int(vals.shape[1]),
                             "sampled_blocks": len(sample_blocks(kept)), "channels": nchan})
    status, value = box.bcast(result, "sending the normalisation bounds")
    if status == "error":
        raise agreed(InputError(value))
    return value
