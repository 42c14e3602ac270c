"""Phase 7: the label pyramid (NGFF outputs), provenance, the completion marker, clean-up.

The output's ``mpicellpose`` attributes say ``complete: true`` only at the very end, with
everything needed to know how it was made (the device of every block included); readers can
tell an unfinished output.  Before that marker, every rank puts what it wrote of the table on
stable storage (the output's chunks were, before their relabel markers), and the work
directory (the only other copy) is removed only after the marker is on disk.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from ..._version import __version__
from ...volumes import pyramid, storage
from .. import outputs
from ..faults import maybe_fault
from . import sharedpaths


def build_label_pyramid(ctx):
    """Collective: downsampled levels of an NGFF label image (every rank writes its chunks)."""
    plan, opts = ctx.plan, ctx.options
    place = plan.output
    if place.group is None:
        return None
    in_group = place.image_group is not None
    if opts.pyramid is None and not in_group:
        return None
    if opts.pyramid == 0:
        return None
    like = place.image_group if in_group and opts.pyramid is None else None
    level = None
    if like is not None:
        level = plan.fingerprint["input"].get("level") or 0
    return pyramid.build_pyramid(place.group, opts.pyramid, ctx.box, method=opts.pyramid_method, like=like,
                                 like_level=level if level is not None else 0)


def _version_of(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def provenance(opts, plan, summary) -> dict:
    """Everything needed to know how an output was made (stored in its attributes); ``opts``: the
    run's :class:`mpicellpose.runner.context.RunOptions`."""
    return {
        "mpicellpose": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "numpy": _version_of("numpy"), "zarr": _version_of("zarr"),
        "cellpose": _version_of("cellpose") if opts.backend == "cellpose" else None,
        "torch": _version_of("torch") if opts.backend == "cellpose" else None, "mpi4py": _version_of("mpi4py"),
        "model": plan.resolved_model, "config": json.loads(json.dumps(opts.config, default=storage.json_default)),
        "eval_kwargs_used": plan.eval_kwargs, "ranks": summary.get("ranks"),
    } | ({"precision": precision_used(opts, plan)} if opts.backend == "cellpose" else {}) | seam_check(plan)


def seam_check(plan) -> dict:
    """``{"check": ...}``: what ``mpicellpose check`` found for this OUTPUT (its ``.check.json``
    beside it), and whether it checked this run's settings (the same fingerprint); {} without one."""
    path = plan.output.stem + ".check.json"
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return {}
    same = json.dumps(rec.get("fingerprint"), sort_keys=True) == json.dumps(
        json.loads(json.dumps(plan.fingerprint, default=storage.json_default)), sort_keys=True)
    runs = [{k: r.get(k) for k in ("label", "passed", "f1", "mean_iou", "cut", "seam_errors", "network_per_voxel")}
            for r in rec.get("runs") or ()]
    return {"check": {"file": os.path.basename(path), "settings_match": same, "passed": rec.get("passed"),
                      "verdict": rec.get("verdict"), "region": rec.get("region"), "runs": runs}}


def precision_used(opts, plan) -> dict:
    """The network's arithmetic in this run, and why when it is not what was asked for."""
    from ...cellpose.models import cellpose_version
    from ...cellpose.precision import model_precision

    own = model_precision(cellpose_version()[0], plan.resolved_model, opts.model_kwargs)
    return {"precision": plan.precision or own, "why": plan.precision_why}


