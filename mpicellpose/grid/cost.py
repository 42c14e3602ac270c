"""What a run costs: network work per output voxel and flow-scratch bytes (pure).

The network's work is counted in voxels it evaluates per orientation (Cellpose's 3D network
sees every voxel once in each of three orientations; 2D: once), divided by the voxels the
run writes:

* ``blocks`` pipeline: Cellpose's ``eval`` on each block's read region (core + overlap), so
  ``sum(read) / sum(core)``: ``((B + 2o) / B)^3`` for interior blocks;
* ``flows`` pipeline: per orientation, the planes through each slab of block cores
  (:mod:`mpicellpose.grid.slabs`, G blocks wide in plane), grown in plane by the flow halo:
  ``((G*B + 2h) / (G*B))^2`` for interior slabs, 1 where a slab spans the whole plane.

Counted at the input's resolution; Cellpose's own resizing (diameter, anisotropy) multiplies
both alike.
"""
from __future__ import annotations

from . import geometry as geo
from .slabs import SlabGrid, auto_flow_slab, default_flow_halo, flow_bytes_per_voxel


def network_voxels(settings, blocks, pipeline: str, halo=None, flow_slab=None) -> int:
    """Voxels the network evaluates (per orientation) to segment ``blocks`` (kept blocks);
    ``halo``, ``flow_slab``: the flow step's, when not the settings' own."""
    grid = settings.grid
    if pipeline == "flows":
        halo = settings.flow_halo if halo is None else halo
        flow_slab = settings.flow_slab if flow_slab is None else flow_slab
        slabs = SlabGrid(grid, blocks, flow_slab, halo)
        return slabs.network_voxels(slabs.linears)
    return int(geo.block_sizes(grid, list(blocks), "read").sum())


def core_voxels(settings, blocks) -> int:
    return int(geo.block_sizes(settings.grid, list(blocks)).sum())


def flow_scratch_bytes(settings, blocks) -> int:
    """Bytes of the flow field for ``blocks`` (their cores), as stored (uncompressed)."""
    return core_voxels(settings, blocks) * flow_bytes_per_voxel(len(settings.shape))


def network_cost(settings, blocks, cellpose: bool = True) -> dict:
    """The network's evaluations per output voxel for this plan, under both pipelines."""
    core = max(core_voxels(settings, blocks), 1)
    out = {"pipeline": settings.pipeline,
           "blocks_per_voxel": round(network_voxels(settings, blocks, "blocks") / core, 4)}
    if cellpose:
        halo = settings.flow_halo or default_flow_halo(settings.eval_kwargs.get("diameter"), len(settings.shape))
        flow_slab = settings.flow_slab if settings.pipeline == "flows" else auto_flow_slab(settings.grid)
        out["flows_per_voxel"] = round(network_voxels(settings, blocks, "flows", halo, flow_slab) / core, 4)
        out["flow_halo"] = halo
        out["flow_slab"] = flow_slab
        out["flow_scratch_bytes"] = flow_scratch_bytes(settings, blocks)
    out["network_per_voxel"] = out.get(f"{settings.pipeline}_per_voxel", out["blocks_per_voxel"])
    return out


def cost_summary(plan, flowed=None) -> dict:
    """The provenance's ``cost``: planned network work (both pipelines) and, with the flow
    step, what it measured."""
    cellpose = bool(plan.settings.resolved_model) or plan.settings.pipeline == "flows"
    out = network_cost(plan.settings, plan.kept, cellpose=cellpose)
    if flowed is not None:
        out["flows_slabs_now"] = flowed.slabs_now
        out["network_voxels_measured"] = flowed.network_voxels
        out["flows_seconds"] = round(flowed.seconds, 3)
    return out
