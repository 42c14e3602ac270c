"""The distributed merge (issue 13) gives exactly the single-rank union-find's IDs.

The merge runs on N threads standing in for N ranks (a barrier-based stand-in of the
gateway's labelled collectives that also checks every rank is at the same step), with the
gateway's own chunked ``alltoall_arrays``; many random edge graphs, long chains across many
blocks, components spanning every rank's range, tiny message budgets (many rounds)."""
from __future__ import annotations

import contextlib
import functools
import operator
import threading

import numpy as np
import pytest

from mpicellpose.grid import stitch as st
from mpicellpose.comm.mailbox import Mailbox
from mpicellpose.runner.phases import merge as mg
from mpicellpose.runner.phases.faces import Edges


class _Hub:
    def __init__(self, n):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots = [None] * n
        self.calls = [0] * n


class FakeBox:
    """One rank of a thread 'job': the collectives merge() uses, with Mailbox.alltoall_arrays."""

    alltoall_arrays = Mailbox.alltoall_arrays
    largest_message = 0

    def __init__(self, hub, rank, budget):
        self.hub, self.rank, self.size = hub, rank, hub.n
        self.MESSAGE_BYTES = budget

    def _swap(self, obj, label):
        h = self.hub
        h.slots[self.rank] = (label, obj)
        h.calls[self.rank] += 1
        h.barrier.wait()
        got = list(h.slots)
        h.barrier.wait()
        labels = {lab for lab, _ in got}
        assert len(labels) == 1, f"ranks at different steps: {labels}"
        return [o for _, o in got]

    def alltoall(self, per_dest, label):
        assert len(per_dest) == self.size
        return [row[self.rank] for row in self._swap(per_dest, label)]

    # the gateway's arrival and data steps, which alltoall_arrays is built on
    def _enter(self, label, state=0, progress=None, largest=None):
        got = self._swap(largest, label)
        return state if largest is None else (state, max(got))

    def _alltoall_data(self, per_dest, label):
        return self.alltoall(per_dest, label)

    def _sum_data(self, arr, label):
        return functools.reduce(operator.add, self._swap(arr, label))

    def allgather(self, obj, label):
        return self._swap(obj, label)

    def allreduce_sum(self, value, label):
        return functools.reduce(operator.add, self._swap(value, label))

    @contextlib.contextmanager
    def step(self, where):
        yield


def run_threads(size, per_rank_edges, counts, offsets, owners, budget=1 << 20):
    hub = _Hub(size)
    out, errors = [None] * size, []

    def work(r):
        try:
            box = FakeBox(hub, r, budget)
            out[r] = mg.merge(box, Edges(per_rank_edges[r], 0), counts, offsets, owners[r])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((r, exc))
            hub.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0][1]
    assert len(set(hub.calls)) == 1
    return out


def random_case(rng, n_blocks, max_count, n_edges, chains):
    counts = rng.integers(0, max_count + 1, n_blocks)
    counts[rng.random(n_blocks) < 0.2] = 0
    offsets = st.offsets_from_counts(counts)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return counts, offsets, np.zeros((0, 2), np.int64)

    def pick(blocks):
        return offsets[blocks] + 1 + (rng.random(blocks.size) * counts[blocks]).astype(np.int64)

    edges = []
    # neighbouring blocks' labels (a face), and some anywhere
    a = rng.choice(nz, n_edges)
    j = np.clip(np.searchsorted(nz, a) + rng.integers(1, 3, n_edges), 0, nz.size - 1)
    edges.append(np.stack([pick(a), pick(nz[j])], 1))
    b = rng.choice(nz, max(1, n_edges // 10))
    edges.append(np.stack([pick(b), pick(rng.choice(nz, b.size))], 1))
    # long chains through many blocks, in either direction and any order
    for _ in range(chains):
        path = nz if rng.random() < 0.5 else nz[::-1]
        path = path[rng.random(path.size) < 0.8]
        if path.size > 1:
            ids = pick(path)
            edges.append(np.stack([ids[:-1], ids[1:]], 1)[rng.permutation(ids.size - 1)])
    e = np.concatenate(edges)
    e = e[e[:, 0] != e[:, 1]]
    flip = rng.random(len(e)) < 0.5
    e[flip] = e[flip][:, ::-1]
    dup = e[rng.random(len(e)) < 0.1]
    return counts, offsets, np.concatenate([e, dup])


def owners_for(rng, n_blocks, size, contiguous):
    if contiguous:
        cuts = np.sort(rng.integers(0, n_blocks + 1, size - 1))
        return [list(range(lo, hi)) for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n_blocks])]
    who = rng.integers(0, size, n_blocks)
    return [list(np.flatnonzero(who == r)) for r in range(size)]


