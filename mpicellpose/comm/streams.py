"""Streamed point-to-point exchange between neighbouring ranks (bounded messages)."""
from __future__ import annotations

import time

from .world import _sleep_until

TAG_EXCHANGE = 73

def _flag_last(items):
    """(is_last, item) for each item; an empty iterable still gives one (True, None)."""
    it = iter(items)
    prev = next(it, _END)
    if prev is _END:
        yield True, None
        return
    while True:
        cur = next(it, _END)
        yield cur is _END, prev
        if cur is _END:
            return
        prev = cur


_END = object()


def exchange(comm, outgoing: dict, sources, on_receive, *, tag: int = TAG_EXCHANGE, idle=None) -> None:
    """Point-to-point exchange between neighbours, streamed in bounded messages.

    Parameters
    ----------
    outgoing : dict rank -> iterable of objects
        The messages for each destination rank (never self), produced lazily: the next one is
        produced only when the previous send to that rank has completed, so a rank holds at most one
        message per destination at a time.  Every destination gets at least one message (an
        empty iterable sends ``None``).
    sources : iterable of int
        Ranks this rank expects messages from (known from the pure geometry).
    on_receive : callable(src, obj)
        Called for every message received, in order per source; ``None`` messages are skipped.
        It must not raise (record errors and agree on them afterwards): every rank has to see
        the exchange through.
    idle : callable, optional
        Called whenever nothing moved (e.g. to honour a stop request).
    """
    sources = sorted(set(int(s) for s in sources))
    if comm.Get_size() == 1:
        for _ in outgoing.values():
            pass
        return
    streams = {int(d): _flag_last(items) for d, items in sorted(outgoing.items())}
    reqs = {}
    pending = set(sources)
    delay = 0.001
    while streams or pending:
        progressed = False
        for dest in list(streams):
            req = reqs.get(dest)
            if req is not None:
                if not req.Test():
                    continue
                del reqs[dest]
            step = next(streams[dest], None)
            if step is None:
                del streams[dest]
                continue
            reqs[dest] = comm.isend(step, dest=dest, tag=tag)
            progressed = True
        for src in sorted(pending):
            if comm.iprobe(source=src, tag=tag):
                last, obj = comm.recv(source=src, tag=tag)
                if obj is not None:
                    on_receive(src, obj)
                if last:
                    pending.discard(src)
                progressed = True
        if progressed:
            delay = 0.001
        else:
            if idle is not None:
                idle()
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)
    for req in reqs.values():
        _sleep_until(req.Test)
