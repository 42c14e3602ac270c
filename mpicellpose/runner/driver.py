"""A run, top to bottom: plan -> segment -> match faces -> merge -> relabel -> table -> finish.

:func:`run` sets up what every phase shares (the MPI gateway, signal handling, the output's
lock) and calls the phases of :mod:`mpicellpose.runner.phases` in order; each takes and returns
frozen values.  Every phase ends with a collective agreement, so an error on any rank stops
all of them with the same message, and every phase leaves its result on disk in the work
directory (:class:`mpicellpose.runner.workdir.WorkDir`), so re-running the same command resumes
where it stopped.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .. import comm as mpi
from ..config import RunConfig
from ..errors import DistributedError, MpiCellposeError, OutputExistsError, agreed
from ..grid.cost import cost_summary
from ..volumes import storage
from . import outputs
from .blocks import gpu_rank_wants
from .context import RunContext
from .phases import normalize as normalization
from .phases import faces, finish, flows, merge, relabel, segment, sharedpaths, table
from .phases.plan import Plan, make_plan, open_volume, resolve_settings, spatial_shape, validate_input  # noqa: F401
from .phases.plan import fingerprint_of, output_format
from .runlog import RANK, log, quiet_libraries
from .signals import StopFlag, handling_signals
from .workdir import WorkDir, fingerprint_diff


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


# --------------------------------------------------------------------------- the run
def run(cfg: RunConfig, comm=None) -> RunResult:
    """Run the whole pipeline on ``comm`` (COMM_WORLD when None; never finalized).

    Every rank of ``comm`` must call it with the same configuration.
    """
    if comm is None:
        mpi.check_world(mpi.world())
    comm = mpi.dup(comm)
    token = RANK.set(comm.Get_rank())
    stop = StopFlag()
    box = mpi.Mailbox(comm, watchdog=cfg.watchdog, stop=stop)
    held = {}  # rank 0: the output's lock, released whatever happens
    box.on_abort.append(lambda: held["lock"].release() if held.get("lock") is not None else None)  # MPI_Abort
    try:
        with handling_signals(stop, box.abort, box.rank, watch_parent=box.size > 1), quiet_libraries():
            try:
                return _run(cfg, box, stop, held)
            except BaseException as exc:
                if box.size > 1 and not getattr(exc, "agreed", False):
                    # an error the other ranks do not know of: they would wait for this rank for ever
                    box.abort(1, f"unexpected error outside the collective error handling: {mpi.describe(exc)}")
                raise
    finally:
        if held.get("lock") is not None:
            held["lock"].release()
        RANK.reset(token)
        mpi.free(comm)


class _Clock:
    """Seconds per phase, in the order they ran."""

    def __init__(self):
        self.t0 = self.t = time.perf_counter()
        self.timings = {}

    def lap(self, name):
        now = time.perf_counter()
        self.timings[name] = now - self.t
        self.t = now


def _run(cfg: RunConfig, box, stop, held) -> RunResult:
    clock = _Clock()
    vol, plan = plan_phase(cfg, box, held)
    clock.lap("plan")
    if isinstance(plan, Complete):
        if box.rank == 0 and not cfg.keep_work:
            _remove_leftover_work(plan)
        return _already_complete(box, plan, clock)
    if box.rank == 0 and plan.precision_why:
        log.info(plan.precision_why)
    ctx = RunContext.build(cfg, plan, box, stop, vol)
    ctx = sharedpaths.plan_time_checks(ctx, cfg)  # every rank sees the paths rank 0 does, and has its device
    norm = normalization.global_normalization(ctx.options, plan.settings, plan.kept, ctx.src, box)
    ctx = ctx.with_plan(plan.with_normalization(norm))
    _log_normalization(box, ctx.plan)
    clock.lap("normalize")
    if ctx.options.cellpose:
        import_backend(box)
        clock.lap("import")
    ctx, segmented, flowed = _segment(ctx, clock)
    plan = ctx.plan
    mine = plan.owners(box.size)[box.rank]  # the blocks this rank stitches, relabels and reports
    counts, offsets = merge.block_counts(ctx, mine)
    edges = faces.match_faces(ctx, offsets)
    merged = merge.merge(box, edges, counts, offsets, mine)
    clock.lap("stitch")
    relabelled = relabel.relabel_phase(ctx, mine, merged)
    clock.lap("relabel")
    tabled = table.table_phase(ctx, mine, merged)
    clock.lap("table")
    levels = finish.build_label_pyramid(ctx)
    if plan.output.group is not None:
        clock.lap("pyramid")
    clock.timings["total"] = time.perf_counter() - clock.t0
    summary = _summary(box, plan, merged, tabled, levels, clock.timings, flowed)
    summary["warnings"] = finish.result_warnings(ctx.options, plan, merged.n_objects, tabled.size_hist)
    summary = finish.finish_phase(ctx, summary)
    reused = box.allreduce_sum(relabelled.reused, "counting reused blocks")
    _log_done(box, plan, merged, segmented, summary)
    summary["comm_bytes_sent"] = edges.bytes_sent
    labels = storage.open_array(plan.output.array, mode="r")
    boxes = Boxes(np.load(outputs.boxes_path(plan.output.stem), mmap_mode="r"))
    return RunResult(labels, boxes, merged.n_objects, merged.n_merged, summary["timings"],
                     tabled.table, len(plan.done) + reused, summary, plan.output.array)


def _segment(ctx, clock):
    """The backend, the flow step (``--pipeline flows``) and the segmentation: (the context with the
    plan of what is left to segment, Segmented, Flowed or None)."""
    plan, box = ctx.plan, ctx.box
    my_blocks = box.scatter(plan.segment_assignment if box.rank == 0 else None, "handing out the blocks")
    flows_pipeline = plan.settings.pipeline == "flows"  # every rank may compute flows: every rank loads the model
    backend, scratch = segment.start_backend(ctx, plan.to_segment if flows_pipeline else my_blocks)
    clock.lap("model_load")
    flowed = None
    if flows_pipeline:  # the flow step builds the masks too (phases/boxmasks.py)
        threaded = gpu_rank_wants(ctx.options.masks_during_flows, backend)  # a GPU rank by default
        flowed = flows.flows_phase(ctx, backend, scratch, threaded)
        clock.lap("flows")
        left = sorted(set(plan.to_segment) - set(flowed.masked))
        if left:  # every rank agreed that the step ended well: nothing may be left
            raise DistributedError(f"the flow step ended without the masks of {len(left)} block(s), e.g. "
                                   f"{plan.grid.index_of(left[0])}", [(box.rank, "blocks left unmasked")])
        segmented = segment.Segmented(len(flowed.masked), flowed.seconds)
    else:
        segmented = segment.segment_phase(ctx, backend, scratch)
    del backend
    clock.lap("segment")
    return ctx, segmented, flowed


def plan_phase(cfg, box, held):
    """Every rank opens the input; rank 0 checks everything, locks the output and plans, or
    finds the output already complete (a :class:`Complete` instead of the plan); the plan (or
    rank 0's error, raised alike on every rank) goes to all.

    No rank imports Cellpose (5-30 s) before the plan is agreed: a mistake in the command is
    refused in about a second whatever the number of ranks (see :func:`import_backend`)."""
    vol, err, plan = None, None, None
    if box.rank == 0:
        _log_start(cfg, box)
    try:
        vol = open_volume(cfg)
    except Exception as exc:  # noqa: BLE001 - agreed below
        err = exc
    if box.rank == 0 and err is None:
        try:
            place, _ = outputs.locate_output(cfg, vol)
            held["lock"] = outputs.lock_output(cfg, place, tick=box.beat)  # before anything is written
            plan = find_complete(cfg, vol, place, box.size) or make_plan(cfg, vol, box.size)
        except OutputExistsError as exc:
            err = _what_changed(cfg, vol, exc)
        except Exception as exc:  # noqa: BLE001 - sent to every rank below
            err = exc
    root_err = box.bcast(None if err is None or box.rank != 0 else (type(err).__name__, str(err)), "planning")
    if root_err is not None:
        if box.rank == 0:
            raise agreed(err)
        _raise_from_root(root_err)
    box.agree(sharedpaths.input_error(err, cfg, box), where="opening the input")  # another rank could not
    plan = box.bcast(plan, "sending the plan")
    if box.rank == 0 and not isinstance(plan, Complete):
        _log_plan(box, plan, held.get("lock"))
    return vol, plan


def _raise_from_root(payload):
    """Raise on this rank the error rank 0 reported during planning."""
    cls_name, message = payload
    import mpicellpose.errors as errs

    cls = getattr(errs, cls_name, None)
    if isinstance(cls, type) and issubclass(cls, MpiCellposeError) and cls is not DistributedError:
        raise agreed(cls(message))
    raise agreed(DistributedError(f"rank 0 failed during planning: {message}", [(0, message)]))


def import_backend(box):
    """Every rank imports Cellpose and torch, once the plan is agreed (timed apart: "import").

    A failure is not raised here: :func:`mpicellpose.runner.blocks.build_backend` reports it clearly."""
    t = time.perf_counter()
    if box.rank == 0:
        log.info("importing Cellpose and torch on %d rank(s) (5-30 s, longer the first time on a node)", box.size)
    try:
        import cellpose.models  # noqa: F401
    except Exception:  # noqa: BLE001 - build_backend raises the clear error
        return
    if box.rank == 0:
        from ..cellpose.models import cellpose_version

        log.info("imported Cellpose %s in %.1f s", cellpose_version()[1], time.perf_counter() - t)


# --------------------------------------------------------------------------- a finished output
@dataclass(frozen=True)
class Complete:
    """Rank 0's finding that OUTPUT already holds this very run, finished: nothing to do."""

    plan: Plan            # the dry plan (nothing was prepared or written)
    marker: dict          # the output's 'mpicellpose' attributes
    table: str
    boxes: str


def find_complete(cfg, vol, place, n_ranks):
    """Rank 0: :class:`Complete` when OUTPUT is the finished output of this configuration (its
    marker says complete with this run's run_id; its object table and boxes are there), else
    None.  Only reads; ``--restart`` always computes again."""
    marker = outputs.finished_marker(place, cfg.restart)  # before the dry plan: it is cheap
    if marker is None:
        return None
    dry = make_plan(cfg, vol, n_ranks, prepare=False)
    if dry.run_id != marker.get("run_id"):
        return None
    return Complete(dry, marker, outputs.table_path(place.stem), outputs.boxes_path(place.stem))


def _what_changed(cfg, vol, err):
    """An output made by a run with another configuration: say what differs from this one."""
    try:
        place = outputs.resolve_output(cfg, vol)
        old = (outputs.output_marker(place.array) or {}).get("fingerprint")
        if not old or "another configuration" not in str(err):
            return err
        new = fingerprint_of(cfg, vol, resolve_settings(cfg, vol), output_format(cfg, vol, place))
        diff = fingerprint_diff(old, new)
    except Exception:  # noqa: BLE001 - the original message stands
        return err
    if not diff:
        return err
    more = " ..." if len(diff) > 6 else ""
    return OutputExistsError(f"{err}. It differs from this command in: {'; '.join(diff[:6])}{more} (with the "
                             f"earlier settings the run finds it complete)")


def _remove_leftover_work(done: Complete) -> None:
    """Rank 0: the work directory of this very run, left by a clean-up that was cut short (a kill
    after the completion marker): removed now."""
    work = WorkDir(done.plan.work_dir)
    old = work.read_run() if work.path.is_dir() else None
    if old is not None and old.get("run_id") == done.marker.get("run_id"):
        log.info("removing the work directory %s left by an interrupted clean-up of the finished run", work.path)
        work.remove()


def _already_complete(box, done: Complete, clock) -> RunResult:
    """Every rank: the result of the finished run, read from the output (which is not touched)."""
    marker, plan = done.marker, done.plan
    n_objects = int(marker["n_objects"])
    if box.rank == 0:
        log.info("already complete: %d objects in %s (finished %s with this configuration); nothing to do "
                 "(pass --restart to compute it again)", n_objects, plan.output.array, marker.get("finished", "?"))
    clock.timings["total"] = time.perf_counter() - clock.t0
    timings = {k: round(v, 3) for k, v in clock.timings.items()}
    stats = {"already_complete": True, "n_objects": n_objects, "table": done.table,
             "n_stitched_objects": marker.get("n_stitched_objects"), "ranks": box.size, "timings": timings,
             "normalization": marker.get("normalization"), "finished": marker.get("finished"),
             "run_timings": marker.get("timings")}
    labels = storage.open_array(plan.output.array, mode="r")
    boxes = Boxes(np.load(done.boxes, mmap_mode="r"))
    # n_merged: recorded by newer runs only; -1 when the output does not say
    return RunResult(labels, boxes, n_objects, int(marker.get("n_merged_away", -1)), timings, done.table,
                     len(plan.kept), stats, plan.output.array)


def _summary(box, plan, merged, tabled, levels, timings, flowed=None) -> dict:
    summary = {"n_stitched_objects": tabled.n_stitched_objects, "table": tabled.table,
               "table_parquet": tabled.table_parquet, "cost": cost_summary(plan, flowed, box.size)}
    if plan.output.group is not None:
        summary["pyramid_levels"] = None if levels is None else [list(x) for x in levels]
    summary.update({"n_objects": merged.n_objects, "n_provisional": merged.n_provisional,
                    "n_merged_away": merged.n_merged, "n_edges": merged.n_edges,
                    "dtype": str(merged.dtype), "ranks": box.size,
                    "timings": {k: round(v, 3) for k, v in timings.items()},
                    "normalization": plan.normalization})
    return summary


# --------------------------------------------------------------------------- messages (rank 0)
def _log_start(cfg, box):
    """The first line, within a second of the start: what is read and what model runs."""
    src = cfg.input if isinstance(cfg.input, (str, os.PathLike)) else f"an in-memory {type(cfg.input).__name__}"
    if cfg.dataset:
        src = f"{src} (dataset {cfg.dataset})"
    if cfg.backend == "cellpose":
        model = cfg.model_kwargs.get("pretrained_model") or cfg.model_kwargs.get("model_type") or "Cellpose's default"
        what = f"model {model} (Cellpose)"
    else:
        what = f"the {cfg.backend if isinstance(cfg.backend, str) else type(cfg.backend).__name__} backend"
    log.info("reading %s and planning; %s on %d rank(s)", src, what, box.size)


def _log_plan(box, plan, lock):
    from .table import have_parquet

    grid = plan.grid
    log.info("plan: volume %s, grid %s (%d blocks, %d kept by mask, %d already done), blocksize %s, "
             "overlap %s, %s stitching, %d rank(s)", plan.shape, grid.grid_shape, len(grid),
             len(plan.kept), len(plan.done), plan.blocksize, plan.overlap, plan.stitch_rule, box.size)
    log.info("writes: %s", "; ".join(f"{what} {path}" for what, path in
                                      outputs.written_paths(plan.output, plan.work_dir, have_parquet())))
    if plan.replaces:
        log.warning("--overwrite: %s will be replaced", plan.replaces)
    todo = len(plan.kept) - len(plan.done)
    s = plan.settings
    if s.pipeline == "flows" and todo:
        from ..grid.boxes import BoxGrid

        boxes = BoxGrid(s.grid, plan.kept, s.flow_box, s.flow_halo)
        if len(boxes) < box.size:
            log.warning("%d ranks for %d flow box(es) of %d block(s) per side: %d rank(s) will idle in the flow "
                        "and mask steps; --flow-box 1 makes %d boxes (the network then sees a halo where they "
                        "meet), or use fewer ranks", box.size, len(boxes), s.flow_box, box.size - len(boxes),
                        int(np.count_nonzero(BoxGrid(s.grid, plan.kept, 1, s.flow_halo).has_kept)))
    elif 0 < todo < box.size:
        log.warning("%d ranks for %d block(s) to segment: %d rank(s) will idle in the segmentation (they take part "
                    "in stitching and writing); use at most %d rank(s), or a smaller --blocksize", box.size, todo,
                    box.size - todo, todo)


def _log_normalization(box, plan):
    norm = plan.normalization
    if norm and box.rank == 0:
        per_channel = norm["normalize"].get("lowhigh_per_channel")
        bounds = [norm["normalize"]["lowhigh"]] if not per_channel else per_channel
        text = ", ".join(f"[{lo:.6g}, {hi:.6g}]" for lo, hi in bounds)
        log.info("normalisation: percentiles %s of %d voxels from %d blocks -> %s%s", norm["percentile"],
                 norm["sampled_voxels"], norm["sampled_blocks"], text, " (per channel)" if per_channel else "")


def _log_done(box, plan, merged, segmented, summary):
    if box.rank == 0:
        log.info("done: %d objects (%d provisional, %d merged away, %d stitched across faces), dtype %s; "
                 "%d blocks segmented now, %d reused from an earlier run; time %s",
                 merged.n_objects, merged.n_provisional, merged.n_merged, summary["n_stitched_objects"],
                 merged.dtype, segmented.blocks_now, len(plan.done),
                 ", ".join(f"{k} {v:.2f}s" for k, v in summary["timings"].items()))
        for warning in summary.get("warnings") or ():
            log.warning(warning)
