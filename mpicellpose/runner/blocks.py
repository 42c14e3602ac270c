"""One block, from the input to its record: the single code path of the full run and of
:func:`mpicellpose.process_block`.

A block (:class:`mpicellpose.grid.geometry.Block`) has a *read* region (its core grown by the
overlap) and a *core* (what it owns and writes).  :func:`segment_image` reads the read
region, checks it, runs the preprocessing steps and the backend; :func:`number_core`
numbers the labels present in the core 1..n; :func:`record_block` writes the core to the
scratch array and the record (label count, statistics, face views) that marks it done.
"""
from __future__ import annotations

import os

import numpy as np

from ..cellpose.backends import make_backend
from ..cellpose.flowfield import check_cellpose_internals
from ..errors import BackendError, ConfigError, InputError, MpiCellposeError
from ..grid import geometry as geo
from ..grid import stitch as st
from .runlog import log
from .workdir import VIEW_PREFIX


def view_key(offset) -> str:
    """Record entry of the face view towards the neighbour at ``offset``."""
    return VIEW_PREFIX + "_".join(str(int(v)) for v in offset)


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


def read_block_image(src, blk: geo.Block, channel_axis):
    """Read a block's read region; the channel axis (if any) goes last."""
    sl = list(blk.read_slices)
    if channel_axis is not None:
        sl.insert(channel_axis, slice(None))
    img = np.asarray(src[tuple(sl)])
    if channel_axis is not None:
        img = np.moveaxis(img, channel_axis, -1)
    return img


def _about(exc, blk):
    """Mark an error raised here as one whose message already names the block."""
    exc.block = blk.index
    return exc


def block_image(src, blk: geo.Block, settings, preprocessing_steps) -> np.ndarray:
    """The block's read region, read, checked (NaN) and preprocessed; channel axis last."""
    img = read_block_image(src, blk, settings.channel_axis)
    if img.dtype.kind == "f" and not np.all(np.isfinite(img)):
        bad = int(np.count_nonzero(~np.isfinite(img)))
        raise _about(InputError(f"block {blk.index} contains {bad} NaN/inf voxels; clean the input or mask them "
                                f"out"), blk)
    ndim = len(settings.shape)
    spatial = img.shape[:ndim]
    for fn, kw in preprocessing_steps:
        img = fn(img, crop=blk.read_slices, **kw)
        if tuple(np.shape(img)[:ndim]) != spatial:
            raise _about(ConfigError(
                f"preprocessing step {getattr(fn, '__name__', fn)!r} changed the block shape from {spatial} "
                f"to {tuple(np.shape(img))}; steps must keep the shape"), blk)
    return img


def call_backend(backend, blk: geo.Block, call, stop=None):
    """``call()`` (a backend's work on block ``blk``), abandoned on SIGTERM when ``stop`` is
    given; an error that is not ours becomes a :class:`BackendError` naming the block."""
    try:
        if stop is None:
            return call()
        with stop.interruptible_section():
            return call()
    except MpiCellposeError:
        raise
    except Exception as exc:
        name = getattr(backend, "name", type(backend).__name__)
        raise _about(BackendError(f"{name} backend failed on block {blk.index}: {type(exc).__name__}: {exc}"),
                     blk) from exc


def segment_image(src, blk: geo.Block, settings, preprocessing_steps, backend, stop=None, img=None) -> np.ndarray:
    """Labels of the block's read region (``stop``: a StopFlag whose SIGTERM abandons the
    backend call; nothing of the block is recorded then).  Errors raised here name the
    block (their attribute ``block`` says so); others come from the libraries called.

    A backend with ``from_flows`` (``--pipeline flows``, :mod:`mpicellpose.runner.phases.flows`)
    builds the masks from the flow field already computed: it reads no image.  ``img``: the
    block's image when it was read already (``block_image``, e.g. by the read-ahead thread)."""
    ndim = len(settings.shape)
    if getattr(backend, "from_flows", False):
        labels = call_backend(backend, blk, lambda: backend.segment_block(blk), stop)
    else:
        if img is None:
            img = block_image(src, blk, settings, preprocessing_steps)
        labels = call_backend(backend, blk, lambda: backend.segment(img, ndim), stop)
    labels = np.asarray(labels)
    if labels.shape != tuple(b - a for a, b in blk.read):
        raise _about(BackendError(f"backend returned labels of shape {labels.shape} for block {blk.index} "
                                  f"with read region shape {tuple(b - a for a, b in blk.read)}"), blk)
    return labels


