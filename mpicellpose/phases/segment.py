"""Phase 2, every rank: start the backend once, then segment this rank's blocks.

Each block goes through :mod:`mpicellpose.blocks` (read, check, preprocess, backend, number
the core, scratch chunk + record).  Rank 0 shows the progress while it works and while it waits
(:class:`Progress`); a failing rank tells the others at once (they stop after their block in
progress), and the phase ends in one agreement, so an error or a stop request ends every rank
alike.
"""
from __future__ import annotations

import contextvars
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass

from .. import comm as mpi
from ..grid import geometry as geo
from ..volumes import storage
from ..blocks import block_image, build_backend, gpu_rank_wants, number_core, record_block, segment_image
from ..errors import BackendError
from ..faults import maybe_fault
from ..runlog import log
from ..signals import StopNow
from ..workdir import WorkDir

PROGRESS_EVERY = 5.0   # seconds between progress lines in a log at first (at most 30 s later on)
REDRAW_EVERY = 0.5     # seconds between redraws of the progress line on a terminal
BAR_WIDTH = 24


@dataclass(frozen=True)
class Segmented:
    blocks_now: int      # blocks segmented by all ranks in this run
    seconds: float


def fmt_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _shows_info_on(stream) -> bool:
    """True when the run's INFO messages are printed on ``stream`` (the CLI's rank 0)."""
    lg = logging.getLogger("mpicellpose.run")
    while lg is not None:
        for h in lg.handlers:
            if getattr(h, "stream", None) is stream and h.level <= logging.INFO:
                return True
        if not lg.propagate:
            return False
        lg = lg.parent
    return False


