import numpy as np
import pytest

from mpicellpose.grid import stitch as st


def test_renumber_core_first_appearance_and_drops_context_labels():
    lab = np.array([[9, 9, 0, 4], [3, 0, 4, 4], [7, 7, 7, 0]])
    loc, n = st.renumber_core(lab, (slice(0, 2), slice(0, 3)))
    assert n == 3
    assert loc.tolist() == [[1, 1, 0, 3], [2, 0, 3, 3], [0, 0, 0, 0]]
    # huge sparse label values go through the search path with the same result
    big = lab.astype(np.int64) * 10**12
    loc2, n2 = st.renumber_core(big, (slice(0, 2), slice(0, 3)))
    assert n2 == 3 and (loc2 == loc).all()


def test_block_stats():
    core = np.array([[1, 1, 0], [0, 2, 2], [0, 0, 2]], np.uint32)
    s = st.block_stats(core, 2, (10, 20))
    assert s["count"].tolist() == [2, 3]
    assert s["bbox_min"].tolist() == [[10, 20], [11, 21]]
    assert s["bbox_max"].tolist() == [[11, 22], [13, 23]]
    assert np.allclose(s["coord_sum"][1] / 3, [11 + 1 / 3, 21 + 2 / 3])


def test_touch_edges_shifts_follow_connectivity():
    a = np.array([[1, 0, 2, 0]]).reshape(1, 4)
    b = np.array([[0, 5, 0, 6]]).reshape(1, 4)
    assert st.touch_edges(a, b, (1, 0), 1).tolist() == []
    assert st.touch_edges(a, b, (1, 0), 2).tolist() == [[1, 5], [2, 5], [2, 6]]
    # a diagonal contact needs connectivity >= 2
    assert st.touch_edges(np.array([[3]]), np.array([[4]]), (1, 1), 1).tolist() == []
    assert st.touch_edges(np.array([[3]]), np.array([[4]]), (1, 1), 2).tolist() == [[3, 4]]


def test_iou_edges_match_cut_objects_not_touching_cells():
    # band of 4 rows: rows 0-1 are a's core, rows 2-3 b's core
    # object 1 of a continues as object 7 in b; cells 2 (a) and 8 (b) touch at the face only
    band_a = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 0, 0], [1, 1, 0, 0]])
    band_b = np.array([[7, 7, 0, 0], [7, 7, 0, 0], [7, 7, 8, 8], [7, 7, 8, 8]])
    assert st.iou_edges(band_a, band_b, 0.3).tolist() == [[1, 7]]


def test_iou_edges_one_to_one():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    b = np.array([5, 5, 5, 6, 6, 6, 6, 0])
    e = st.iou_edges(a, b, 0.1)
    assert len(e) == 1 and e[0, 0] == 1


def test_merge_and_final_ids():
    edges = np.array([[10, 3], [3, 7], [20, 21]])
    away, roots = st.merge_edges(edges)
    assert away.tolist() == [7, 10, 21] and roots.tolist() == [3, 3, 20]
    p = np.arange(1, 23)
    f = st.final_ids(p, away, roots)
    assert f[2] == f[6] == f[9] == 3
    assert f[19] == f[20]
    assert sorted(set(f.tolist())) == list(range(1, 22 - 3 + 1))
    # order of survivors is kept
    surv = [x for x in p if x not in (7, 10, 21)]
    assert (np.diff(st.final_ids(np.array(surv), away, roots)) == 1).all()
    lut = st.block_lut(5, 4, away, roots)
    assert lut.tolist() == [0] + st.final_ids(np.arange(6, 10), away, roots).tolist()


def test_merge_empty():
    away, roots = st.merge_edges(np.zeros((0, 2), np.int64))
    assert away.size == 0 and st.final_ids(np.array([4]), away, roots).tolist() == [4]


def test_offsets_and_dtype():
    assert st.offsets_from_counts([3, 0, 5, 1]).tolist() == [0, 3, 3, 8]
    assert st.label_dtype(2**32 - 1) == np.uint32
    assert st.label_dtype(2**32) == np.uint64


