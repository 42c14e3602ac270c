"""The data steps of the gateway's collectives (issue 13), mixed into :class:`.mailbox.Mailbox`.

Every collective starts with the labelled arrival (``Mailbox._enter``); its data then moves in
non-blocking MPI calls waited for like the arrival (``Mailbox.wait``: tested, with a short sleep
between tests), never in a blocking one: in MPICH a rank blocked in a collective spins on its
core, and the ranks still on their way to it (woken from their sleep in the arrival) may share
that core.  Objects travel pickled, as mpi4py would send them.  ``alltoall_arrays`` moves rows
of numpy arrays in rounds of bounded size.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from .world import _mpi

INLINE_BYTES = 1016  # a bcast/allgather of objects pickled to at most this many bytes is one collective


class DataSteps:
    """Collectives on ``self.comm`` after ``self._enter(label)``, waited for by ``self.wait``."""

    def bcast(self, obj, label: str, root: int = 0):
        self._enter(label)
        if self.size == 1:
            return self.comm.bcast(obj, root=root)
        MPI = _mpi()
        head = np.zeros(INLINE_BYTES + 8, np.uint8)   # the length, then the start of the pickle
        data = None
        if self.rank == root:
            data = np.frombuffer(_pickle(obj), np.uint8)
            head[:8] = np.array([data.size], np.int64).view(np.uint8)
            head[8:8 + min(data.size, INLINE_BYTES)] = data[:INLINE_BYTES]
        self.wait(self.comm.Ibcast([head, MPI.BYTE], root=root), label)
        n = int(head[:8].view(np.int64)[0])
        if n <= INLINE_BYTES:   # small (most results): one broadcast
            return pickle.loads(head[8:8 + n])
        rest = np.ascontiguousarray(data[INLINE_BYTES:]) if data is not None else np.empty(n - INLINE_BYTES, np.uint8)
        self.wait(self.comm.Ibcast([rest, MPI.BYTE], root=root), label)
        return pickle.loads(np.concatenate([head[8:], rest]))

    def allgather(self, obj, label: str) -> list:
        self._enter(label)
        if self.size == 1:
            return self.comm.allgather(obj)
        MPI = _mpi()
        data = np.frombuffer(_pickle(obj), np.uint8)
        slot = np.zeros(INLINE_BYTES + 8, np.uint8)   # every rank: its length, then the start of its pickle
        slot[:8] = np.array([data.size], np.int64).view(np.uint8)
        slot[8:8 + min(data.size, INLINE_BYTES)] = data[:INLINE_BYTES]
        slots = np.empty((self.size, slot.size), np.uint8)
        self.wait(self.comm.Iallgather([slot, MPI.BYTE], [slots, MPI.BYTE]), label)
        sizes = slots[:, :8].copy().view(np.int64).ravel()
        if sizes.max() <= INLINE_BYTES:   # all small: one collective
            return [pickle.loads(slots[r, 8:8 + n]) for r, n in enumerate(sizes.tolist())]
        rest = np.maximum(sizes - INLINE_BYTES, 0)
        displs = _displacements(rest)
        buf = np.empty(int(rest.sum()), np.uint8)
        mine = np.ascontiguousarray(data[INLINE_BYTES:])
        self.wait(self.comm.Iallgatherv([mine, MPI.BYTE], [buf, (rest, displs), MPI.BYTE]), label)
        return [pickle.loads(np.concatenate([slots[r, 8:8 + min(n, INLINE_BYTES)], buf[d:d + m]]))
                for r, (n, d, m) in enumerate(zip(sizes.tolist(), displs.tolist(), rest.tolist()))]

    def alltoall(self, per_dest: list, label: str) -> list:
        """Send ``per_dest[r]`` to rank r; return the list received from every rank (this
        rank's own entry is ``per_dest[rank]`` itself, not a copy)."""
        self._enter(label)
        if self.size == 1:
            return list(per_dest)
        return self._alltoall_data(per_dest, label)

    def _alltoall_data(self, per_dest: list, label: str) -> list:
        """The data of an alltoall (after the arrival): the sizes, then the pickled objects."""
        MPI = _mpi()
        data = [b"" if r == self.rank else _pickle(o) for r, o in enumerate(per_dest)]
        sent = np.array([len(d) for d in data], np.int64)
        counts = np.empty(self.size, np.int64)
        self.wait(self.comm.Ialltoall(sent, counts), label)
        sbuf = np.frombuffer(b"".join(data), np.uint8)
        del data
        buf = np.empty(int(counts.sum()), np.uint8)
        displs = _displacements(counts)
        self.wait(self.comm.Ialltoallv([sbuf, (sent, _displacements(sent)), MPI.BYTE],
                                       [buf, (counts, displs), MPI.BYTE]), label)
        del sbuf
        return [per_dest[r] if r == self.rank else pickle.loads(buf[d:d + c])
                for r, (d, c) in enumerate(zip(displs, counts))]

    def allreduce_sum(self, value, label: str):
        self._enter(label)
        if self.size == 1:
            return value
        arr = _numeric(value)
        if arr is None:   # not a number nor a numeric array: mpi4py's pickled reduction
            return self.comm.allreduce(value)
        out = self._sum_data(arr, label)
        return out if isinstance(value, np.ndarray) else out[0].item()

    def _sum_data(self, arr, label: str):
        """The data of a sum (after the arrival): a numeric array summed over the ranks."""
        out = np.empty_like(arr)
        self.wait(self.comm.Iallreduce(arr, out, op=_mpi().SUM), label)
        return out

    # -- bounded exchanges (issue 13) ------------------------------------------------
    MESSAGE_BYTES = 64 << 20  # per rank and round of alltoall_arrays ($MPICELLPOSE_MESSAGE_BYTES)
    largest_message = 0       # bytes: the largest payload this rank sent to one rank in alltoall_arrays
    last_rounds = 0           # rounds of the last alltoall_arrays (0: nothing was sent by any rank)

    def exscan_sum(self, value: int, label: str) -> tuple:
        """``(sum of value over the ranks before this one, sum over all ranks)``: two reductions, no gather."""
        self._enter(label)
        if self.size == 1:
            return 0, value
        mine = np.array([int(value)], np.int64)
        before, total = np.zeros(1, np.int64), np.zeros(1, np.int64)
        MPI = _mpi()
        reqs = [self.comm.Iexscan(mine, before, op=MPI.SUM), self.comm.Iallreduce(mine, total, op=MPI.SUM)]
        for req in reqs:
            self.wait(req, label)
        return (int(before[0]) if self.rank else 0), int(total[0])

    def alltoall_arrays(self, per_dest: list, label: str, budget: int | None = None,
                        rounds: int | None = None, arrive: bool = True) -> list:
        """Send ``per_dest[r]`` (a tuple of numpy arrays of equal length: rows) to rank r and
        return, per source rank, the tuple of arrays it sent (dtype and trailing shape kept).

        Sent in R agreed rounds, each dest getting a 1/R share of its rows per round, so that
        no rank sends or receives much more than ``budget`` bytes in one round (nor any single
        message): R = ceil(max over ranks of bytes sent or received / budget).  One labelled
        arrival for the whole exchange, which also finds the largest total S one rank sends:
        when ranks x S fits the budget, R = 1 (0 when S = 0) with no plan; else one reduction
        of a 2 x ranks vector plans the rounds (no rank gathers anything from all others);
        ``rounds`` skips it when the caller knows R (a reply of the same shape as the request
        it answers).  R = 0 when no rank sends anything: then nothing is exchanged.  The R used
        is left in ``self.last_rounds``.  ``arrive=False`` (with ``rounds``) skips the labelled
        arrival too: for a reply that every rank sends right after the request it answers."""
        budget = budget or int(os.environ.get("MPICELLPOSE_MESSAGE_BYTES") or self.MESSAGE_BYTES)
        per_dest = [tuple(np.asarray(a) for a in p) for p in per_dest]
        nbytes = np.array([sum(a.nbytes for a in p) for p in per_dest], np.int64)
        if self.size == 1:
            self.last_rounds = int(nbytes.sum() > 0)
            return per_dest
        # one arrival for the whole exchange: the plan and the rounds follow in lockstep.  It
        # carries the largest total any rank sends: when even all ranks' sends to one rank fit
        # the budget, one round is enough and no plan is needed
        if rounds is None:
            _, most = self._enter(label, largest=int(nbytes.sum()))
            if most * self.size <= budget:
                rounds = int(most > 0)
        elif arrive:
            self._enter(label)
        if rounds is None:
            plan = np.zeros(2 * self.size, np.int64)
            plan[:self.size] = nbytes
            plan[self.size + self.rank] = nbytes.sum()
            total = self._sum_data(plan, f"{label} (sizes)")   # bytes received by, and sent by, every rank
            rounds = -(-int(total.max()) // max(1, budget))
        self.last_rounds = rounds
        if rounds == 0:
            return [tuple(a[:0] for a in per_dest[self.rank]) for _ in range(self.size)]
        rows = [len(p[0]) if p else 0 for p in per_dest]
        got = [[] for _ in range(self.size)]
        for k in range(rounds):
            out = [tuple(a[n * k // rounds: n * (k + 1) // rounds] for a in p) for p, n in zip(per_dest, rows)]
            biggest = max(sum(a.nbytes for a in p) for i, p in enumerate(out) if i != self.rank)
            self.largest_message = max(self.largest_message, int(biggest))
            step = label if rounds == 1 else f"{label} ({k + 1}/{rounds})"
            for src, part in enumerate(self._alltoall_data(out, step)):
                got[src].append(part)
        return [tuple(np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))) if chunks[0] else ()
                for chunks in got]


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _displacements(counts):
    out = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=out[1:])
    return out


def _numeric(value):
    """``value`` as a numpy array MPI can sum in place (a Python or numpy number: shape (1,)), or
    None (booleans, objects: summed by mpi4py's pickled reduction)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        v = int(value)
        return np.array([v], np.int64) if -2**63 <= v < 2**63 else None
    if isinstance(value, (float, np.floating)):
        return np.array([value], np.float64)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return np.ascontiguousarray(value)
    return None
