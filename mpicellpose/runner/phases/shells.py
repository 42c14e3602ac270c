"""The flow field's only trip through the file system under ``--pipeline flows``: the *shells*.

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

import os
import shutil
from pathlib import Path

import numpy as np

from ...grid import geometry as geo

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
            with open(path, "wb") as fh:
                np.save(fh, part)
                fh.flush()
                os.fsync(fh.fileno())
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
