"""What a run costs: network work per output voxel and flow-scratch bytes (pure).

The network's work is counted in voxels it evaluates per orientation (Cellpose's 3D network
sees every voxel once in each of three orientations; 2D: once), divided by the voxels the
run writes:

* ``blocks`` pipeline: Cellpose's ``eval`` on each block's read region (core + overlap), so
  ``sum(read) / sum(core)``: ``((B + 2o) / B)^3`` for interior blocks;
* ``flows`` pipeline: per orientation, the planes through each core, grown in plane by the
  flow halo: ``((B + 2h) / B)^2`` for interior blocks.

Counted at the input's resolution; Cellpose's own resizing (diameter, anisotropy) multiplies
both alike.
"""
from __future__ import annotations

from dataclasses import replace

from . import flowfield as ff
from . import geometry as geo


def network_voxels(settings, blocks, pipeline: str) -> int:
    grid, total = settings.grid, 0
    for b in blocks:
        blk = grid.block(b)
        if pipeline == "flows":
            total += ff.network_voxels(blk.core, ff.flow_region(blk.core, settings.shape, settings.flow_halo),
                                       len(settings.shape))
        else:
            total += geo.box_size(blk.read)
    return total


def core_voxels(settings, blocks) -> int:
    grid = settings.grid
    return sum(geo.box_size(grid.block(b).core) for b in blocks)


def flow_scratch_bytes(settings, blocks) -> int:
    """Bytes of the flow field for ``blocks`` (their cores), as stored (uncompressed)."""
    return core_voxels(settings, blocks) * ff.flow_bytes_per_voxel(len(settings.shape))


def network_cost(settings, blocks, cellpose: bool = True) -> dict:
    """The network's evaluations per output voxel for this plan, under both pipelines."""
    core = max(core_voxels(settings, blocks), 1)
    out = {"pipeline": settings.pipeline,
           "blocks_per_voxel": round(network_voxels(settings, blocks, "blocks") / core, 4)}
    if cellpose:
        halo = settings.flow_halo or ff.default_flow_halo(settings.eval_kwargs.get("diameter"), len(settings.shape))
        flows = replace(settings, flow_halo=halo) if not settings.flow_halo else settings
        out["flows_per_voxel"] = round(network_voxels(flows, blocks, "flows") / core, 4)
        out["flow_halo"] = halo
        out["flow_scratch_bytes"] = flow_scratch_bytes(settings, blocks)
    out["network_per_voxel"] = out.get(f"{settings.pipeline}_per_voxel", out["blocks_per_voxel"])
    return out


def cost_summary(plan, flowed=None) -> dict:
    """The provenance's ``cost``: planned network work (both pipelines) and, with the flow
    step, what it measured."""
    cellpose = bool(plan.settings.resolved_model) or plan.settings.pipeline == "flows"
    out = network_cost(plan.settings, plan.kept, cellpose=cellpose)
    if flowed is not None:
        out["flows_blocks_now"] = flowed.blocks_now
        out["network_voxels_measured"] = flowed.network_voxels
        out["flows_seconds"] = round(flowed.seconds, 3)
    return out


def free_bytes(path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    p = os.path.abspath(str(path))
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def check_flow_space(settings, blocks, work_dir) -> None:
    """Refuse, before any work, a flow field that the work directory's file system cannot hold."""
    from .errors import InputError  # noqa: PLC0415

    need = flow_scratch_bytes(settings, blocks)
    free = free_bytes(work_dir)
    if free is not None and need > free:
        raise InputError(f"the flow field of --pipeline flows needs {need / 2**30:.1f} GiB in the work directory "
                         f"{work_dir} but its file system has {free / 2**30:.1f} GiB free; give a --work-dir on "
                         f"a larger scratch file system, or use --pipeline blocks (no flow field)")