class Progress:
    """Rank 0's progress display for the segmentation phase.

    Work is counted in voxels of the blocks' read regions (what the backend is given).  Every
    rank's block in progress counts for the time it has run so far at the rate of the blocks
    finished (voxels per second per rank), see :func:`_share_done`, so the display moves
    during a block and the ETA (the busiest rank's remaining voxels at that rate) falls between
    blocks instead of jumping.  Before the first block finishes there is no rate: the line says
    how long the first blocks have been running.

    The main thread records what it hears (:meth:`__call__`: after each of rank 0's blocks and
    while it waits for the others); a small thread draws, so the display also moves while rank 0
    is itself inside the backend.  The thread makes no MPI call.  On a terminal (rank 0's stderr
    is a tty and shows INFO) one line is redrawn in place; otherwise a plain log line is written
    every few seconds (every 5 s at first, at most every 30 s in long runs).
    """

    def __init__(self, box, plan, stream=None, label="segment", unit="block"):
        self.box, self.label, self.unit = box, label, unit
        grid = plan.grid
        # blocks handed out at run time: each rank reports (voxels done, voxels of its block in progress)
        self.dynamic = getattr(plan, "handout", "static") == "dynamic" and box.size > 1
        assign = [list(a) for a in plan.segment_assignment] + [[] for _ in range(box.size)]
        self.sizes = [geo.block_sizes(grid, a, "read").tolist() for a in assign[:box.size]]
        self.total = sum(len(a) for a in self.sizes)
        self.total_vox = sum(sum(a) for a in self.sizes)
        self.workers = max(1, sum(1 for a in self.sizes if a))
        self.work = [(0, a[0] if a else 0) for a in self.sizes]  # dynamic: every rank starts its share's first
        self.t0 = time.perf_counter()
        self.done = [0] * box.size               # blocks done per rank, as last heard
        self.since = [self.t0] * box.size        # when rank 0 learnt that each rank began its current block
        self.stream = stream if stream is not None else sys.stderr
        self.tty = box.rank == 0 and _isatty(self.stream) and _shows_info_on(self.stream)
        self.last_line = self.t0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # -- main thread ---------------------------------------------------------
    def __call__(self) -> None:
        """Receive and record the blocks each rank reported (rank 0; also called while it waits)."""
        if self.box.rank != 0:
            return
        self.box.poll()
        self._record()

    def _record(self) -> None:
        now = time.perf_counter()
        work = getattr(self.box, "work", {})
        with self._lock:
            for r, (d, _) in list(self.box.progress.items()):
                if 0 <= r < len(self.done) and d != self.done[r]:
                    self.done[r], self.since[r] = d, now
                    if r in work:
                        self.work[r] = work[r]

    def start(self) -> "Progress":
        if self.box.rank == 0 and self.total:
            log.info("%s: %d %s(s) on %d rank(s)%s, %s voxels of read regions; the first estimate comes "
                     "with the first finished %s", self.label, self.total, self.unit, self.box.size,
                     ", handed out at run time (costliest first)" if self.dynamic else "", f"{self.total_vox:,}",
                     self.unit)
            self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,),
                                            name="mpicellpose-progress", daemon=True)
            self._thread.start()
        return self

    def close(self, finished: bool) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._thread = None
        self._record()
        now = time.perf_counter()
        if self.tty:
            self._draw(now)
            self._write("\n")
        if finished:
            log.info("%s: %d/%d %ss done in %s", self.label, sum(self.done), self.total, self.unit,
                     fmt_eta(now - self.t0))
        elif not self.tty:
            self._line(now)

    # -- the estimate (pure but for the clock) ---------------------------------
    def estimate(self, now: float) -> dict:
        """Blocks done, the fraction of the voxels done (finished + the share of the blocks in
        progress), the rate (voxels per second per rank, None before a block finished), the ETA."""
        with self._lock:
            done, since, work = list(self.done), list(self.since), list(self.work)
        if self.dynamic:
            return self._estimate_shared(now, done, since, work)
        finished = [sum(s[:d]) for s, d in zip(self.sizes, done)]
        busy = sum(t - self.t0 for t, d in zip(since, done) if d)
        rate = sum(finished) / busy if busy > 0 and sum(finished) > 0 else None
        est, eta, running = 0.0, 0.0, 0
        for s, d, t, fin in zip(self.sizes, done, since, finished):
            left = sum(s[d:])
            part = 0.0
            if d < len(s):
                running += 1
                if rate:
                    part = s[d] * _share_done((now - t) * rate / s[d])
            est += fin + part
            if rate:
                eta = max(eta, (left - part) / rate)
        return {"blocks": sum(done), "fraction": est / self.total_vox if self.total_vox else 1.0,
                "rate": rate, "eta": eta if rate else None, "running": running, "elapsed": now - self.t0}

    def _estimate_shared(self, now, done, since, work) -> dict:
        """The same with blocks handed out at run time: what is left is shared by every working rank,
        and no rank finishes before its block in progress."""
        finished = sum(w[0] for w in work)
        busy = sum(t - self.t0 for t, d in zip(since, done) if d)
        rate = finished / busy if busy > 0 and finished > 0 else None
        est, tail, running = float(finished), 0.0, 0
        for (_, cur), t in zip(work, since):
            if cur:
                running += 1
                if rate:
                    part = cur * _share_done((now - t) * rate / cur)
                    est += part
                    tail = max(tail, (cur - part) / rate)
        eta = max((self.total_vox - est) / (rate * self.workers), tail) if rate else None
        return {"blocks": sum(done), "fraction": min(est / self.total_vox, 1.0) if self.total_vox else 1.0,
                "rate": rate, "eta": eta, "running": running, "elapsed": now - self.t0}

    def text(self, now: float, bar: bool = False) -> str:
        e = self.estimate(now)
        pct = 100.0 * e["fraction"]
        head = f"{self.label}: {pct:3.0f}%"
        if bar:
            n = int(round(BAR_WIDTH * e["fraction"]))
            head = f"{self.label} [{'#' * n}{'.' * (BAR_WIDTH - n)}] {pct:3.0f}%"
        body = f"{e['blocks']}/{self.total} {self.unit}s done"
        if e["running"]:
            body += f", {e['running']} in progress"
        tail = f"elapsed {fmt_eta(e['elapsed'])}, "
        tail += f"ETA {fmt_eta(e['eta'])}" if e["eta"] is not None else f"ETA after the first {self.unit}"
        return f"{head} ({body}), {tail}"

    # -- drawing (the thread) ----------------------------------------------------
    def _loop(self):
        while not self._stop.wait(REDRAW_EVERY):
            try:
                now = time.perf_counter()
                if self.tty:
                    self._draw(now)
                if now - self.last_line >= min(30.0, max(PROGRESS_EVERY, (now - self.t0) / 20.0)):
                    self._line(now)
            except Exception:  # noqa: BLE001 - a display must never break a run
                pass

    def _line(self, now):
        self.last_line = now
        # on a terminal the redrawn line shows it already: the log files (DEBUG) still get it
        (log.debug if self.tty else log.info)("%s", self.text(now))

    def _draw(self, now):
        self._write("\r" + self.text(now, bar=True) + "\x1b[K")

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _share_done(x: float) -> float:
    """The share of a block counted as done after ``x`` times the time the rate gives it: 95% of
    ``x`` up to the expected time, then closer and closer to (never at) 100%, so that an ETA
    keeps falling, ever more slowly, while a late block is still running."""
    if x <= 1.0:
        return 0.95 * max(x, 0.0)
    return 1.0 - 0.05 * math.exp(-(x - 1.0))


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def start_backend(cfg, plan, box, my_blocks):
    """(backend or None, scratch array): every rank takes part, with or without blocks."""
    model = plan.resolved_model
    if box.rank == 0 and model and isinstance(cfg.backend, str) and cfg.backend == "cellpose":
        log.info("loading model %s (%s) on the rank(s) with blocks", model.get("name"),
                 model.get("path") or "downloaded by Cellpose")
    with box.step("backend start-up"):
        scratch = storage.open_array(WorkDir(plan.work_dir).scratch, mode="r+")
        backend = build_backend(cfg, plan.settings, plan.normalization, box, load=bool(my_blocks))
    return backend, scratch


def _block_error(exc, blk):
    """The error to report for a block: ours name it already; others get its name."""
    if getattr(exc, "block", None) is not None:
        return exc
    err = BackendError(f"block {blk.index} (#{blk.linear}): {mpi.describe(exc)}")
    err.__cause__ = exc
    return err


