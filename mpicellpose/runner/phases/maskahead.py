"""Masks built during the flow step, so the GPU does not wait for the CPU (``--masks-during-flows``).

Under ``--pipeline flows`` the network (the flow step) and the mask step are separate phases:
without this, a GPU rank's device idles during the whole mask phase, which on a GPU is as long
as the network's (Cellpose's 3D mask reconstruction is mostly CPU work).  Here a CPU thread of
each rank builds, while the rank's main thread keeps the GPU busy with the next blocks' flows,
the masks of the blocks whose flows it computed as soon as every flow they read is done
(the done-markers of the slabs they read are on disk: written by any rank).  A block is
offered by the rank that computed its first orientation's slab, so no two ranks mask it.  A
block masked here is recorded exactly as the segmentation phase records it (scratch chunk,
then the record), from the same
flows by the same code, so the labels do not depend on who built them or when.  When the flow
step ends the thread stops after its block in progress; the segmentation phase does the rest.

The thread makes no MPI call; the main thread learns of its error after the flow step and
reports it through the usual agreement.  ``auto`` (the default) turns it on for ranks whose
model runs on a GPU: on a CPU the two would only compete for the same cores.
"""
from __future__ import annotations

import contextvars
import threading

from ..blocks import number_core, record_block
from ..runlog import log
from .flows import FlowMasks, needed_slabs, slab_grid

POLL = 0.5  # seconds between looks at the done-markers while no block is ready


class MaskAhead:
    """The CPU thread of one rank; :meth:`offer_slab` each slab this rank computed."""

    def __init__(self, ctx, backend, scratch):
        plan = ctx.plan
        self.plan, self.scratch, self.work = plan, scratch, ctx.work
        self.masks = FlowMasks(backend, ctx)
        self.slabs = slab_grid(plan.settings, plan.kept)
        self.todo = set(plan.to_segment)
        self.pending, self.done, self.error, self.current = [], [], None, None
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name="mpicellpose-masks", daemon=True)
        self._thread.start()

    def offer_slab(self, slab) -> None:
        """The blocks of a slab this rank computed, if it is of the first orientation."""
        if slab.orient == 0:
            with self._cv:
                self.pending.extend(b for b in slab.blocks if b in self.todo)
                self._cv.notify()

    def _ready(self, linear: int) -> bool:
        return all(self.work.flow_done(s).exists() for s in needed_slabs(self.slabs, self.plan.kept, [linear]))

    def _next(self):
        """The first pending block whose flows are all done, or None once stopped."""
        with self._cv:
            self.current = None
            while not self._stop:
                pick = next((b for b in self.pending if self._ready(b)), None)
                if pick is not None:
                    self.pending.remove(pick)
                    self.current = pick
                    return pick
                self._cv.wait(POLL)
        return None

    def busy(self) -> bool:
        with self._cv:
            return bool(self.pending) or self.current is not None

    def _run(self) -> None:
        grid, s = self.plan.grid, self.plan.settings
        while (linear := self._next()) is not None:
            blk = grid.block(linear)
            try:
                labels = self.masks.segment_block(blk)
                read_local, n, core = number_core(labels, blk)
                record_block(self.work, self.scratch, blk, s, read_local, n, core)
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                self.error = exc
                log.error("masks of block %s during the flow step: %s: %s", blk.index, type(exc).__name__, exc)
                return
            self.done.append(linear)

    def drain(self, box, stop) -> list:
        """After this rank's last flows: let the thread finish the blocks offered (their other
        flows come from ranks still at work), unless a rank fails or a stop is requested; then
        :meth:`close`."""
        while self._thread.is_alive() and self.busy() and not (box.poll() or stop):
            self._thread.join(POLL)
        return self.close()

    def close(self) -> list:
        """Stop after the block in progress; the blocks recorded here (grid order)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(600.0)  # bounded: a thread stuck in a hung read must not keep the rank (daemon thread)
        return sorted(self.done)
