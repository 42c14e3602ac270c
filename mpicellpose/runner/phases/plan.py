"""Phase 1, on rank 0: check everything, then decide the block grid and the schedule.

:func:`resolve_settings` turns a configuration and an opened volume into
:class:`Settings` (what the options mean for this volume: grid, overlap, Cellpose's
arguments, voxel size); it is pure but for hashing the model file, and it is the one place
that resolves defaults, so :func:`mpicellpose.process_block` gets exactly what a run gets.
:func:`make_plan` adds the output location, the fingerprint that makes resume safe, the
work directory and the blocks each rank segments.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, fields, replace

import numpy as np

from ..._version import __version__
from ...cellpose.cellpose4 import check_bsize_v4
from ...cellpose.models import cellpose_version, resolve_model
from ...cellpose.model_channels import check_channels
from ...cellpose.precision import check_precision, resolve_precision, run_device
from ...cellpose.segmenter import DEFAULT_DIAMETER, check_eval_kwargs
from ...errors import ConfigError, InputError
from ...grid import geometry as geo
from ...grid import schedule as sched
from ...grid.partition import assign_contiguous
from ...grid.boxes import auto_flow_box
from ...grid.boxes import default_flow_halo as flow_halo_default
from ...options import OPTIONS_BY_NAME, labels_options
from ...volumes import readers, storage
from ...volumes.volume import anisotropy
from .. import outputs
from ..outputs import OutputPlace
from ..workdir import WorkDir, check_flow_space

DEMO_DIAMETER = 16.0

# Cellpose eval arguments that every supported Cellpose (3.1 and 4) accepts (or that the
# backend translates): checking them needs no import of Cellpose, which takes 5-30 s
KNOWN_EVAL_KEYS = frozenset({
    "diameter", "anisotropy", "flow_threshold", "cellprob_threshold", "min_size", "do_3D", "batch_size",
    "normalize", "invert", "stitch_threshold", "niter", "augment", "tile_overlap", "resample", "channel_axis",
    "z_axis", "channels",
})


@dataclass(frozen=True)
class Settings:
    """What the configuration means for this volume (the same on every rank)."""

    shape: tuple                  # spatial shape
    blocksize: tuple
    overlap: tuple
    channel_axis: int | None      # of the input array (None: one channel)
    stitch_rule: str              # 'touch' or 'iou'
    connectivity: int             # 1..ndim, for 'touch'
    eval_kwargs: dict             # Cellpose's eval arguments, diameter and anisotropy resolved
    resolved_model: dict | None   # name, path and sha256 of the model file (Cellpose only)
    voxel_size: tuple | None
    voxel_unit: str | None
    axes: tuple                   # spatial axis names
    pipeline: str = "blocks"      # 'flows' (network once per voxel, then masks) or 'blocks' (eval per block)
    flow_halo: int = 0            # 'flows': in-plane context of the network around a core (voxels)
    flow_box: int = 1             # 'flows': blocks per side of a flow box (mpicellpose.grid.boxes)
    precision: str | None = None  # the network's arithmetic; None: the model's own (cellpose.precision)
    precision_why: str | None = None  # why the precision is not the one asked for (None: it is)
    iou_threshold: float = 0.3    # 'iou' stitching: the least IoU of a match
    iou_depth: int = 8            # 'iou' stitching: voxels of a block's face views on each side
    normalize: str = "global"     # intensity normalisation: 'global', 'block' or 'none'

    @property
    def grid(self) -> geo.BlockGrid:
        return geo.BlockGrid(self.shape, self.blocksize, self.overlap)


@dataclass(frozen=True)
class Plan:
    """What rank 0 decided; broadcast to every rank."""

    settings: Settings
    kept: tuple                   # blocks with foreground in the mask, grid order
    done: tuple                   # blocks recorded by an earlier run of the same configuration
    segment_assignment: tuple     # per rank: its share of the blocks to segment now (see `handout`)
    work_dir: str
    fingerprint: dict
    run_id: str
    zarr_format: int
    output: OutputPlace
    replaces: str | None = None   # the existing zarr node --overwrite replaces, if any
    normalization: dict | None = None  # global bounds, set after sampling (phase 1b)
    # 'static': each rank segments its share; 'dynamic': shares dealt costliest first, each rank starts
    # with the first block of its own, the rest go at run time to whoever asks (mpicellpose.grid.schedule)
    handout: str = "static"

    def owners(self, n_ranks: int) -> list:
        """Per rank, the kept blocks it stitches, relabels and reports (contiguous runs in
        grid order, balanced by core size): its share of the output, fixed by the grid."""
        return assign_contiguous(list(self.kept), geo.block_sizes(self.grid, self.kept), n_ranks)

    @property
    def to_segment(self) -> tuple:
        """The blocks this run segments (kept, not done by an earlier run), grid order."""
        done = set(self.done)
        return tuple(b for b in self.kept if b not in done)

    def without_blocks(self, finished, n_ranks: int) -> "Plan":
        """The plan with ``finished`` blocks taken out of the segmentation shares (recorded in
        this run already, e.g. during the flow step)."""
        gone = set(finished)
        todo = [b for share in self.segment_assignment for b in share if b not in gone]
        return replace(self, segment_assignment=sched.make_shares(self.handout, self.grid, sorted(todo), n_ranks))

    def with_normalization(self, norm) -> "Plan":
        return replace(self, normalization=norm)


for _f in fields(Settings):  # plan.shape, plan.blocksize, ... read through to the settings
    setattr(Plan, _f.name, property(lambda self, _n=_f.name: getattr(self.settings, _n)))
Plan.grid = property(lambda self: self.settings.grid)


# --------------------------------------------------------------------------- settings
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


def default_overlap(cfg, ndim, diameter):
    """The overlap per side: given, or 2 x diameter for Cellpose (z divided by the
    anisotropy the user gave), 0 (touch) or iou_depth (iou) for the other backends."""
    if cfg.overlap is not None:
        return geo.per_axis(cfg.overlap, ndim, "overlap", minimum=0)
    if cfg.backend != "cellpose":
        return (0,) * ndim if cfg.stitch_rule == "touch" else (cfg.iou_depth,) * ndim
    ov = 2 * float(diameter)
    aniso = float(cfg.eval_kwargs.get("anisotropy") or 1.0)
    if ndim == 3:
        return (int(math.ceil(ov / aniso)),) + (int(math.ceil(ov)),) * 2
    return (int(math.ceil(ov)),) * ndim


def _voxel_size(cfg, vol, ndim):
    voxel_size, voxel_unit = cfg.voxel_size, ("micrometer" if cfg.voxel_size else None)
    if voxel_size is None and vol.voxel_size is not None:
        voxel_size = tuple(float(v) for v in vol.voxel_size.size)
        units = {u for u in (vol.voxel_size.units or ()) if u}
        voxel_unit = units.pop() if len(units) == 1 else ("mixed" if units else "unknown")
    if cfg.voxel_size is not None and len(cfg.voxel_size) != ndim:
        raise ConfigError(f"voxel_size has {len(cfg.voxel_size)} values {cfg.voxel_size} but the volume has "
                          f"{ndim} spatial axes")
    return voxel_size, voxel_unit


def resolve_settings(cfg, vol) -> Settings:
    """Validate the configuration against the volume and resolve every default.

    ``vol`` is a :class:`mpicellpose.volumes.volume.Volume` (see :func:`open_volume`).
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
    precision, precision_why = cfg.precision, None
    if cfg.backend == "cellpose":
        if set(cfg.eval_kwargs) - KNOWN_EVAL_KEYS:
            check_eval_kwargs(cfg.eval_kwargs)  # imports Cellpose: only for keys not known here
        if (cellpose_version()[0] or 0) >= 4:
            check_bsize_v4(cfg.eval_kwargs.get("bsize"))  # from the installed metadata: no import
        check_precision(cfg.precision, cellpose_version()[0])
        resolved = resolve_model(cfg.model_kwargs)
        check_channels(1 if channel_axis is None else int(src.shape[channel_axis]), resolved, cellpose_version()[0],
                       chosen=cfg.channel is not None, cellpose_channels="channels" in cfg.eval_kwargs,
                       what=_channels_named(vol), axes=vol.axes, channel_axis=channel_axis)
        precision, precision_why = resolve_precision(cfg.precision, cellpose_version()[0], resolved,
                                                     cfg.model_kwargs, device=lambda: run_device(cfg.device))
        if diameter is None:
            diameter = resolved.get("diameter") or (DEMO_DIAMETER if resolved.get("name") == "demo" else DEFAULT_DIAMETER)
        eval_kwargs["diameter"] = diameter
    voxel_size, voxel_unit = _voxel_size(cfg, vol, ndim)
    if cfg.backend == "cellpose" and ndim == 3 and voxel_size is not None and "anisotropy" not in eval_kwargs:
        a = anisotropy(voxel_size)
        if abs(a - 1.0) > 1e-6:
            eval_kwargs["anisotropy"] = a
    overlap = default_overlap(cfg, ndim, diameter or DEFAULT_DIAMETER)
    rule = cfg.stitch_rule
    conn = cfg.backend_kwargs.get("connectivity", 1)
    conn = ndim if conn == "full" else min(int(conn), ndim)
    if rule == "iou" and min(overlap) < 1:
        raise ConfigError(f"stitch='iou' needs an overlap of at least 1 voxel on every axis, got {overlap}")
    axes = tuple(a for i, a in enumerate(vol.axes) if i != channel_axis)
    pipeline, halo = resolve_pipeline(cfg, shape, blocksize, eval_kwargs, diameter)
    fbox = resolve_flow_box(cfg, shape, blocksize, overlap, halo) if pipeline == "flows" else 1
    return Settings(shape, blocksize, overlap, channel_axis, rule, conn, eval_kwargs, resolved, voxel_size,
                    voxel_unit, axes, pipeline, halo, fbox, precision, precision_why, cfg.iou_threshold, cfg.iou_depth,
                    cfg.normalize)