def segment_phase(cfg, plan, box, stop, src, my_blocks, backend, scratch) -> Segmented:
    t0 = time.perf_counter()
    box.start_progress("segment")
    label = "masks" if getattr(backend, "from_flows", False) else "segment"  # --pipeline flows: the mask step
    progress, agreed = Progress(box, plan, label=label).start(), False
    try:
        err = _segment_blocks(cfg, plan, box, stop, src, my_blocks, backend, scratch, progress)
        if stop and err is None:
            box.notify_abort("stop requested by signal")
        box.agree(err, interrupted=bool(stop), where="segmentation", progress=progress)
        agreed = True
    finally:
        progress.close(finished=agreed)
    return Segmented(progress.total, time.perf_counter() - t0)


def _segment_blocks(cfg, plan, box, stop, src, my_blocks, backend, scratch, progress):
    """This rank's blocks; returns the error to agree on (or None)."""
    grid, work = plan.grid, WorkDir(plan.work_dir)

    def one(blk, done, get):
        labels = segment_image(src, blk, plan.settings, cfg.preprocessing_steps, backend, stop,
                               img=get() if get is not None else None)
        read_local, n, core = number_core(labels, blk)
        maybe_fault("segment", box.rank, done)
        record_block(work, scratch, grid, blk, plan.settings, cfg.iou_depth, read_local, n, core)

    dynamic = getattr(plan, "handout", "static") == "dynamic"
    load = None
    if read_ahead_wanted(cfg, backend) and not getattr(backend, "from_flows", False):
        def load(blk):
            return block_image(src, blk, plan.settings, cfg.preprocessing_steps)
    err, _ = run_blocks(box, grid, plan.segment_assignment, dynamic, "segment", progress, stop, one, _block_error,
                        load)
    return err


def read_ahead_wanted(cfg, backend) -> bool:
    """``--read-ahead`` for this rank: auto is on for a rank whose model runs on a GPU."""
    return gpu_rank_wants(getattr(cfg, "read_ahead", "auto"), backend)


def run_blocks(box, grid, shares, dynamic, label, progress, stop, work, block_error, load=None):
    """The block loop of a per-block phase (segmentation, flows): this rank's share of ``shares``,
    or blocks handed out at run time (:class:`mpicellpose.comm.Handout`; every rank enters it, with
    or without blocks).  ``work(blk, done, get)`` does one block and may return a count; a block stopped
    by a signal is not counted (a resume redoes it); an error is logged, told to the other ranks and
    returned (``block_error(exc, blk)`` names the block).  Returns (error or None, sum of the counts).

    ``load(blk)`` (optional, ``--read-ahead``): the block's input, read in a thread while the block
    before it is worked on; ``get()`` then returns it (or raises the read's error) and is None
    without ``load``."""
    mine = shares[box.rank] if box.rank < len(shares) else ()
    total = -1 if dynamic and box.size > 1 else len(mine)
    err, done, vox, seconds, counted = None, 0, 0, 0.0, 0
    with mpi.Handout(box, shares, dynamic=dynamic, label=label, progress=progress) as blocks:
        ahead = read_ahead(blocks, grid, load)
        try:
            for blk, get in ahead:
                if box.poll() or stop:
                    break
                if done:  # rank 0 hears of a finished block with the size of the next one
                    box.send_progress(done, total, seconds, work=(vox, geo.box_size(blk.read)))
                    progress()
                t_block = time.perf_counter()
                try:
                    counted += work(blk, done, get) or 0
                except StopNow:
                    break  # the block in progress is not recorded: a resume redoes it
                except Exception as exc:  # noqa: BLE001 - agreed by the caller, on every rank
                    err = block_error(exc, blk)
                    log.error("rank %d: %s", box.rank, err)
                    box.notify_abort(str(err))
                    break
                done, vox, seconds = done + 1, vox + geo.box_size(blk.read), time.perf_counter() - t_block
        finally:
            ahead.close()  # a read still running is waited for, one not started is dropped
        if done:
            box.send_progress(done, total, seconds, work=(vox, 0))
            progress()
    return err, counted


def read_ahead(blocks, grid, load):
    """(block, get) for each block of ``blocks``.  With ``load``, the next block is taken (from the
    hand-out, in this thread: MPI stays on the main thread) as soon as the current one is given
    out, and ``load`` reads it in a second thread meanwhile: a GPU rank's network does not wait
    for the disk.  The cost: one more block's input in memory, and a block taken one step early."""
    if load is None:
        for linear in blocks:
            yield grid.block(linear), None
        return
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    pool = ThreadPoolExecutor(1, thread_name_prefix="mpicellpose-read")
    try:
        it = iter(blocks)
        nxt = next(it, None)
        fut = pool.submit(load, grid.block(nxt)) if nxt is not None else None
        while nxt is not None:
            blk, cur = grid.block(nxt), fut
            nxt = next(it, None)
            fut = pool.submit(load, grid.block(nxt)) if nxt is not None else None
            yield blk, cur.result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
