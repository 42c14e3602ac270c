"""What a run costs: network work per output voxel, file-system bytes, scratch and files (pure).

The network's work is counted in voxels it evaluates per orientation (Cellpose's 3D network
sees every voxel once in each of three orientations; 2D: once), divided by the voxels the
run writes:

* ``blocks`` pipeline: Cellpose's ``eval`` on each block's read region (core + overlap), so
  ``sum(read) / sum(core)``: ``((B + 2o) / B)^3`` for interior blocks;
* ``flows`` pipeline: per orientation, the planes through each flow box's core
  (:mod:`mpicellpose.grid.boxes`, k blocks per side), grown in plane by the flow halo:
  ``((kB + 2h) / kB)^2`` for interior boxes, 1 where a box spans the volume.

The file system's work under ``flows`` (:func:`flows_io`) is modelled on an interior box: the
image of its read region, its shell written once, its neighbours' shells read over its mask
region, the labels' scratch written once and read once; the input read once and the labels
written once are not counted.  The scratch peak is the shells of a sweep's window: two layers
of boxes plus one box per rank.

Counted at the input's resolution; Cellpose's own resizing (diameter, anisotropy) multiplies
the network's work alike under both pipelines.
"""
from __future__ import annotations

import math

from . import geometry as geo
from .boxes import BoxGrid, auto_flow_box, default_flow_halo, flow_bytes_per_voxel

LABEL_SCRATCH_BYTES = 4   # uint32 block-local labels of each block's core (scratch.zarr)
FANOUT = 1000             # records, markers and shells per directory of the work directory


def _boxes(settings, blocks, halo=None, flow_box=None) -> BoxGrid:
    halo = settings.flow_halo if halo is None else halo
    flow_box = settings.flow_box if flow_box is None else flow_box
    return BoxGrid(settings.grid, blocks, flow_box, halo)


def network_voxels(settings, blocks, pipeline: str, halo=None, flow_box=None) -> int:
    """Voxels the network evaluates (per orientation) to segment ``blocks`` (kept blocks);
    ``halo``, ``flow_box``: the flow step's, when not the settings' own."""
    if pipeline == "flows":
        boxes = _boxes(settings, blocks, halo, flow_box)
        return boxes.network_voxels(boxes.linears)
    return int(geo.block_sizes(settings.grid, list(blocks), "read").sum())


def core_voxels(settings, blocks) -> int:
    return int(geo.block_sizes(settings.grid, list(blocks)).sum())


def _interior(boxes: BoxGrid) -> int:
    """The box at the middle of the box grid (the costliest kind in every respect)."""
    return boxes.flow.linear_of([n // 2 for n in boxes.flow.grid_shape])


def flows_io(settings, blocks, n_ranks: int = 1, input_itemsize: int = 2, halo=None, flow_box=None) -> dict:
    """The flows pipeline's file-system model: bytes per output voxel beyond the input once and
    the labels once, the scratch peak and the most entries in a directory of the work directory."""
    boxes = _boxes(settings, blocks, halo, flow_box)
    ndim, fb = boxes.ndim, flow_bytes_per_voxel(boxes.ndim)
    mid = _interior(boxes)
    core = max(geo.box_size(boxes.core(mid)), 1)
    shell = boxes.shell_voxels([mid]) if len(boxes) > 1 else 0
    read = boxes.read_voxels(mid) if len(boxes) > 1 else 0
    image = geo.box_size(boxes.read(mid)) / core - 1.0
    per_voxel = {"input_extra": round(image * input_itemsize, 2), "shells_written": round(shell * fb / core, 2),
                 "shells_read": round(read * fb / core, 2), "label_scratch": 2 * LABEL_SCRATCH_BYTES}
    layer = math.prod(boxes.flow.grid_shape[1:]) if ndim > 1 else 1
    window = min(len(boxes), 2 * layer + n_ranks)
    peak = window * shell * fb if len(boxes) > 1 else 0
    shape = settings.grid.grid_shape
    files = max(min(FANOUT, len(settings.grid)), shape[-1], 3 ** ndim, min(FANOUT, len(boxes)))
    return {"fs_bytes_per_voxel": round(sum(per_voxel.values()), 2), "fs_bytes_per_voxel_parts": per_voxel,
            "flow_scratch_peak_bytes": int(peak), "label_scratch_bytes": core_voxels(settings, blocks) *
            LABEL_SCRATCH_BYTES, "files_per_directory": int(files), "flow_boxes": len(boxes),
            "flow_box_voxels": int(core)}


def flow_scratch_bytes(settings, blocks, n_ranks: int = 1) -> int:
    """Bytes the shells take at most (the sweep's window; uncompressed)."""
    return flows_io(settings, blocks, n_ranks)["flow_scratch_peak_bytes"]


def network_cost(settings, blocks, cellpose: bool = True, n_ranks: int = 1) -> dict:
    """The network's evaluations per output voxel for this plan, under both pipelines, and the
    flows pipeline's file-system model."""
    core = max(core_voxels(settings, blocks), 1)
    out = {"pipeline": settings.pipeline,
           "blocks_per_voxel": round(network_voxels(settings, blocks, "blocks") / core, 4)}
    if cellpose:
        halo = settings.flow_halo or default_flow_halo(settings.eval_kwargs.get("diameter"), len(settings.shape))
        flow_box = settings.flow_box if settings.pipeline == "flows" else auto_flow_box(settings.grid, halo)
        out["flows_per_voxel"] = round(network_voxels(settings, blocks, "flows", halo, flow_box) / core, 4)
        out["flow_halo"] = halo
        out["flow_box"] = flow_box
        io = flows_io(settings, blocks, n_ranks, halo=halo, flow_box=flow_box)
        out.update(io)
        out["flow_scratch_bytes"] = io["flow_scratch_peak_bytes"]
    out["network_per_voxel"] = out.get(f"{settings.pipeline}_per_voxel", out["blocks_per_voxel"])
    return out


def cost_summary(plan, flowed=None, n_ranks: int = 1) -> dict:
    """The provenance's ``cost``: planned network work (both pipelines) and, with the flow
    step, what it measured."""
    cellpose = bool(plan.settings.resolved_model) or plan.settings.pipeline == "flows"
    out = network_cost(plan.settings, plan.kept, cellpose=cellpose, n_ranks=n_ranks)
    if flowed is not None:
        out["flow_boxes_now"] = flowed.boxes_now
        out["network_voxels_measured"] = flowed.network_voxels
        out["flows_seconds"] = round(flowed.seconds, 3)
        out.update({f"measured_{k}": v for k, v in (flowed.io or {}).items()})
    return out
