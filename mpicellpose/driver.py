"""Sequence the phases of a run: plan, segment, stitch, number, relabel, table.

Every phase ends with a collective agreement (see :mod:`mpicellpose.comm`), so an error
on any rank stops all of them with the same message.  Every phase leaves its result on
disk in the work directory, so re-running the same command resumes where it stopped.

Work directory layout (``<output stem>.mpicellpose-work`` unless given)::

    run.json            fingerprint of the configuration (refuses a changed one)
    scratch.zarr        block-local labels (uint32), one chunk per block
    blocks/<i>.npz      per-block record = done marker: label count, per-label stats,
                        the views of its faces that stitching needs
    stitch.npz          offsets, merged-away IDs and their roots
    relabel/<i>.done    output chunk i written with final IDs
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from . import comm as mpi
from . import geometry as geo
from . import io as mio
from . import stitch as st
from .backends import DEFAULT_DIAMETER, check_eval_kwargs, make_backend, resolve_model
from .config import RunConfig
from .errors import (BackendError, ConfigError, DistributedError, InputError, MpiCellposeError,
                     OutputExistsError, ResumeMismatchError)

_RANK = contextvars.ContextVar("mpicellpose_rank", default=0)


class _RankAdapter(logging.LoggerAdapter):
    """Adds ``rank`` (this run's rank on its communicator) to every record."""

    def process(self, msg, kwargs):
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("rank", _RANK.get())
        kwargs["extra"] = extra
        return msg, kwargs


log = _RankAdapter(logging.getLogger(__name__), {})


# --------------------------------------------------------------------------- results
class Boxes:
    """Bounding boxes of labels 1..N as a read-only sequence: ``boxes[k]`` is the tuple of
    slices bounding label ``k + 1`` (the reference's meaning).  Backed by an (N, D, 2)
    array, memory-mapped from disk when large."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return int(self.array.shape[0])

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        row = self.array[k]
        return tuple(slice(int(a), int(b)) for a, b in row)

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def __repr__(self):
        return f"Boxes({len(self)} labels)"


@dataclass
class RunResult:
    labels: object
    boxes: Boxes
    n_objects: int
    n_merged: int
    timings: dict = field(default_factory=dict)
    table_path: str | None = None
    reused_blocks: int = 0
    stats: dict = field(default_factory=dict)
    output: str | None = None


# --------------------------------------------------------------------------- paths
def output_stem(output) -> str:
    s = str(output).rstrip("/")
    for suffix in (".ome.zarr", ".zarr"):
        if s.endswith(suffix):
            return s[: -len(suffix)]
    return s


def default_work_dir(stem) -> str:
    return stem + ".mpicellpose-work"


def table_path(stem) -> str:
    return stem + ".objects.csv"


def boxes_path(stem) -> str:
    return stem + ".boxes.npy"


@dataclass
class OutputPlace:
    """Where the labels go: a plain zarr array, or level 0 of an NGFF label image."""

    array: str                   # the level-0 label array
    stem: str                    # prefix of the object table, boxes and work directory
    group: str | None = None     # NGFF label image group (None: plain array)
    image_group: str | None = None  # the input image group when the labels go inside it
    name: str | None = None      # label image name inside the image group


def resolve_output(cfg, vol) -> OutputPlace:
    """Decide where the labels are written (pure)."""
    from . import ome

    if vol is not None and vol.is_ome and (cfg.labels_name or cfg.output is None):
        name = cfg.labels_name or "mpicellpose"
        group, arr0 = ome.label_paths(vol.group_path, name)
        return OutputPlace(os.path.abspath(arr0), output_stem(os.path.abspath(vol.group_path)) + "." + name,
                           os.path.abspath(group), os.path.abspath(vol.group_path), name)
    if cfg.output is None:
        raise ConfigError("no OUTPUT given: it can be left out only for an OME-Zarr input (the labels then go "
                          "inside the image group, under labels/)")
    out = os.path.abspath(str(cfg.output))
    if out.rstrip("/").endswith(".ome.zarr"):
        group, arr0 = ome.standalone_label_paths(out)
        return OutputPlace(arr0, output_stem(out), group)
    return OutputPlace(out, output_stem(out))


class _Paths:
    def __init__(self, work):
        self.work = Path(work)
        self.run = self.work / "run.json"
        self.scratch = self.work / "scratch.zarr"
        self.blocks = self.work / "blocks"
        self.stitch = self.work / "stitch.npz"
        self.relabel = self.work / "relabel"

    def record(self, linear):
        return self.blocks / f"{int(linear)}.npz"

    def relabel_done(self, linear):
        return self.relabel / f"{int(linear)}.done"


# --------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What rank 0 decided; broadcast to every rank."""

    shape: tuple
    blocksize: tuple
    overlap: tuple
    channel_axis: int | None
    kept: list
    done: list
    seg_assignment: list
    rule: str
    connectivity: int
    work_dir: str
    fingerprint: dict
    run_id: str
    zarr_format: int
    resolved_model: dict | None
    eval_kwargs: dict
    normalization: dict | None = None
    output: OutputPlace | None = None
    voxel_size: tuple | None = None
    voxel_unit: str | None = None
    axes: tuple | None = None

    @property
    def grid(self) -> geo.BlockGrid:
        return geo.BlockGrid(self.shape, self.blocksize, self.overlap)


def spatial_shape(shape, channel_axis):
    shape = tuple(int(s) for s in shape)
    if channel_axis is None:
        return shape
    return shape[:channel_axis] + shape[channel_axis + 1:]


def validate_input(arr, channel_axis):
    """Check the input's shape and dtype; return the normalized channel axis."""
    shape = tuple(int(s) for s in arr.shape)
    nd = len(shape)
    if channel_axis is not None:
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
            raise ConfigError(f"channel_axis must be an integer, got {channel_axis!r}")
        if not -nd <= channel_axis < nd:
            raise ConfigError(f"channel_axis {channel_axis} is out of range for an input with {nd} axes {shape}")
        channel_axis = int(channel_axis) % nd
    nsp = nd - (channel_axis is not None)
    if nsp not in (2, 3):
        hint = " (pass channel_axis for a channel axis, e.g. C,Z,Y,X -> 0)" if nsp == 4 else ""
        raise InputError(
            f"input has {nd} axes {shape}; mpicellpose segments 2D or 3D volumes "
            f"(plus an optional channel axis){hint}"
        )
    if any(s == 0 for s in shape):
        raise InputError(f"input shape {shape} has a zero-sized axis")
    dt = np.dtype(arr.dtype)
    if dt.kind not in "biuf":
        raise InputError(f"input dtype {dt} is not supported (use integer, float or bool data)")
    return channel_axis


def _mask_identity(mask):
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        return {"path": os.path.abspath(mask)}
    arr = np.asarray(mask[...])
    return {"shape": list(arr.shape), "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()}


def _input_identity(cfg, arr, vol=None):
    ident = {"shape": list(arr.shape), "dtype": str(np.dtype(arr.dtype))}
    if vol is not None and vol.kind != "array":
        ident.update({"kind": vol.kind, "level": vol.level, "channel": cfg.channel, "timepoint": cfg.timepoint})
    if isinstance(cfg.input, (str, os.PathLike)):
        ident["path"] = os.path.abspath(cfg.input)
        ident["dataset"] = cfg.dataset
    else:
        ident["type"] = type(cfg.input).__name__
        store = getattr(getattr(cfg.input, "store", None), "root", None) or getattr(cfg.input, "store", None)
        if store is not None:
            ident["store"] = str(store)
        name = getattr(cfg.input, "path", None) or getattr(cfg.input, "name", None)
        if name is not None:
            ident["name"] = str(name)
    return ident


def _default_overlap(cfg, ndim, diameter):
    if cfg.overlap is not None:
        return geo.per_axis(cfg.overlap, ndim, "overlap", minimum=0)
    if cfg.backend != "cellpose":
        return (0,) * ndim if cfg.stitch_rule == "touch" else (cfg.iou_depth,) * ndim
    ov = 2 * float(diameter)
    aniso = float(cfg.eval_kwargs.get("anisotropy") or 1.0)
    if ndim == 3:
        return (int(math.ceil(ov / aniso)),) + (int(math.ceil(ov)),) * 2
    return (int(math.ceil(ov)),) * ndim


def fingerprint_diff(old: dict, new: dict, prefix="") -> list:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def make_plan(cfg: RunConfig, vol, n_ranks: int, *, prepare: bool = True) -> Plan:
    """Rank 0: validate everything, prepare the work directory, decide the block grid.

    With ``prepare=False`` (the dry run of ``mpicellpose plan``) nothing is written.
    ``vol`` is a :class:`mpicellpose.ome.Volume` (see :func:`mpicellpose.io.open_volume_spec`).
    """
    src = vol.array
    channel_axis = cfg.channel_axis if cfg.channel_axis is not None else cfg.eval_kwargs.get("channel_axis")
    if channel_axis is None:
        channel_axis = vol.channel_axis
    channel_axis = validate_input(src, channel_axis)
    shape = spatial_shape(src.shape, channel_axis)
    ndim = len(shape)
    blocksize = geo.per_axis(cfg.blocksize, ndim, "blocksize", minimum=1)
    # backend specifics, checked before any heavy work
    resolved, eval_kwargs = None, dict(cfg.eval_kwargs)
    eval_kwargs.pop("channel_axis", None)
    eval_kwargs.pop("z_axis", None)
    diameter = cfg.diameter
    if cfg.backend == "cellpose":
        check_eval_kwargs(cfg.eval_kwargs)
        resolved = resolve_model(cfg.model_kwargs)
        if diameter is None:
            diameter = 16.0 if resolved.get("name") == "demo" else DEFAULT_DIAMETER
        eval_kwargs["diameter"] = diameter
    voxel_size, voxel_unit = cfg.voxel_size, ("micrometer" if cfg.voxel_size else None)
    if voxel_size is None and vol.voxel_size is not None:
        voxel_size = tuple(float(v) for v in vol.voxel_size.size)
        units = {u for u in (vol.voxel_size.units or ()) if u}
        voxel_unit = units.pop() if len(units) == 1 else ("mixed" if units else "unknown")
    if (cfg.backend == "cellpose" and ndim == 3 and voxel_size is not None and "anisotropy" not in eval_kwargs):
        from .ome import anisotropy

        a = anisotropy(voxel_size)
        if abs(a - 1.0) > 1e-6:
            eval_kwargs["anisotropy"] = a
    if cfg.voxel_size is not None and len(cfg.voxel_size) != ndim:
        raise ConfigError(f"voxel_size has {len(cfg.voxel_size)} values {cfg.voxel_size} but the volume has "
                          f"{ndim} spatial axes")
    overlap = _default_overlap(cfg, ndim, diameter or DEFAULT_DIAMETER)
    rule = cfg.stitch_rule
    conn = cfg.backend_kwargs.get("connectivity", 1)
    conn = ndim if conn == "full" else min(int(conn), ndim)
    if rule == "iou" and min(overlap) < 1:
        raise ConfigError(f"stitch='iou' needs an overlap of at least 1 voxel on every axis, got {overlap}")
    grid = geo.BlockGrid(shape, blocksize, overlap)
    # mask
    mask = cfg.mask
    if isinstance(mask, (str, os.PathLike)):
        mask = mio.open_input(mask, what="mask")
    if mask is not None:
        geo.check_mask_shape(mask.shape, shape)
    keep = geo.blocks_in_mask(grid, mask)
    kept = [int(i) for i in np.flatnonzero(keep)]
    # output location
    place = resolve_output(cfg, vol)
    out = place.array
    if place.group is not None and os.path.exists(place.group) and not os.path.exists(out) and not cfg.overwrite:
        raise OutputExistsError(f"{place.group!r} exists and was not made by mpicellpose; pass --overwrite "
                                f"(overwrite=True) to replace it")
    if isinstance(cfg.input, (str, os.PathLike)) and os.path.abspath(cfg.input) in (out, place.group):
        raise ConfigError(f"output {cfg.output!r} is the same path as the input")
    parent = os.path.dirname(out) or "."
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"output location {parent!r} is not a directory ({existing!r} is a file)")
    if prepare:
        mio.check_writable(existing)
        os.makedirs(parent, exist_ok=True)
    fmt = cfg.zarr_format or vol.zarr_format or (mio.array_format(src) if hasattr(src, "metadata") else 2)
    if place.image_group is not None and vol.zarr_format and fmt != vol.zarr_format:
        raise ConfigError(f"labels inside the OME-Zarr image must use its zarr format {vol.zarr_format}, "
                          f"not {fmt}")
    if fmt == 3 and mio.zarr_major() < 3:
        fmt = 2
    fingerprint = {
        "version": __version__,
        "input": _input_identity(cfg, src, vol),
        "channel_axis": channel_axis,
        "blocksize": list(blocksize),
        "overlap": list(overlap),
        "mask": _mask_identity(cfg.mask),
        "backend": cfg.backend if isinstance(cfg.backend, str) else
        {"class": f"{type(cfg.backend).__module__}.{type(cfg.backend).__qualname__}",
         "describe": (cfg.backend.describe() if hasattr(cfg.backend, "describe") else None)},
        "backend_kwargs": {k: v for k, v in sorted(cfg.backend_kwargs.items())},
        "model": None if resolved is None else {"name": resolved["name"], "sha256": resolved["sha256"]},
        "model_kwargs": {k: repr(v) for k, v in sorted(cfg.model_kwargs.items())},
        "eval_kwargs": {k: repr(v) for k, v in sorted(eval_kwargs.items())},
        "preprocessing": [[f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', '?')}", repr(sorted(k.items()))]
                          for f, k in cfg.preprocessing_steps],
        "stitch": {"rule": rule, "connectivity": conn, "iou_threshold": cfg.iou_threshold,
                   "iou_depth": cfg.iou_depth},
        "normalize": cfg.normalize if cfg.backend == "cellpose" else None,
        "zarr_format": fmt,
    }
    run_id = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    work = Path(cfg.work_dir or default_work_dir(place.stem))
    paths = _Paths(work)
    if os.path.exists(out):
        marker = _output_marker(out)
        if marker is None or marker.get("run_id") != run_id:
            if not cfg.overwrite:
                what = "was not made by mpicellpose" if marker is None else "was made by a run with another configuration"
                raise OutputExistsError(f"output {cfg.output or out!r} exists and {what}; pass --overwrite (overwrite=True) to replace it")
    ours = False
    if paths.run.exists():
        old = mio.read_json(paths.run)
        ours = old.get("run_id") == run_id
        if not ours:
            if not cfg.restart:
                diff = fingerprint_diff(old.get("fingerprint", {}), fingerprint)
                raise ResumeMismatchError(
                    f"work directory {str(work)!r} holds a run with another configuration ("
                    + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
                    + "); re-run with the original settings to resume, or pass --restart to start over"
                )
    elif work.exists() and (not work.is_dir() or any(work.iterdir())):
        # never delete what we did not make, whatever the flags
        raise InputError(f"work directory {str(work)!r} exists but holds no mpicellpose run; remove it or choose --work-dir")
    if prepare:
        if paths.run.exists() and (cfg.restart or not ours):
            mio.remove_path(work)
        work.mkdir(parents=True, exist_ok=True)
        paths.blocks.mkdir(exist_ok=True)
        paths.relabel.mkdir(exist_ok=True)
        if not paths.run.exists():
            mio.write_json(paths.run, {"run_id": run_id, "fingerprint": fingerprint,
                                       "created": datetime.datetime.now().isoformat(timespec="seconds")})
        if not paths.scratch.exists():
            mio.create_array(paths.scratch, shape, blocksize, np.uint32, zarr_format=2)
    elif cfg.restart:
        ours = False
    done = [b for b in kept if paths.record(b).exists()] if (prepare or ours) else []
    done_set = set(done)
    todo = [b for b in kept if b not in done_set]
    weights = [geo.box_size(grid.block(b).read) for b in todo]
    seg = geo.assign_contiguous(todo, weights, n_ranks)
    return Plan(shape, blocksize, overlap, channel_axis, kept, done, seg, rule, conn, str(work), fingerprint,
                run_id, fmt, resolved, eval_kwargs, output=place, voxel_size=voxel_size, voxel_unit=voxel_unit,
                axes=tuple(a for i, a in enumerate(vol.axes) if i != channel_axis))


def open_volume(cfg):
    """Open the configured input as a :class:`mpicellpose.ome.Volume` (lazy)."""
    return mio.open_volume_spec(cfg.input, cfg.dataset, level=cfg.level, channel=cfg.channel,
                                timepoint=cfg.timepoint, tile_pattern=cfg.tile_pattern)


def _output_marker(path):
    try:
        arr = mio.open_array(path, mode="r")
        return dict(arr.attrs.get("mpicellpose", {}) or {}) or None
    except Exception:
        return None


# --------------------------------------------------------------------------- blocks
def view_boxes(grid: geo.BlockGrid, linear: int, rule: str, connectivity: int, depth: int):
    """[(offset, box)] of the views block ``linear`` keeps for stitching (pure)."""
    out = []
    if rule == "touch":
        for o in grid.neighbour_offsets(connectivity):
            if grid.neighbour(linear, o) is not None:
                out.append((o, grid.contact_box(linear, o)))
    else:
        for o in grid.neighbour_offsets(1):
            if grid.neighbour(linear, o) is not None:
                axis = next(k for k, v in enumerate(o) if v)
                out.append((o, grid.band_box(linear, axis, o[axis], depth)))
    return out


def face_pairs(grid: geo.BlockGrid, kept, rule: str, connectivity: int):
    """[(a, b, offset)] for neighbouring kept blocks with b = a + offset and a < b (pure)."""
    keep = set(kept)
    offs = grid.neighbour_offsets(connectivity if rule == "touch" else 1)
    positive = [o for o in offs if next(v for v in o if v) > 0]
    out = []
    for a in kept:
        for o in positive:
            b = grid.neighbour(a, o)
            if b is not None and b in keep:
                out.append((a, b, o))
    return out


VIEW_PREFIX = "v_"
EXCHANGE_BYTES = 64 << 20  # face views per message to one neighbour rank (MPICELLPOSE_EXCHANGE_BYTES)


def exchange_budget() -> int:
    """Bytes of face views per message: bounds each rank's memory in the exchange."""
    v = os.environ.get("MPICELLPOSE_EXCHANGE_BYTES")
    try:
        return max(1, int(v)) if v else EXCHANGE_BYTES
    except ValueError:  # never raise here: this runs between collectives
        log.warning("MPICELLPOSE_EXCHANGE_BYTES=%r is not a number of bytes; using %d", v, EXCHANGE_BYTES)
        return EXCHANGE_BYTES


def okey(offset) -> str:
    return VIEW_PREFIX + "_".join(str(int(v)) for v in offset)


class _RecordViews:
    """Face views read from the block records on demand; a record leaves memory after its last use.

    Holding every record of a rank would cost (blocks per rank) x (all its face views): that grows
    with the volume, not the block.  A record's views are read together (one file open) and kept
    until the number of lookups announced for that block (``uses``) is spent, or, past ``budget``
    bytes, dropped least recently used first (a later lookup then reads the file again).
    """

    def __init__(self, paths, uses, budget=256 << 20):
        self.paths, self.uses, self.budget = paths, dict(uses), budget
        self.cache = OrderedDict()
        self.nbytes = 0

    def _drop(self, b):
        self.nbytes -= sum(v.nbytes for v in self.cache.pop(b).values())

    def get(self, b, key):
        views = self.cache.pop(b, None)
        if views is None:
            path = self.paths.record(b)
            try:
                with np.load(path, allow_pickle=False) as z:
                    views = {k: z[k] for k in z.files if k.startswith(VIEW_PREFIX)}
            except Exception as exc:  # unreadable or damaged record
                raise InputError(f"cannot read the face views of block {b} from {path}: "
                                 f"{type(exc).__name__}: {exc}; re-run with --restart") from exc
            self.nbytes += sum(v.nbytes for v in views.values())
        self.cache[b] = views
        left = self.uses.get(b, 1) - 1
        self.uses[b] = left
        if left <= 0:
            self._drop(b)
        while self.nbytes > self.budget and len(self.cache) > 1:
            self._drop(next(iter(self.cache)))
        if key not in views:
            raise InputError(f"the record of block {b} lacks the face view {key}; it was written by another "
                             f"version or is damaged: re-run with --restart")
        return views[key]

    def close(self):
        self.cache.clear()
        self.nbytes = 0


def read_block_image(src, blk: geo.Block, channel_axis):
    """Read a block's read region; the channel axis (if any) goes last."""
    sl = list(blk.read_slices)
    if channel_axis is not None:
        sl.insert(channel_axis, slice(None))
    img = np.asarray(src[tuple(sl)])
    if channel_axis is not None:
        img = np.moveaxis(img, channel_axis, -1)
    return img


def segment_block(ctx, blk: geo.Block):
    """Segment one block and persist what later phases need (scratch chunk, record)."""
    img = read_block_image(ctx.src, blk, ctx.plan.channel_axis)
    if img.dtype.kind == "f" and not np.all(np.isfinite(img)):
        bad = int(np.count_nonzero(~np.isfinite(img)))
        raise InputError(f"block {blk.index} contains {bad} NaN/inf voxels; clean the input or mask them out")
    spatial = img.shape[: len(ctx.plan.shape)]
    for fn, kw in ctx.cfg.preprocessing_steps:
        img = fn(img, crop=blk.read_slices, **kw)
        if tuple(np.shape(img)[: len(spatial)]) != spatial:
            raise ConfigError(
                f"preprocessing step {getattr(fn, '__name__', fn)!r} changed the block shape from {spatial} "
                f"to {tuple(np.shape(img))}; steps must keep the shape"
            )
    try:
        labels = ctx.backend.segment(img, len(ctx.plan.shape))
    except MpiCellposeError:
        raise
    except Exception as exc:
        raise BackendError(f"{getattr(ctx.backend, 'name', type(ctx.backend).__name__)} backend failed on block {blk.index}: {type(exc).__name__}: {exc}") from exc
    return finish_block(ctx, blk, labels)


def finish_block(ctx, blk, labels):
    labels = np.asarray(labels)
    if labels.shape != tuple(b - a for a, b in blk.read):
        raise BackendError(f"backend returned labels of shape {labels.shape} for block {blk.index} "
                           f"with read region shape {tuple(b - a for a, b in blk.read)}")
    read_local, n = st.renumber_core(labels, blk.core_in_read)
    core = read_local[blk.core_in_read]
    _maybe_fault("segment", ctx.rank, ctx.done_here)
    ctx.scratch[blk.core_slices] = core
    stats = st.block_stats(core, n, [a for a, _ in blk.core])
    origin = [a for a, _ in blk.read]
    views = {okey(o): np.ascontiguousarray(read_local[geo.box_slices(box, origin)])
             for o, box in view_boxes(ctx.grid, blk.linear, ctx.plan.rule, ctx.plan.connectivity, ctx.cfg.iou_depth)}
    mio.save_npz(ctx.paths.record(blk.linear), n=np.int64(n), **stats, **views)
    return n


# --------------------------------------------------------------------------- normalisation
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
    """A strided sample of a block core's voxels (foreground of the mask only, if given)."""
    size = geo.box_size(blk.core)
    step = max(1, int(math.ceil((size / NORM_SAMPLE_VOXELS) ** (1.0 / len(blk.core)))))
    sl = [slice(a, b, step) for a, b in blk.core]
    full = list(sl)
    if channel_axis is not None:
        full.insert(channel_axis, 0)
    vals = np.asarray(src[tuple(full)], dtype=np.float64)
    if mask is not None:  # a boolean numpy array at any (lower) resolution
        coords = np.meshgrid(*[np.arange(s.start, s.stop, s.step) for s in sl], indexing="ij")
        idx = tuple(np.minimum((c * m // n), m - 1) for c, m, n in zip(coords, mask.shape, shape))
        vals = vals[mask[idx]]
    return vals.ravel()


def global_normalization(cfg, plan, src, comm):
    """Percentiles of the whole volume (sampled in parallel), or None when not wanted.

    Every rank calls it; returns the dict to pass as Cellpose's ``normalize`` on every rank.
    """
    if cfg.backend != "cellpose" or cfg.normalize != "global":
        return None
    user = plan.eval_kwargs.get("normalize", True)
    if user is False or (isinstance(user, dict) and user.get("lowhigh") is not None):
        return None
    nchan = 1 if plan.channel_axis is None else int(src.shape[plan.channel_axis])
    if nchan > 1:
        if comm.Get_rank() == 0:
            log.warning("global normalisation is computed for single-channel input only; "
                        "%d channels: using per-block normalisation", nchan)
        return None
    pct = list((user or {}).get("percentile") or [1.0, 99.0]) if isinstance(user, dict) else [1.0, 99.0]
    rank, size = comm.Get_rank(), comm.Get_size()
    grid = plan.grid
    err, mine = None, []
    try:  # everything that can fail on one rank stays inside: the gather below is collective
        mask = cfg.mask
        if isinstance(mask, (str, os.PathLike)):
            mask = mio.open_input(mask, what="mask")
        if mask is not None and int(np.prod(mask.shape)) > (1 << 27):
            mask = None  # a huge mask: block-level skipping already honours it
        elif mask is not None:
            mask = np.asarray(mask[...]).astype(bool)
        for b in sample_blocks(plan.kept)[rank::size]:
            mine.append(sample_block_voxels(src, grid.block(b), plan.shape, plan.channel_axis, mask))
    except Exception as exc:
        err = exc
    mine = np.concatenate(mine) if mine else np.zeros(0)
    parts = comm.gather((mine, None if err is None else mpi._describe(err)), root=0)
    result = None
    if rank == 0:
        errors = [e for _, e in parts if e]
        vals = np.concatenate([v for v, _ in parts])
        if errors:
            result = ("error", f"reading samples for normalisation failed: {errors[0]}")
        elif vals.size and not np.all(np.isfinite(vals)):
            result = ("error", f"input contains NaN/inf values ({int(np.count_nonzero(~np.isfinite(vals)))} "
                               f"in a sample of {vals.size} voxels); clean the input or mask them out")
        elif vals.size == 0:
            result = ("ok", None)
        else:
            lo, hi = (float(v) for v in np.percentile(vals, pct))
            if not hi > lo:
                hi = lo + 1.0
            norm = dict(user) if isinstance(user, dict) else {}
            norm.update({"normalize": True, "lowhigh": [lo, hi], "percentile": None})
            result = ("ok", {"normalize": norm, "percentile": pct, "sampled_voxels": int(vals.size),
                             "sampled_blocks": len(sample_blocks(plan.kept))})
    status, value = comm.bcast(result, root=0)
    if status == "error":
        raise InputError(value)
    return value


# --------------------------------------------------------------------------- signals
class _StopFlag:
    def __init__(self):
        self.signum = None

    def __bool__(self):
        return self.signum is not None


@contextlib.contextmanager
def _signals(flag: _StopFlag):
    """SIGTERM / SIGUSR1 ask for a clean stop after the block in progress."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}

    def handler(signum, frame):
        if flag.signum is None:
            log.warning("rank %d: received signal %d; finishing the current block, then stopping", _RANK.get(), signum)
        flag.signum = signum

    for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if s is not None:
            old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


FAULT_ENV = "MPICELLPOSE_FAULT"


def _maybe_fault(phase: str, rank: int, count: int = 0) -> None:
    """Fault injection for the restart and fault tests (never set it in production).

    ``MPICELLPOSE_FAULT="PHASE:RANK:ACTION[:N]"`` (comma separated for several) fires when
    rank RANK reaches PHASE (segment, stitch, relabel) with N blocks done there.
    ACTION is kill (SIGKILL itself), raise, enospc (a disk-full OSError) or sigusr1.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) < 3 or parts[0] != phase or int(parts[1]) != rank:
            continue
        if count != int(parts[3] if len(parts) > 3 else 0):
            continue
        action = parts[2]
        log.warning("rank %d: injecting fault %r", rank, item)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "raise":
            raise RuntimeError(f"injected fault in {phase}")
        elif action == "enospc":
            import errno

            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        elif action == "sigusr1":
            os.kill(os.getpid(), signal.SIGUSR1)


# --------------------------------------------------------------------------- the run
class _Ctx:
    pass


def _fmt_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _reraise_from_root(payload):
    """Raise on this rank the error rank 0 reported during planning."""
    cls_name, message = payload
    import mpicellpose.errors as errs

    cls = getattr(errs, cls_name, None)
    if isinstance(cls, type) and issubclass(cls, MpiCellposeError) and cls is not DistributedError:
        raise cls(message)
    raise DistributedError(f"rank 0 failed during planning: {message}", [(0, message)])


def run(cfg: RunConfig, comm=None) -> RunResult:
    """Run the whole pipeline on ``comm`` (COMM_WORLD when None; never finalized).

    Every rank of ``comm`` must call it with the same configuration.
    """
    if comm is None:
        mpi.check_world(mpi.world())
    comm = mpi.dup(comm)
    token = _RANK.set(comm.Get_rank())
    stop = _StopFlag()
    try:
        with _signals(stop):
            return _run(cfg, comm, stop)
    finally:
        _RANK.reset(token)
        mpi.free(comm)


def _preimport_cellpose():
    """Import Cellpose (and torch) now; a failure is reported later, where the backend is built."""
    try:
        import cellpose.models  # noqa: F401
    except Exception:  # noqa: BLE001 - _build_backend raises the clear error
        pass


def _run(cfg: RunConfig, comm, stop) -> RunResult:
    rank, size = comm.Get_rank(), comm.Get_size()
    box = mpi.Mailbox(comm)
    timings = {}
    t0 = time.perf_counter()
    ctx = _Ctx()
    ctx.cfg = cfg
    ctx.rank = rank
    ctx.done_here = 0

    # ---- plan (rank 0) -----------------------------------------------------------
    plan, err = None, None
    try:
        ctx.vol = open_volume(cfg)
        ctx.src = ctx.vol.array
    except Exception as exc:
        err = exc
    if rank == 0 and err is None:
        try:
            plan = make_plan(cfg, ctx.vol, size)
        except Exception as exc:
            err = exc
    elif err is None and cfg.backend == "cellpose":
        _preimport_cellpose()  # overlaps rank 0's planning, which imports it too (5-8 s)
    root_err = comm.bcast(None if err is None or rank != 0 else (type(err).__name__, str(err)), root=0)
    if root_err is not None:
        if rank == 0:
            raise err
        _reraise_from_root(root_err)
    box.agree(err, where="opening the input")  # another rank could not open the input
    plan = comm.bcast(plan, root=0)
    my_blocks = comm.scatter(plan.seg_assignment if rank == 0 else None, root=0)
    ctx.plan, ctx.grid, ctx.paths = plan, plan.grid, _Paths(plan.work_dir)
    timings["plan"] = time.perf_counter() - t0
    if rank == 0:
        log.info("plan: volume %s, grid %s (%d blocks, %d kept by mask, %d already done), blocksize %s, "
                 "overlap %s, %s stitching, %d rank(s)", plan.shape, ctx.grid.grid_shape, len(ctx.grid),
                 len(plan.kept), len(plan.done), plan.blocksize, plan.overlap, plan.rule, size)

    # ---- global normalisation (sampled in parallel) ----------------------------------
    t = time.perf_counter()
    norm = global_normalization(cfg, plan, ctx.src, comm)
    plan.normalization = norm
    if norm and rank == 0:
        lo, hi = norm["normalize"]["lowhigh"]
        log.info("normalisation: percentiles %s of %d voxels from %d blocks -> [%.6g, %.6g]",
                 norm["percentile"], norm["sampled_voxels"], norm["sampled_blocks"], lo, hi)
    timings["normalize"] = time.perf_counter() - t

    # ---- backend (once per rank) -------------------------------------------------
    t = time.perf_counter()
    err = None
    ctx.backend = None
    try:
        ctx.scratch = mio.open_array(ctx.paths.scratch, mode="r+")
        if my_blocks:
            ctx.backend = _build_backend(cfg, plan, comm)
    except Exception as exc:
        err = exc
    box.agree(err, where="backend start-up")
    timings["model_load"] = time.perf_counter() - t

    # ---- segment -----------------------------------------------------------------
    t = time.perf_counter()
    err = None
    total_todo = sum(len(a) for a in plan.seg_assignment)
    done_here = 0
    last_report = [0.0]

    def report(force=False):
        """Rank 0: progress line at most every 5 s (also while it waits for the other ranks)."""
        if rank != 0:
            return
        box.poll()
        now = time.perf_counter()
        if now - last_report[0] < 5.0 and not force:
            return
        last_report[0] = now
        done = sum(d for d, _ in box.progress.values())
        el = now - t
        rate = done / el if el > 0 else 0.0
        eta = (total_todo - done) / rate if rate > 0 else float("nan")
        log.info("segment: %d/%d blocks (%.0f%%), %.2f blocks/s, ETA %s", done, total_todo,
                 100.0 * done / max(total_todo, 1), rate, _fmt_eta(eta) if rate > 0 else "?")

    for linear in my_blocks:
        if box.poll() or stop:
            break
        blk = ctx.grid.block(linear)
        try:
            segment_block(ctx, blk)
        except Exception as exc:
            err = exc
            if "block" not in str(exc):
                err = BackendError(f"block {blk.index} (#{linear}): {mpi._describe(exc)}")
                err.__cause__ = exc
            log.error("rank %d: %s", rank, err)
            box.notify_abort(str(err))
            break
        done_here += 1
        ctx.done_here = done_here
        box.send_progress(done_here, len(my_blocks))
        report(force=done_here == 1)
    if stop and err is None:
        box.notify_abort("stop requested by signal")
    box.agree(err, interrupted=bool(stop), where="segmentation", progress=report)
    timings["segment"] = time.perf_counter() - t
    ctx.backend = None

    # ---- stitch --------------------------------------------------------------------
    t = time.perf_counter()
    kept = plan.kept
    grid = ctx.grid
    weights = [geo.box_size(grid.block(b).core) for b in kept]
    assignment = geo.assign_contiguous(kept, weights, size)
    owner = geo.owner_map(assignment)
    mine = assignment[rank]
    records, err = {}, None
    try:
        _maybe_fault("stitch", rank, 0)
        for b in mine:
            try:
                records[b] = mio.load_npz(ctx.paths.record(b), skip_prefix=VIEW_PREFIX)  # stats only
            except Exception as exc:
                raise InputError(f"cannot read the record of block {grid.index_of(b)} "
                                 f"({ctx.paths.record(b)}): {exc}") from exc
    except Exception as exc:
        err = exc
    box.agree(err, where="loading block records")
    counts = np.zeros(len(grid), np.int64)
    for part in comm.allgather({b: int(records[b]["n"]) for b in mine}):
        for b, n in part.items():
            counts[b] = n
    offsets = st.offsets_from_counts(counts)
    total = int(counts.sum())
    pairs = face_pairs(grid, kept, plan.rule, plan.connectivity)
    budget = exchange_budget()
    out_keys, sources, uses = {}, set(), {}
    for a, b, o in pairs:
        ra, rb = owner[a], owner[b]
        if ra == rank:  # local pair or a view to send: a's record is read once for it
            uses[a] = uses.get(a, 0) + 1
        if rb == rank:  # b's side of the face is matched here
            uses[b] = uses.get(b, 0) + 1
        if ra != rb and ra == rank:
            out_keys.setdefault(rb, []).append((a, o))
        elif ra != rb and rb == rank:
            sources.add(ra)
    views = _RecordViews(ctx.paths, uses)  # face views are read when needed, never all at once
    state = {"err": None, "sent": 0}
    edges = []

    def fail(exc):  # the first error of this rank, agreed on after the exchange
        if state["err"] is None:
            state["err"] = exc

    def match(a, b, o, va):
        vb = views.get(b, okey(tuple(-v for v in o)))
        if plan.rule == "touch":
            e = st.touch_edges(va, vb, o, plan.connectivity)
        else:
            e = st.iou_edges(va, vb, cfg.iou_threshold)
        if len(e):
            edges.append(np.stack([e[:, 0] + offsets[a], e[:, 1] + offsets[b]], axis=1))

    def messages(keys):
        """This rank's views for one neighbour rank, in messages of about ``budget`` bytes."""
        batch, nbytes = {}, 0
        for a, o in keys:
            if state["err"] is not None:
                break  # still end the stream: the neighbour waits for it
            try:
                v = views.get(a, okey(o))
            except Exception as exc:  # noqa: BLE001
                fail(exc)
                break
            batch[(a, o)] = v
            nbytes += v.nbytes
            state["sent"] += v.nbytes
            if nbytes >= budget:
                yield batch
                batch, nbytes = {}, 0
        if batch:
            yield batch

    def on_receive(src, batch):
        if state["err"] is not None:
            return
        try:
            for (a, o), va in batch.items():
                match(a, grid.neighbour(a, o), o, va)
        except Exception as exc:  # noqa: BLE001
            fail(exc)

    try:  # pairs inside this rank first, then the faces shared with other ranks, streamed
        for a, b, o in pairs:
            if owner[a] == rank and owner[b] == rank:
                match(a, b, o, views.get(a, okey(o)))
    except Exception as exc:  # noqa: BLE001
        fail(exc)
    mpi.exchange(comm, {d: messages(k) for d, k in out_keys.items()}, sources, on_receive)
    views.close()
    sent_bytes = state["sent"]
    err = state["err"]
    box.agree(err, where="face matching")
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    all_edges = comm.gather(edges, root=0)
    merged = None
    err = None
    if rank == 0:
        try:
            e = np.concatenate(all_edges) if all_edges else np.zeros((0, 2), np.int64)
            away, roots = st.merge_edges(e)
            merged = (away, roots, int(len(e)))
            mio.save_npz(ctx.paths.stitch, offsets=offsets, counts=counts, merged_away=away, roots=roots)
        except Exception as exc:
            err = exc
    box.agree(err, where="merging")
    away, roots, n_edges = comm.bcast(merged, root=0)
    n_objects = total - int(away.size)
    timings["stitch"] = time.perf_counter() - t

    # ---- relabel -------------------------------------------------------------------
    t = time.perf_counter()
    dtype = st.label_dtype(n_objects)
    err = None
    if rank == 0:
        try:
            _prepare_output(cfg, plan, dtype)
        except Exception as exc:
            err = exc
    box.agree(err, where="creating the output")
    err = None
    reused = 0
    n_relabelled = 0
    pieces = []
    try:
        out = mio.open_array(plan.output.array, mode="r+")
        for b in mine:
            blk = grid.block(b)
            lut = st.block_lut(int(offsets[b]), int(counts[b]), away, roots, dtype)
            done_marker = ctx.paths.relabel_done(b)
            if not done_marker.exists():
                _maybe_fault("relabel", rank, n_relabelled)
                n_relabelled += 1
                if counts[b]:
                    out[blk.core_slices] = lut[ctx.scratch[blk.core_slices]]
                done_marker.touch()
            else:
                reused += 1
            rec = records[b]
            if counts[b]:
                pieces.append((lut[1:].astype(np.int64), rec["count"], rec["bbox_min"], rec["bbox_max"],
                               rec["coord_sum"], np.full(int(counts[b]), b, np.int64)))
            if box.poll() or stop:
                break
    except Exception as exc:
        err = exc
    box.agree(err, interrupted=bool(stop), where="relabelling")
    timings["relabel"] = time.perf_counter() - t

    # ---- table (every rank writes the rows of its ID range) --------------------------
    t = time.perf_counter()
    summary = _table_phase(cfg, plan, comm, box, pieces, n_objects, ctx.paths)
    timings["table"] = time.perf_counter() - t
    if plan.output.group is not None:
        t = time.perf_counter()
        levels = _build_label_pyramid(cfg, plan, comm)
        summary["pyramid_levels"] = None if levels is None else [list(x) for x in levels]
        timings["pyramid"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    err = None
    if rank == 0:
        try:
            summary.update({"n_objects": n_objects, "n_provisional": total, "n_merged_away": int(away.size),
                            "n_edges": n_edges, "dtype": str(dtype), "ranks": size,
                            "timings": {k: round(v, 3) for k, v in timings.items()},
                            "normalization": plan.normalization})
            _finish_output(cfg, plan, summary)
            if not cfg.keep_work:
                mio.remove_path(plan.work_dir)
        except Exception as exc:
            err = exc
    box.agree(err, where="finishing the output")
    summary = comm.bcast(summary, root=0)
    reused_total = comm.allreduce(reused) if size > 1 else reused
    if rank == 0:
        log.info("done: %d objects (%d provisional, %d merged away, %d stitched across faces), dtype %s; "
                 "%d blocks segmented now, %d reused from an earlier run; time %s",
                 n_objects, total, away.size, summary["n_stitched_objects"], dtype, total_todo, len(plan.done),
                 ", ".join(f"{k} {v:.2f}s" for k, v in summary["timings"].items()))
    summary["comm_bytes_sent"] = sent_bytes
    labels = mio.open_array(plan.output.array, mode="r")
    boxes = Boxes(np.load(boxes_path(plan.output.stem), mmap_mode="r"))
    return RunResult(labels, boxes, n_objects, int(away.size), summary["timings"], table_path(plan.output.stem),
                     len(plan.done) + reused_total, summary, plan.output.array)


def _table_phase(cfg, plan, comm, box, pieces, n_objects, paths) -> dict:
    """Route object pieces to the rank owning their ID range, reduce, write rows in parallel."""
    from . import table as tbl

    rank, size = comm.Get_rank(), comm.Get_size()
    nd = len(plan.shape)
    if pieces:
        cols = [np.concatenate([p[i] for p in pieces]) for i in range(6)]
    else:
        cols = [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, nd), np.int64),
                np.zeros((0, nd), np.int64), np.zeros((0, nd), np.float64), np.zeros(0, np.int64)]
    dest = tbl.owner_of(cols[0], size, n_objects)
    got = mpi.alltoall_objects(comm, [tuple(c[dest == r] for c in cols) for r in range(size)])
    part = st.reduce_pieces(*(np.concatenate([g[i] for g in got]) for i in range(6)))
    lo, hi = tbl.id_range(rank, size, n_objects)
    csv_final, bpath = table_path(plan.output.stem), boxes_path(plan.output.stem)
    pq_dir = tbl.parquet_dir(csv_final) if tbl.have_parquet() else None
    parts_dir = Path(plan.work_dir) / "table"
    err = None
    if rank == 0:
        try:
            if parts_dir.exists():
                mio.remove_path(parts_dir)
            parts_dir.mkdir(parents=True)
            if pq_dir is not None:
                if pq_dir.exists():
                    mio.remove_path(pq_dir)
                pq_dir.mkdir(parents=True)
            tbl.create_boxes_file(bpath, n_objects, nd)
        except Exception as exc:
            err = exc
    box.agree(err, where="preparing the object table")
    err = None
    try:
        if not np.array_equal(part["id"], np.arange(lo, hi)):
            raise RuntimeError(f"object table rows {part['id'][:5]}... do not cover IDs {lo}..{hi - 1}")
        c = tbl.columns(part, plan.voxel_size)
        tbl.write_csv_part(parts_dir / f"part-{rank:05d}.csv", c)
        if pq_dir is not None and part["id"].size:
            tbl.write_parquet_part(pq_dir / f"part-{rank:05d}.parquet", c)
        tbl.write_boxes_rows(bpath, lo, part)
    except Exception as exc:
        err = exc
    box.agree(err, where="writing the object table")
    stitched = comm.allreduce(int(np.count_nonzero(part["n_blocks"] > 1))) if size > 1 else \
        int(np.count_nonzero(part["n_blocks"] > 1))
    err = None
    if rank == 0:
        try:
            tbl.concat_csv(csv_final, [parts_dir / f"part-{r:05d}.csv" for r in range(size)], nd)
        except Exception as exc:
            err = exc
    box.agree(err, where="writing the object table")
    return {"n_stitched_objects": stitched, "table": csv_final,
            "table_parquet": str(pq_dir) if pq_dir is not None else None}


def _build_backend(cfg, plan, comm):
    from .gpu import bind_device  # noqa: WPS433 - lazy, torch is optional

    ndim = len(plan.shape)
    if not isinstance(cfg.backend, str):
        return cfg.backend
    if cfg.backend != "cellpose":
        return make_backend(cfg.backend, backend_kwargs=cfg.backend_kwargs, ndim=ndim)
    binding = bind_device(comm, cfg.device)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(binding.local_size, 1))
    eval_kwargs = dict(plan.eval_kwargs)
    if plan.normalization is not None:
        eval_kwargs["normalize"] = plan.normalization["normalize"]
    elif cfg.normalize == "none":
        eval_kwargs["normalize"] = False
    backend = make_backend("cellpose", model_kwargs=cfg.model_kwargs, eval_kwargs=eval_kwargs,
                           resolved=plan.resolved_model, device=binding.device, threads=threads, ndim=ndim)
    if backend.ignored and comm.Get_rank() == 0:
        log.warning("Cellpose %s ignores these arguments: %s", backend.version, ", ".join(backend.ignored))
    return backend


def _prepare_output(cfg, plan, dtype):
    """Rank 0: create the output (or keep ours when resuming)."""
    place = plan.output
    out = place.array
    if os.path.exists(out):
        marker = _output_marker(out)
        if marker and marker.get("run_id") == plan.run_id:
            arr = mio.open_array(out, mode="r")
            if np.dtype(arr.dtype) == dtype and tuple(arr.shape) == tuple(plan.shape):
                return
        if not (marker and marker.get("run_id") == plan.run_id) and not cfg.overwrite:
            raise OutputExistsError(f"output {out!r} exists and was not made by this run; pass --overwrite")
        for p in Path(plan.work_dir, "relabel").glob("*.done"):
            p.unlink()
    if place.group is not None:
        # an NGFF label image: replace only the label group, never the image it belongs to
        if os.path.exists(place.group):
            mio.remove_path(place.group)
    elif os.path.exists(out):
        mio.remove_path(out)
    attrs = {"mpicellpose": {"run_id": plan.run_id, "complete": False, "version": __version__}}
    extra = {}
    if place.group is not None:
        from . import ome

        extra = ome.array_options(plan.zarr_format, plan.axes)
        os.makedirs(place.group, exist_ok=True)
    mio.create_array(out, plan.shape, plan.blocksize, dtype, zarr_format=plan.zarr_format, attrs=attrs, **extra)
    if place.group is not None:
        from . import ome

        ome.write_labels_metadata(place.group, plan.axes, plan.voxel_size, name=place.name,
                                  image_group=place.image_group, zarr_format=plan.zarr_format)


def _build_label_pyramid(cfg, plan, comm):
    """Collective: downsampled levels of an NGFF label image (every rank writes its chunks)."""
    from . import ome

    place = plan.output
    if place.group is None:
        return None
    in_group = place.image_group is not None
    if cfg.pyramid is None and not in_group:
        return None
    if cfg.pyramid == 0:
        return None
    like = place.image_group if in_group and cfg.pyramid is None else None
    level = None
    if like is not None:
        level = plan.fingerprint["input"].get("level") or 0
    return ome.build_pyramid(place.group, cfg.pyramid, comm, method=cfg.pyramid_method, like=like,
                             like_level=level if level is not None else 0)


def provenance(cfg, plan, summary) -> dict:
    """Everything needed to know how an output was made (stored in its attributes)."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "mpicellpose": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "numpy": v("numpy"), "zarr": v("zarr"), "cellpose": v("cellpose") if cfg.backend == "cellpose" else None,
        "torch": v("torch") if cfg.backend == "cellpose" else None, "mpi4py": v("mpi4py"),
        "model": plan.resolved_model, "config": json.loads(json.dumps(cfg.to_dict(), default=mio._json_default)),
        "eval_kwargs_used": plan.eval_kwargs, "ranks": summary.get("ranks"),
    }


def _finish_output(cfg, plan, summary):
    arr = mio.open_array(plan.output.array, mode="r+")
    meta = dict(arr.attrs.get("mpicellpose", {}))
    meta.update({
        "run_id": plan.run_id, "complete": True, "version": __version__,
        "provenance": provenance(cfg, plan, summary),
        "voxel_size": list(plan.voxel_size) if plan.voxel_size else None,
        "voxel_unit": plan.voxel_unit if plan.voxel_size else "voxel",
        "table_parquet": os.path.basename(summary["table_parquet"]) if summary.get("table_parquet") else None,
        "n_stitched_objects": summary.get("n_stitched_objects"),
        "n_objects": summary["n_objects"], "blocksize": list(plan.blocksize), "overlap": list(plan.overlap),
        "stitch": plan.rule, "fingerprint": plan.fingerprint, "timings": summary["timings"],
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "object_table": os.path.basename(table_path(plan.output.stem)),
        "normalization": plan.normalization,
    })
    arr.attrs["mpicellpose"] = json.loads(json.dumps(meta, default=mio._json_default))