def check(size, counts, offsets, edges, owners, rng, budget=1 << 20):
    away, roots = st.merge_edges(edges)   # the single-rank union-find
    n_obj = int(counts.sum()) - away.size
    dtype = st.label_dtype(n_obj)
    where = rng.integers(0, size, len(edges))   # any rank may have found any edge
    per_rank = [edges[where == r] for r in range(size)]
    got = run_threads(size, per_rank, counts, offsets, owners, budget)
    for r, m in enumerate(got):
        assert m.n_merged == away.size and m.n_objects == n_obj and m.n_edges == len(edges)
        assert m.n_merged == away.size
        for b in owners[r]:
            want = st.block_lut(int(offsets[b]), int(counts[b]), away, roots, dtype)
            lut = m.lut(b)
            assert lut.dtype == want.dtype and lut.tobytes() == want.tobytes(), (size, r, b)
    return got


@pytest.mark.parametrize("seed", range(40))
def test_same_ids_as_single_rank_union_find(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.choice([1, 2, 3, 4, 7]))
    n_blocks = int(rng.integers(1, 60))
    counts, offsets, edges = random_case(rng, n_blocks, int(rng.integers(1, 40)), int(rng.integers(0, 300)),
                                         int(rng.integers(0, 4)))
    owners = owners_for(rng, n_blocks, size, contiguous=seed % 3 != 0)
    budget = int(rng.choice([64, 1000, 1 << 20]))   # 64 bytes: a round per handful of rows
    check(size, counts, offsets, edges, owners, rng, budget)


def test_one_chain_through_every_block_and_range():
    rng = np.random.default_rng(123)
    n_blocks, size = 200, 5
    counts = np.full(n_blocks, 3, np.int64)
    offsets = st.offsets_from_counts(counts)
    ids = offsets + 2   # label 2 of every block, linked b -> b + 1 in a shuffled order
    edges = np.stack([ids[1:], ids[:-1]], 1)[rng.permutation(n_blocks - 1)]
    owners = owners_for(rng, n_blocks, size, contiguous=True)
    got = check(size, counts, offsets, edges, owners, rng, budget=200)
    assert got[0].n_merged == n_blocks - 1


def test_empty_and_edgeless():
    rng = np.random.default_rng(0)
    for counts in (np.zeros(4, np.int64), np.array([3, 0, 2], np.int64)):
        check(3, counts, st.offsets_from_counts(counts), np.zeros((0, 2), np.int64),
              owners_for(rng, counts.size, 3, True), rng)


def test_lut_only_for_own_blocks():
    counts = np.array([2, 2], np.int64)
    (m,) = run_threads(1, [np.array([[1, 3]])], counts, st.offsets_from_counts(counts), [[0]])
    assert m.lut(0).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="not one of this rank's blocks"):
        m.lut(1)


def test_id_bounds_follow_block_owners():
    counts = np.array([2, 0, 3, 1], np.int64)
    offsets = st.offsets_from_counts(counts)
    b = st.id_bounds(counts, offsets, np.array([0, 0, 2, 2]), 3)
    assert b.tolist() == [1, 3, 3, 7]   # rank 1 owns no block, hence no ID
    assert st.id_owner(np.arange(1, 7), b).tolist() == [0, 0, 2, 2, 2, 2]
    assert st.block_of(np.arange(1, 7), offsets).tolist() == [0, 0, 2, 2, 2, 3]