def test_reduce_pieces():
    ids = np.array([2, 1, 2, 3])
    out = st.reduce_pieces(ids, [5, 1, 7, 2], [[0, 5], [1, 1], [3, 0], [9, 9]], [[2, 8], [2, 2], [6, 4], [10, 10]],
                           [[1., 2.], [1., 1.], [3., 4.], [9., 9.]])
    assert out["id"].tolist() == [1, 2, 3]
    assert out["count"].tolist() == [1, 12, 2]
    assert out["bbox_min"][1].tolist() == [0, 0] and out["bbox_max"][1].tolist() == [6, 8]
    assert out["n_blocks"].tolist() == [1, 2, 1]


def test_record_views_read_once_and_dropped_after_last_use(tmp_path):
    """Stitching reads a block record's face views once and drops them after the announced uses,
    so a rank never holds all its records (memory set by the faces in flight, not the volume)."""
    from mpicellpose.runner.blocks import view_key as okey
    from mpicellpose.errors import InputError
    from mpicellpose.runner.phases.faces import RecordViews as _RecordViews
    from mpicellpose.runner.workdir import WorkDir

    paths = WorkDir(tmp_path)
    paths.record(0).parent.mkdir(parents=True)   # blocks/0/: records fanned out by 1000s
    for b in range(3):
        np.savez(paths.record(b), n=np.int64(1), **{okey((1, 0)): np.full((4, 4), b, np.uint32),
                                                    okey((-1, 0)): np.full((4, 4), 10 + b, np.uint32)})
    views = _RecordViews(paths, {0: 1, 1: 2, 2: 1})
    assert views.get(0, okey((1, 0)))[0, 0] == 0 and 0 not in views.cache   # one use: gone at once
    assert views.get(1, okey((-1, 0)))[0, 0] == 11 and 1 in views.cache     # one of two uses left
    paths.record(1).unlink()                                            # the second use is served from memory
    assert views.get(1, okey((1, 0)))[0, 0] == 1 and 1 not in views.cache
    assert views.nbytes == 0
    with pytest.raises(InputError, match="block 2 lacks the face view"):
        views.get(2, okey((0, 1)))
    paths.record(1).write_bytes(b"not a zip file")                      # a damaged record: clear error
    with pytest.raises(InputError, match="cannot read the face views of block 1"):
        _RecordViews(paths, {1: 1}).get(1, okey((1, 0)))
    tiny = _RecordViews(paths, {0: 5, 2: 5}, budget=1)                        # over budget: LRU drop
    tiny.get(0, okey((1, 0)))
    tiny.get(2, okey((1, 0)))
    assert list(tiny.cache) == [2]


def test_lut_from_merged_equals_block_lut():
    rng = np.random.default_rng(5)
    for _ in range(30):
        counts = rng.integers(0, 12, 9)
        offsets = st.offsets_from_counts(counts)
        n = int(counts.sum())
        edges = rng.integers(1, n + 1, (rng.integers(0, 2 * n + 1), 2)) if n else np.zeros((0, 2), np.int64)
        away, roots = st.merge_edges(edges)
        before = st.offsets_from_counts(np.bincount(st.block_of(away, offsets), minlength=counts.size))
        fin = st.final_ids(roots, away, roots)
        for b in range(counts.size):
            lo, hi = np.searchsorted(away, [offsets[b] + 1, offsets[b] + counts[b] + 1])
            got = st.lut_from_merged(int(offsets[b]), int(counts[b]), int(before[b]), away[lo:hi], fin[lo:hi])
            assert got.tolist() == st.block_lut(int(offsets[b]), int(counts[b]), away, roots).tolist()


def test_split_rows_keeps_order():
    parts = st.split_rows(np.array([2, 0, 2, 1, 0]), 4, np.array([10, 11, 12, 13, 14]))
    assert [p[0].tolist() for p in parts] == [[11, 14], [13], [10, 12], []]
