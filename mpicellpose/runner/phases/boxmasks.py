"""The mask step of ``--pipeline flows``: one region per flow box, as soon as its neighbours' shells exist.

A rank keeps the flow field of each box it computed (in memory, half precision) until every
neighbouring box whose core its mask region touches has written its shell
(below); then it assembles the field over the mask region (its own core, the
neighbours' pieces, "no cell" where the mask leaves blocks out), builds Cellpose's masks of the
whole region at once, and records each of the box's blocks to segment from them exactly as the
per-block phase records a block (scratch chunk, then the record).  The labels are a function of
the box grid only, never of which rank did what or when.

Where it runs: on a rank whose model runs on a GPU (``--masks-during-flows auto``, the default),
in a CPU thread while the main thread keeps the GPU busy with the next boxes' flows; on a
CPU-only rank, in the main thread between boxes (both would share the same cores).  The thread
makes no MPI call; its error is reported by the main thread through the usual agreement.

The shells (the flow field's only trip through the file system):

A flow box (:mod:`mpicellpose.grid.boxes`) keeps its flow field in memory; what its neighbours'
mask steps read of it (the pieces of its core within the overlap of a shared face) goes to the
work directory::

    shells/<box // 1000>/<box>/<dz>_<dy>_<dx>.npy   one piece (half precision, channels first)
    shells/<box // 1000>/<box>/done                 written once every piece is durable
    shells/masked/<box // 1000>/<box>               the box's blocks are recorded

So no directory holds more than 1000 boxes, nor a box more than 26 pieces.  A piece is read
with a memory map: a neighbour reads only the part its mask region covers.  A box's shell is
deleted as soon as every neighbour that reads it has recorded its blocks (whichever rank sees
that first; two ranks deleting the same files is harmless), so the scratch the flow field
takes is a window that moves with the sweep through the volume, not the volume.
"""
from __future__ import annotations

import contextvars
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from ...cellpose import flowfield as ff
from ...grid import geometry as geo
from ...grid.boxes import flow_channels
from ..blocks import number_core, record_block
from ..faults import maybe_fault
from ..runlog import log

FANOUT = 1000


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name(direction) -> str:
    return "_".join(str(int(v)) for v in direction) + ".npy"


class ShellStore:
    """The shells of one run's work directory."""

    def __init__(self, root):
        self.root = Path(root)
        self.bytes_written = 0
        self.bytes_read = 0

    def dir(self, box: int) -> Path:
        return self.root / str(int(box) // FANOUT) / str(int(box))

    def done(self, box: int) -> bool:
        return (self.dir(box) / "done").exists()

    def masked_marker(self, box: int) -> Path:
        return self.root / "masked" / str(int(box) // FANOUT) / str(int(box))

    def write(self, box: int, field, core: geo.Box, pieces: dict) -> None:
        """The pieces of ``box`` (``field``: its flow field over ``core``, channels first), each
        durable, then the marker."""
        d = self.dir(box)
        d.mkdir(parents=True, exist_ok=True)
        origin = [a for a, _ in core]
        for direction, piece in pieces.items():
            path = d / _name(direction)
            part = np.ascontiguousarray(field[(slice(None),) + geo.box_slices(piece, origin)])
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, part)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)  # a resume rewrites a shell another rank may be reading: never truncated
            self.bytes_written += part.nbytes
        marker = d / "done"
        marker.touch()
        _fsync(d)

    def read_into(self, out, region: geo.Box, box: int, pieces: dict) -> None:
        """Copy the parts of ``box``'s pieces inside ``region`` into ``out`` (the array over ``region``)."""
        origin = [a for a, _ in region]
        for direction, piece in pieces.items():
            inter = geo.box_intersect(piece, region)
            if inter is None:
                continue
            part = np.load(self.dir(box) / _name(direction), mmap_mode="r")
            src = part[(slice(None),) + geo.box_slices(inter, [a for a, _ in piece])]
            out[(slice(None),) + geo.box_slices(inter, origin)] = src
            self.bytes_read += src.size * src.dtype.itemsize

    def mark_masked(self, box: int) -> None:
        path = self.masked_marker(box)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def is_masked(self, box: int) -> bool:
        return self.masked_marker(box).exists()

    def remove(self, box: int) -> bool:
        """Delete the shell of ``box`` (its marker first: a half-deleted shell is never read)."""
        d = self.dir(box)
        if not d.exists():
            return False
        try:
            (d / "done").unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(d, ignore_errors=True)
        return True

    def disk_bytes(self) -> int:
        """Bytes the shells take now (for the measured scratch peak)."""
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.stat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    pass
        return total


class ShellWriter:
    """Writes shells in a thread of its own (a GPU rank: the network does not wait for the file
    system), or at once (``threaded`` False).  An error is raised on the main thread at the next
    :meth:`write` or at :meth:`finish`."""

    def __init__(self, store: ShellStore, threaded: bool):
        self.store, self._pool, self._pending = store, None, []
        if threaded:
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mpicellpose-shells")

    def write(self, box, field, core, pieces) -> None:
        if self._pool is None:
            self.store.write(box, field, core, pieces)
            return
        self._raise_done()
        self._pending.append(self._pool.submit(self.store.write, box, field, core, pieces))

    def _raise_done(self) -> None:
        for fut in [f for f in self._pending if f.done()]:
            self._pending.remove(fut)
            fut.result()

    def finish(self, seconds: float = 600.0) -> None:
        """Wait for the shells still being written (at most ``seconds``), raising their error."""
        if self._pool is None:
            return
        try:
            for fut in list(self._pending):
                fut.result(timeout=seconds)
            self._pending.clear()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


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
        self.seconds, self.recorded = 0.0, 0
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
            maybe_fault("segment", self.ctx.box.rank, self.recorded)  # as the per-block phase counts
            self.recorded += 1
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