def _channels_named(vol) -> str:
    """The input, as messages about its channels name it (a colour picture's channels are colours)."""
    what = vol.source or "the input"
    return f"{what} (a colour picture: channel 0 red, 1 green, 2 blue)" if vol.kind == "image" else what


def resolve_pipeline(cfg, shape, blocksize, eval_kwargs, diameter) -> tuple:
    """(pipeline, in-plane flow halo): 'flows' by default for Cellpose 3, 'blocks' for Cellpose 4 and the
    other backends.  Cellpose 4's network attends over its whole 256-pixel tile, so its output at a voxel
    may depend on far more context than a CNN's.  The shipped stand-in agrees with whole-volume eval under
    both pipelines, but it was trained on crops padded into the tile and says nothing of cpsam, so flows
    stays opt-in under Cellpose 4 until measured with cpsam itself (docs/cellpose4.md)."""
    cp4 = cfg.backend == "cellpose" and (cellpose_version()[0] or 0) >= 4
    pipeline = cfg.pipeline or ("flows" if cfg.backend == "cellpose" and not cp4 else "blocks")
    if pipeline == "blocks":
        return pipeline, 0
    if cfg.backend != "cellpose":
        name = cfg.backend if isinstance(cfg.backend, str) else type(cfg.backend).__name__
        raise ConfigError(f"--pipeline flows needs the Cellpose backend (its network's flows); the {name} backend "
                          f"runs with --pipeline blocks")
    ndim = len(shape)
    if ndim == 3 and (eval_kwargs.get("do_3D") is False or float(eval_kwargs.get("stitch_threshold") or 0) > 0):
        raise ConfigError("--pipeline flows segments in 3D (do_3D); plane-by-plane segmentation (do_3D=False, "
                          "stitch_threshold) runs with --pipeline blocks")
    if eval_kwargs.get("resample") is False:
        raise ConfigError("--pipeline flows needs resample=True (Cellpose's default); use --pipeline blocks")
    cut = [b for b, n in zip(blocksize, shape) if b < n]  # axes cut into several blocks
    if cfg.flow_halo is None:  # the default never exceeds the blocks
        return pipeline, min([flow_halo_default(diameter, ndim)] + cut)
    halo = int(cfg.flow_halo)
    for axis, (b, n) in enumerate(zip(blocksize, shape)):
        if b < n and halo > b:
            raise ConfigError(f"--flow-halo {halo} is larger than the block ({b} voxels along axis {axis}): the "
                              f"network would run on more halo than block; use larger blocks or a smaller "
                              f"--flow-halo")
    return pipeline, halo


