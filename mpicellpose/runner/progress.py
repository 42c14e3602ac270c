"""Rank 0's progress display of a per-block phase (the segmentation, the flow step).

Work is counted in voxels of the blocks' read regions; the estimate (:meth:`Progress.estimate`)
is pure but for the clock; a small thread draws (one redrawn line on a terminal, plain log lines
otherwise) and makes no MPI call.
"""
from __future__ import annotations

import contextvars
import logging
import math
import sys
import threading
import time

from ..grid import geometry as geo
from .runlog import log


PROGRESS_EVERY = 5.0   # seconds between progress lines in a log at first (at most 30 s later on)


REDRAW_EVERY = 0.5     # seconds between redraws of the progress line on a terminal


BAR_WIDTH = 24


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

    def __init__(self, box, grid, shares, handout="static", stream=None, label="segment", unit="block"):
        self.box, self.label, self.unit = box, label, unit
        self.units = unit + ("es" if unit.endswith("x") else "s")
        # blocks handed out at run time: each rank reports (voxels done, voxels of its block in progress)
        self.dynamic = handout == "dynamic" and box.size > 1
        assign = [list(a) for a in shares] + [[] for _ in range(box.size)]
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

    @classmethod
    def of_plan(cls, box, plan, **kw) -> "Progress":
        """The display of the segmentation of ``plan`` (its grid, shares and hand-out)."""
        return cls(box, plan.grid, plan.segment_assignment, getattr(plan, "handout", "static"), **kw)

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
            log.info("%s: %d %s on %d rank(s)%s, %s voxels of read regions; the first estimate comes "
                     "with the first finished %s", self.label, self.total, self.units, self.box.size,
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
            log.info("%s: %d/%d %s done in %s", self.label, sum(int(d) for d in self.done), self.total, self.units,
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
        # a rank's count may be fractional: the share of its block in progress it reported (tick)
        finished = [sum(s[:int(d)]) + (d - int(d)) * (s[int(d)] if int(d) < len(s) else 0)
                    for s, d in zip(self.sizes, done)]
        busy = sum(t - self.t0 for t, d in zip(since, done) if d)
        rate = sum(finished) / busy if busy > 0 and sum(finished) > 0 else None
        est, eta, running = 0.0, 0.0, 0
        for s, d, t, fin in zip(self.sizes, done, since, finished):
            left = sum(s) - fin
            part = 0.0
            if int(d) < len(s):
                running += 1
                rest = s[int(d)] * (1.0 - (d - int(d)))
                if rate and rest > 0:
                    part = rest * _share_done((now - t) * rate / rest)
            est += fin + part
            if rate:
                eta = max(eta, (left - part) / rate)
        return {"blocks": int(sum(int(d) for d in done)), "fraction": est / self.total_vox if self.total_vox else 1.0,
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
        return {"blocks": int(sum(int(d) for d in done)), "fraction": min(est / self.total_vox, 1.0) if self.total_vox else 1.0,
                "rate": rate, "eta": eta, "running": running, "elapsed": now - self.t0}

    def text(self, now: float, bar: bool = False) -> str:
        e = self.estimate(now)
        pct = 100.0 * e["fraction"]
        head = f"{self.label}: {pct:3.0f}%"
        if bar:
            n = int(round(BAR_WIDTH * e["fraction"]))
            head = f"{self.label} [{'#' * n}{'.' * (BAR_WIDTH - n)}] {pct:3.0f}%"
        body = f"{e['blocks']}/{self.total} {self.units} done"
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
