"""Phase 5, every rank: write its blocks into the output with their final IDs.

Rank 0 creates the output (or keeps this run's own when resuming; ``--overwrite`` replaces
only a zarr node, see :mod:`mpicellpose.runner.outputs`).  Each output chunk is one block, written
once by the rank that owns it, fsynced (with its folder), and only then given its done-marker,
which lets a resume skip it: a marker on disk means the chunk is on stable storage.  A resume also
redoes a block whose marker is there but whose chunk is not (lost in a node crash).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..._version import __version__
from ...errors import OutputExistsError
from ...volumes import ngff, ngff_io, storage
from ...volumes.safety import remove_zarr
from .. import outputs
from ..faults import maybe_fault


@dataclass(frozen=True)
class Relabelled:
    written: int   # blocks this rank wrote now
    reused: int    # blocks this rank found written by an earlier run of the same configuration


def prepare_output(ctx, dtype) -> None:
    """Rank 0: create the output (or keep ours when resuming)."""
    plan = ctx.plan
    place = plan.output
    out = place.array
    if os.path.exists(out):
        marker = outputs.output_marker(out)
        if marker and marker.get("run_id") == plan.run_id:
            arr = storage.open_array(out, mode="r")
            if np.dtype(arr.dtype) == dtype and tuple(arr.shape) == tuple(plan.shape):
                return
        if not (marker and marker.get("run_id") == plan.run_id) and not ctx.options.overwrite:
            raise OutputExistsError(f"output {out!r} exists and was not made by this run; add --overwrite")
        ctx.work.clear_relabel_markers()
    # an NGFF label image: replace only the label group, never the image it belongs to
    if os.path.lexists(place.root) and storage.node_kind(place.root) is not None:
        remove_zarr(place.root, plan.replaces or f"the zarr node {place.root}")
    attrs = {"mpicellpose": {"run_id": plan.run_id, "complete": False, "version": __version__}}
    extra = {"dimension_separator": storage.NESTED}  # v2: chunk files nested per axis (v3 nests by default)
    if place.group is not None:
        extra = ngff.array_options(plan.zarr_format, plan.axes)
        os.makedirs(place.group, exist_ok=True)
    storage.create_array(out, plan.shape, plan.blocksize, dtype, zarr_format=plan.zarr_format, attrs=attrs, **extra)
    if place.group is not None:
        ngff_io.write_labels_metadata(place.group, plan.axes, plan.voxel_size, name=place.name,
                                      image_group=place.image_group, zarr_format=plan.zarr_format)


def relabel_phase(ctx, mine, merge) -> Relabelled:
    """Every rank: its blocks (``mine``) from the scratch array to the output, with final IDs."""
    plan, box, stop = ctx.plan, ctx.box, ctx.stop
    box.on_root(lambda: prepare_output(ctx, merge.dtype), "creating the output")
    grid, work = plan.grid, ctx.work
    written = reused = 0
    with box.step("relabelling", interrupted=lambda: bool(stop)):
        out = storage.open_array(plan.output.array, mode="r+")
        scratch = storage.open_array(work.scratch, mode="r")
        chunk = outputs.chunk_files(plan.output.array)
        for b in mine:
            marker = work.relabel_done(b)   # a marker whose chunk is gone (a node crash lost it) is redone
            if marker.exists() and not (merge.counts[b] and not os.path.exists(chunk(grid.index_of(b)))):
                reused += 1
            else:
                maybe_fault("relabel", box.rank, written)
                written += 1
                if merge.counts[b]:
                    blk = grid.block(b)
                    out[blk.core_slices] = merge.lut(b)[scratch[blk.core_slices]]
                    outputs.sync_chunk_file(chunk(grid.index_of(b)))
                marker.touch()
            if box.poll() or stop:
                break
    return Relabelled(written, reused)