def resolve_flow_box(cfg, shape, blocksize, overlap, halo) -> int:
    """Blocks per side of a flow box: ``--flow-box``, or :func:`mpicellpose.grid.boxes.auto_flow_box`
    (a fixed function of the grid: the labels never depend on the rank count)."""
    grid = geo.BlockGrid(shape, blocksize, overlap)
    if cfg.flow_box is None:
        return auto_flow_box(grid, halo or 0)
    return max(1, min(int(cfg.flow_box), max(grid.grid_shape)))


def open_volume(cfg):
    """Open the configured input as a :class:`mpicellpose.volumes.volume.Volume` (lazy)."""
    return readers.open_volume_spec(cfg.input, cfg.dataset, level=cfg.level, channel=cfg.channel,
                                    timepoint=cfg.timepoint, tile_pattern=cfg.tile_pattern)


def kept_blocks(cfg, grid) -> tuple:
    """The blocks with foreground in the mask (all blocks without a mask), grid order."""
    return kept_and_fractions(cfg, grid)[0]


def kept_and_fractions(cfg, grid) -> tuple:
    """(kept blocks in grid order, the mask's kept fraction of every block's core or None without
    a mask): one pass over the mask."""
    mask = cfg.mask
    if isinstance(mask, (str, os.PathLike)):
        mask = readers.open_input(mask, what="mask")
    if mask is None:
        return tuple(range(len(grid))), None
    geo.check_mask_shape(mask.shape, grid.shape)
    fractions = geo.mask_fractions(grid, mask)
    return tuple(int(i) for i in np.flatnonzero(fractions > 0)), fractions


