"""The block loop of a per-block phase (segmentation, flows): this rank's blocks, handed out at
run time or fixed, each block's input read ahead in a thread while the one before is worked on
(``--read-ahead``), an error told to the other ranks at once and returned to be agreed on."""
from __future__ import annotations

import contextvars
import threading
import time

from ... import comm as mpi
from ...grid import geometry as geo
from ..blocks import gpu_rank_wants
from ..runlog import log
from ..signals import StopNow


def read_ahead_wanted(options, backend) -> bool:
    """``--read-ahead`` for this rank: auto is on for a rank whose model runs on a GPU."""
    return gpu_rank_wants(getattr(options, "read_ahead", "auto"), backend)


def run_blocks(ctx, grid, shares, label, progress, work, block_error, load=None):
    """The block loop of a per-block phase (segmentation, flows): this rank's share of ``shares``
    (units of ``grid``), or, with the plan's dynamic hand-out, blocks handed out at run time
    (:class:`mpicellpose.comm.Handout`; every rank enters it, with or without blocks).  ``work(blk, done, get,
    tick)`` does one block and may return a count (``tick(f)``: the share ``f`` of the block done so far, for
    the progress display of long units); a block stopped
    by a signal is not counted (a resume redoes it); an error is logged, told to the other ranks and
    returned (``block_error(exc, blk)`` names the block).  Returns (error or None, sum of the counts).

    ``load(blk)`` (optional, ``--read-ahead``): the block's input, read in a thread while the block
    before it is worked on; ``get()`` then returns it (or raises the read's error) and is None
    without ``load``."""
    box, stop, dynamic = ctx.box, ctx.stop, ctx.plan.handout == "dynamic"
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
                size = geo.box_size(blk.read)

                def tick(f, done=done, vox=vox, size=size):
                    f = min(max(float(f), 0.0), 0.99)
                    box.send_progress(done + f, total, 0.0, work=(vox + f * size, (1.0 - f) * size))
                    progress()
                try:
                    counted += work(blk, done, get, tick) or 0
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
    it = iter(blocks)
    nxt = next(it, None)
    fut = _Read(load, grid.block(nxt)) if nxt is not None else None
    try:
        while nxt is not None:
            blk, cur = grid.block(nxt), fut
            nxt = next(it, None)
            fut = _Read(load, grid.block(nxt), after=cur) if nxt is not None else None
            yield blk, cur.result
    finally:
        if fut is not None:
            fut.wait(READ_JOIN_SECONDS)


READ_JOIN_SECONDS = 60.0   # at the end, how long a read still running is waited for (then left behind)


class _Read:
    """One block's input, read in a daemon thread (a read stuck in a hung file system never keeps the
    process alive: it is waited for at most ``READ_JOIN_SECONDS`` at the end, and by :meth:`result`
    in steps short enough for signals to be handled meanwhile)."""

    def __init__(self, load, blk, after=None):
        self.value, self.error = None, None   # ``after``: the read before, which this one waits for (one at a time)
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run, load, blk, after),
                                       name="mpicellpose-read", daemon=True)
        self.thread.start()

    def _run(self, load, blk, after):
        if after is not None:
            after.thread.join()
        try:
            self.value = load(blk)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by result()
            self.error = exc

    def wait(self, seconds):
        self.thread.join(seconds)
        if self.thread.is_alive():
            log.warning("a read-ahead of the next block did not end within %.0f s; left behind", seconds)

    def result(self):
        while self.thread.is_alive():
            self.thread.join(0.5)
        if self.error is not None:
            raise self.error
        return self.value