def result_warnings(opts, plan, n_objects: int, size_hist) -> list:
    """What looks wrong with a finished Cellpose run's result, with the likely causes: no object at all,
    or a median object far from the diameter the network was told (empty list: nothing to say)."""
    from .table import median_diameter

    if opts.backend != "cellpose" or not plan.kept:
        return []
    diameter = float(plan.eval_kwargs.get("diameter") or 0) or None
    nchan = 1 if plan.channel_axis is None else None
    channel = ("the channel (the input has several: --channel chooses the one to segment)" if nchan is None
               else "the channel (is this the stained one?)")
    causes = (f"{channel}; the diameter ({diameter:g} voxels: --diameter, measured on your image); the model "
              f"({(plan.resolved_model or {}).get('name')}: trained for this kind of image?); the intensity "
              f"normalisation (bounds {(plan.normalization or {}).get('normalize', {}).get('lowhigh')}, --normalize)")
    if n_objects == 0:
        return [f"no object was found in {len(plan.kept)} block(s). Likely causes: {causes}. Try one block first: "
                f"mpicellpose preview, or process_block(..., test_mode=True)"]
    ndim = len(plan.shape)
    median = median_diameter(size_hist, ndim, float(plan.eval_kwargs.get("anisotropy") or 1.0))
    if diameter and median and not diameter / 3 <= median <= diameter * 3:
        return [f"the median object is about {median:.0f} voxels across but the network was told {diameter:g} "
                f"(--diameter): objects {'far smaller' if median < diameter else 'far larger'} than expected "
                f"usually mean the diameter or the model does not fit the image. Likely causes: {causes}"]
    return []


def mark_complete(opts, plan, summary, devices=None) -> None:
    """Rank 0: the completion marker and provenance in the output's attributes (``devices``: which
    device segmented which blocks, see :func:`.sharedpaths.block_devices`), synced to disk."""
    arr = storage.open_array(plan.output.array, mode="r+")
    meta = dict(arr.attrs.get("mpicellpose", {}))
    meta.update({
        "run_id": plan.run_id, "complete": True, "version": __version__,
        "provenance": provenance(opts, plan, summary) | {"block_devices": devices},
        "voxel_size": list(plan.voxel_size) if plan.voxel_size else None,
        "voxel_unit": plan.voxel_unit if plan.voxel_size else "voxel",
        "table_parquet": os.path.basename(summary["table_parquet"]) if summary.get("table_parquet") else None,
        "n_stitched_objects": summary.get("n_stitched_objects"),
        "n_objects": summary["n_objects"], "n_merged_away": summary.get("n_merged_away"),
        "blocksize": list(plan.blocksize), "overlap": list(plan.overlap),
        "stitch": plan.stitch_rule, "fingerprint": plan.fingerprint, "timings": summary["timings"],
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "object_table": os.path.basename(outputs.table_path(plan.output.stem)),
        "normalization": plan.normalization,
        "pipeline": plan.pipeline, "cost": summary.get("cost"),
    })
    arr.attrs["mpicellpose"] = json.loads(json.dumps(meta, default=storage.json_default))
    outputs.sync_metadata(plan.output.array)


def sync_tables(plan, rank: int) -> None:
    """Every rank: its Parquet part and its rows of the boxes on stable storage; rank 0 also the CSV,
    the units and the folders holding them (the CSV's rows were synced as they were written)."""
    stem = plan.output.stem
    csv = outputs.table_path(stem)
    parquet = outputs.parquet_path(stem)
    outputs.fsync_path(os.path.join(parquet, f"part-{rank:05d}.parquet"))
    outputs.fsync_path(outputs.boxes_path(stem))
    if rank == 0:
        for p in (csv, outputs.table_units_path(stem), parquet, os.path.dirname(csv) or "."):
            outputs.fsync_path(p)
        if plan.output.group is not None:   # an NGFF label image: its group metadata
            outputs.sync_metadata(plan.output.group)


def finish_phase(ctx, summary) -> dict:
    """Every rank syncs what it wrote; rank 0 marks the output complete; then (unless ``keep_work``)
    every rank removes its own blocks' files from the work directory and rank 0 what is left; every
    rank gets the summary."""
    plan, box = ctx.plan, ctx.box
    with box.step("putting the table on stable storage"):
        sync_tables(plan, box.rank)

    def finish():
        maybe_fault("finish", box.rank)   # tests: a crash with every chunk written, before the marker
        mark_complete(ctx.options, plan, summary, sharedpaths.block_devices(plan.work_dir))
        return summary

    summary = box.on_root(finish, "finishing the output")
    if not ctx.options.keep_work:
        with box.step("removing the work directory's block files"):
            ctx.work.remove_blocks(plan.owners(box.size)[box.rank])

        def remove():
            sharedpaths.remove_device_log(plan.work_dir)
            ctx.work.remove()

        box.on_root(remove, "removing the work directory")
    return summary