def number_core(labels, blk: geo.Block):
    """(labels of the read region renumbered so that the core's are 1..n, n, the core)."""
    read_local, n = st.renumber_core(labels, blk.core_in_read)
    return read_local, n, read_local[blk.core_in_read]


def record_block(work, scratch, blk, settings, read_local, n, core) -> None:
    """Persist what later phases need: the core in the scratch array, then the record
    (written atomically: from then on the block counts as done)."""
    grid = settings.grid
    scratch[blk.core_slices] = core
    stats = st.block_stats(core, n, [a for a, _ in blk.core])
    origin = [a for a, _ in blk.read]
    views = {view_key(o): np.ascontiguousarray(read_local[geo.box_slices(box, origin)])
             for o, box in view_boxes(grid, blk.linear, settings.stitch_rule, settings.connectivity,
                                           settings.iou_depth)}
    work.save_record(blk.linear, n=np.int64(n), **stats, **views)


def backend_eval_kwargs(settings, normalization) -> dict:
    """Cellpose's eval arguments for every block: the settings plus the normalisation."""
    eval_kwargs = dict(settings.eval_kwargs)
    if normalization is not None:
        eval_kwargs["normalize"] = normalization["normalize"]
    elif settings.normalize == "none":
        eval_kwargs["normalize"] = False
    return eval_kwargs


def gpu_rank_wants(mode: str, backend) -> bool:
    """An auto|on|off option that is on by default for ranks whose model runs on a GPU
    (``--masks-during-flows``, ``--read-ahead``): on a CPU-only rank the extra thread would share
    the cores the network uses."""
    if mode == "off" or backend is None:
        return False
    if mode == "on":
        return True
    model = getattr(backend, "model", None)
    return str(getattr(model, "device", "cpu")).startswith(("cuda", "mps"))


def build_backend(options, settings, normalization, box, load=True):
    """This rank's backend.  Collective: every rank calls it, also one with no block to
    segment (``load=False``: it takes part in the device binding but loads no model).
    ``options``: the backend, its arguments, the device and threads
    (:class:`mpicellpose.runner.context.RunOptions`, or the configuration).  Under
    ``--pipeline flows`` a loaded Cellpose model must have the private calls the flow and mask
    steps use (:func:`mpicellpose.cellpose.flowfield.check_cellpose_internals`)."""
    from ..cellpose.gpu import bind_device  # noqa: PLC0415 - lazy, torch is optional

    ndim = len(settings.shape)
    if not isinstance(options.backend, str):
        return options.backend
    if options.backend != "cellpose":
        return make_backend(options.backend, backend_kwargs=options.backend_kwargs, ndim=ndim)
    binding = bind_device(box, options.device)
    if not load:
        return None
    threads = options.threads or max(1, (os.cpu_count() or 1) // max(binding.local_size, 1))
    backend = make_backend("cellpose", model_kwargs=options.model_kwargs,
                           eval_kwargs=backend_eval_kwargs(settings, normalization),
                           resolved=settings.resolved_model, device=binding.device, threads=threads, ndim=ndim,
                           precision=settings.precision)
    if backend.ignored and box.rank == 0:
        log.warning("Cellpose %s ignores these arguments: %s", backend.version, ", ".join(backend.ignored))
    if settings.pipeline == "flows":  # the flow and mask steps call two private methods of Cellpose's model
        check_cellpose_internals(backend.model)
    return backend
