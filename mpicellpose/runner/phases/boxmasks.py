"""The mask step of ``--pipeline flows``: one region per flow box, as soon as its neighbours' shells exist.

A rank keeps the flow field of each box it computed (in memory, half precision) until every
neighbouring box whose core its mask region touches has written its shell
(:mod:`.shells`); then it assembles the field over the mask region (its own core, the
neighbours' pieces, "no cell" where the mask leaves blocks out), builds Cellpose's masks of the
whole region at once, and records each of the box's blocks to segment from them exactly as the
per-block phase records a block (scratch chunk, then the record).  The labels are a function of
the box grid only, never of which rank did what or when.

Where it runs: on a rank whose model runs on a GPU (``--masks-during-flows auto``, the default),
in a CPU thread while the main thread keeps the GPU busy with the next boxes' flows; on a
CPU-only rank, in the main thread between boxes (both would share the same cores).  The thread
makes no MPI call; its error is reported by the main thread through the usual agreement.
"""
from __future__ import annotations

import contextvars
import threading
import time

import numpy as np

from ...cellpose import flowfield as ff
from ...grid import geometry as geo
from ...grid.boxes import flow_channels
from ..blocks import number_core, record_block
from ..faults import maybe_fault
from ..runlog import log

POLL = 0.25          # seconds between looks at the neighbours' markers while no box is ready
JOIN_SECONDS = 600   # the most the main thread waits for the thread's box in progress at the end
NEVER_A_CELL = -1.0e4  # cell probability where the mask leaves blocks out (or no box computed flows)


class BoxMasks:
    """The boxes this rank masks: :meth:`add` each box whose flows it computed (and whose blocks
    are to segment); :meth:`run_ready` (inline) or the thread masks them when ready; :meth:`drain`
    at the end."""

    def __init__(self, ctx, backend, scratch, boxes, store, to_mask, threaded: bool):
        self.ctx, self.backend, self.scratch, self.boxes, self.store = ctx, backend, scratch, boxes, store
        self.to_mask = to_mask                              # every box masked in this run (all ranks)
        self.todo = np.zeros(len(ctx.plan.grid), bool)     # the blocks to segment (a compact array)
        self.todo[np.asarray(list(ctx.plan.to_segment), np.int64)] = True
        self.total_voxels = int(np.prod(ctx.plan.settings.shape))
        self.pending, self.done, self.error, self.current = {}, [], None, None
        self.seconds = 0.0
        self._known = set()                                 # boxes whose shells are known written
        self._cv = threading.Condition()
        self._stop = False
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,),
                                            name="mpicellpose-masks", daemon=True)
            self._thread.start()

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    # -- readiness -----------------------------------------------------------
    def _ready(self, box: int) -> bool:
        for n in self.boxes.neighbours(box):
            if n in self._known or not self.boxes.has_kept[n]:
                continue
            if not self.store.done(n):
                return False
            self._known.add(n)
        return True

    def _pick(self):
        return next((b for b in self.pending if self._ready(b)), None)

    # -- adding and masking ----------------------------------------------------
    def add(self, box: int, field) -> None:
        with self._cv:
            self.pending[int(box)] = field
            self._cv.notify()

    def run_ready(self) -> None:
        """Inline: mask every pending box that is ready now (main thread, no thread running)."""
        while self.error is None and (box := self._pick()) is not None:
            self._mask(box, self.pending.pop(box))

    def _loop(self) -> None:
        """The thread: the readiness of pending boxes is looked at outside the lock (the main
        thread's :meth:`add` never waits for the file system)."""
        while True:
            with self._cv:
                if self._stop or self.error is not None:
                    return
                keys = list(self.pending)
            box = next((b for b in keys if self._ready(b)), None)
            with self._cv:
                if box is None:
                    if not self._stop:
                        self._cv.wait(POLL)
                    continue
                field, self.current = self.pending.pop(box), box
            self._mask(box, field)
            with self._cv:
                self.current = None

    def _mask(self, box: int, field) -> None:
        t = time.perf_counter()
        try:
            labels, region = self._labels(box, field)
            self._record(box, labels, region)
            self.store.mark_masked(box)
            self._clean(box)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
            log.error("masks of flow box #%d: %s: %s", box, type(exc).__name__, exc)
            return
        self.seconds += time.perf_counter() - t
        with self._cv:
            self.done.append(box)

    def _labels(self, box: int, field):
        """(labels of the box's mask region, the region) from its field and its neighbours' shells."""
        b, ndim = self.boxes, self.boxes.ndim
        region = b.mask_region(box)
        flows = np.zeros((flow_channels(ndim),) + geo.box_shape(region), np.float32)
        flows[ndim] = NEVER_A_CELL
        flows[(slice(None),) + geo.box_slices(b.core(box), [a for a, _ in region])] = field
        for n in b.neighbours(box):
            if b.has_kept[n]:
                self.store.read_into(flows, region, n, b.needed_pieces(n))
        return ff.compute_masks(self.backend, flows, ndim, self.total_voxels), region

    def _record(self, box: int, labels, region) -> None:
        plan, origin = self.ctx.plan, [a for a, _ in region]
        for i, linear in enumerate(b for b in self.boxes.blocks_of(box) if self.todo[b]):
            blk = plan.grid.block(linear)
            read_local, n, core = number_core(labels[geo.box_slices(blk.read, origin)], blk)
            maybe_fault("masks", self.ctx.box.rank, len(self.done) + i)
            record_block(self.ctx.work, self.scratch, blk, plan.settings, read_local, n, core)

    def _clean(self, box: int) -> None:
        """Delete the shells no box still to mask reads: this box's neighbours' (and its own)."""
        b = self.boxes
        for x in [box, *b.neighbours(box)]:
            if not b.has_kept[x]:
                continue
            readers = [y for y in b.neighbours(x) if b.has_kept[y]]
            if all(y not in self.to_mask or self.store.is_masked(y) for y in readers):
                self.store.remove(x)

    # -- the end ---------------------------------------------------------------
    def busy(self) -> bool:
        with self._cv:
            return bool(self.pending) or self.current is not None

    def drain(self, box, stop) -> list:
        """After this rank's last flows: mask what is pending as the neighbours' shells arrive
        (from ranks still at work), unless a rank fails or a stop is requested; then :meth:`close`."""
        while self.error is None and self.busy() and not (box.poll() or stop):
            if self._thread is None:
                self.run_ready()
                if self.pending:
                    time.sleep(POLL)
            else:
                self._thread.join(POLL)
                if not self._thread.is_alive():
                    break
        return self.close()

    def close(self) -> list:
        """Stop (after the box in progress, waited for at most :data:`JOIN_SECONDS`); the boxes masked."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)
            if self._thread.is_alive():
                log.error("the mask thread did not stop within %d s (box #%s in progress)", JOIN_SECONDS,
                          self.current)
        with self._cv:
            return sorted(self.done)