# --------------------------------------------------------------------------- fingerprint
def mask_identity(mask):
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        return {"path": os.path.abspath(mask)}
    arr = np.asarray(mask[...])
    return {"shape": list(arr.shape), "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()}


def input_identity(cfg, arr, vol=None):
    ident = {"shape": list(arr.shape), "dtype": str(np.dtype(arr.dtype))}
    if vol is not None and vol.kind != "array":
        ident.update({"kind": vol.kind, "level": vol.level, "channel": cfg.channel, "timepoint": cfg.timepoint})
    elif cfg.channel is not None:  # an in-memory array: the chosen channels still change the labels
        ident["channel"] = cfg.channel
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


#: The options that change the labels (mpicellpose.options: ``labels=True``) that the fingerprint's
#: fixed form below holds (the form of earlier versions: their runs resume).  Any other such option
#: is added under its own name when it is not at its default (:func:`_declared_options`).
FIXED_FORM = frozenset({
    "dataset", "level", "channel", "timepoint", "channel_axis", "tile_pattern", "voxel_size",  # input (its shape)
    "zarr_format", "blocksize", "overlap", "mask", "backend", "model", "diameter", "anisotropy", "normalize",
    "eval_kwargs", "model_kwargs", "threshold", "stitch", "connectivity", "iou_threshold", "iou_depth",
    "pipeline", "flow_halo", "flow_box", "precision", "batch_size",
})


def _declared_options(cfg, s: Settings) -> dict:
    """The options that change the labels and are not in the fixed form, where not at their
    default (from Settings when it resolves them, else as configured)."""
    out = {}
    for name in labels_options():
        if name not in FIXED_FORM:
            v = getattr(s, name) if hasattr(s, name) else getattr(cfg, name)
            if v != OPTIONS_BY_NAME[name].default:
                out[name] = v
    return out


def fingerprint_of(cfg, vol, s: Settings, fmt: int) -> dict:
    """Everything that changes the labels: a resume with a different fingerprint is refused."""
    return {
        "version": __version__,
        "input": input_identity(cfg, vol.array, vol),
        "channel_axis": s.channel_axis,
        "blocksize": list(s.blocksize),
        "overlap": list(s.overlap),
        "mask": mask_identity(cfg.mask),
        "backend": cfg.backend if isinstance(cfg.backend, str) else
        {"class": f"{type(cfg.backend).__module__}.{type(cfg.backend).__qualname__}",
         "describe": (cfg.backend.describe() if hasattr(cfg.backend, "describe") else None)},
        "backend_kwargs": {k: v for k, v in sorted(cfg.backend_kwargs.items())},
        "model": None if s.resolved_model is None else {"name": s.resolved_model["name"],
                                                        "sha256": s.resolved_model["sha256"]},
        "model_kwargs": {k: repr(v) for k, v in sorted(cfg.model_kwargs.items())},
        "eval_kwargs": {k: repr(v) for k, v in sorted(s.eval_kwargs.items())},
        "preprocessing": [[f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', '?')}",
                           repr(sorted(k.items()))] for f, k in cfg.preprocessing_steps],
        "stitch": {"rule": s.stitch_rule, "connectivity": s.connectivity, "iou_threshold": s.iou_threshold,
                   "iou_depth": s.iou_depth},
        "normalize": s.normalize if cfg.backend == "cellpose" else None,
        # blocks: the form of earlier versions (their runs resume); flows: its flow field's layout changed
        "pipeline": {"pipeline": "flows", "flow_halo": s.flow_halo, "flow_box": s.flow_box}
        if s.pipeline == "flows" else [s.pipeline, s.flow_halo],
        "zarr_format": fmt,
    } | ({"precision": s.precision} if s.precision and cfg.backend == "cellpose" else {}) | _declared_options(cfg, s)


def run_id_of(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def output_format(cfg, vol, place) -> int:
    src = vol.array
    fmt = cfg.zarr_format or vol.zarr_format or (storage.array_format(src) if hasattr(src, "metadata") else 2)
    if place.image_group is not None and vol.zarr_format and fmt != vol.zarr_format:
        raise ConfigError(f"labels inside the OME-Zarr image must use its zarr format {vol.zarr_format}, "
                          f"not {fmt}")
    if fmt == 3 and storage.zarr_major() < 3:
        fmt = 2
    return fmt


# --------------------------------------------------------------------------- the plan
def schedule(grid, todo, n_ranks, mode: str = "static", fractions=None) -> tuple:
    """Per rank, its share of the blocks to segment (see :mod:`mpicellpose.grid.schedule`): ``static``,
    contiguous runs balanced by read volume; ``dynamic``, dealt round-robin costliest first (cost:
    read voxels times the mask's kept fraction)."""
    return sched.make_shares(mode, grid, todo, n_ranks, fractions)


def make_plan(cfg, vol, n_ranks: int, *, prepare: bool = True) -> Plan:
    """Rank 0: validate everything, prepare the work directory, decide the block grid.

    With ``prepare=False`` (the dry run of ``mpicellpose plan``) nothing is written.
    """
    s = resolve_settings(cfg, vol)
    grid = s.grid
    kept, fractions = kept_and_fractions(cfg, grid)
    place, work_path = outputs.locate_output(cfg, vol, prepare=prepare)
    fmt = output_format(cfg, vol, place)
    fingerprint = fingerprint_of(cfg, vol, s, fmt)
    run_id = run_id_of(fingerprint)
    marker = outputs.output_marker(place.array)
    output_ours = bool(marker) and marker.get("run_id") == run_id
    replaces = outputs.check_existing_output(cfg, place, output_ours)
    outputs.check_side_files(cfg, place, output_ours)
    work = WorkDir(work_path)
    ours = work.check(run_id, fingerprint, cfg.restart)
    if prepare and s.pipeline == "flows" and not (ours and not cfg.restart):
        check_flow_space(s, kept, work.path)  # a resume's flow field is mostly on disk already
    if prepare:
        work.prepare(run_id, fingerprint, s.shape, s.blocksize, reuse=ours and not cfg.restart)
    elif cfg.restart:
        ours = False
    done = tuple(work.done_blocks(kept)) if (prepare or ours) else ()
    done_set = set(done)
    todo = [b for b in kept if b not in done_set]
    mode = getattr(cfg, "schedule", "dynamic")
    return Plan(s, kept, done, schedule(grid, todo, n_ranks, mode, fractions), str(work.path), fingerprint, run_id,
                fmt, place, replaces=replaces, handout=mode)
