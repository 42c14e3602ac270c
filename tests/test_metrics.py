"""Object matching and label equivalence on constructed cases."""
from __future__ import annotations

import time

import numpy as np
import pytest

from mpicellpose.synthetic.metrics import contingency, equivalence_report, label_equivalent, match_objects


def blocks2d():
    """Four 10x10 squares on a 40x40 canvas, labels 1..4."""
    lab = np.zeros((40, 40), np.uint32)
    lab[2:12, 2:12] = 1
    lab[2:12, 20:30] = 2
    lab[20:30, 2:12] = 3
    lab[20:30, 20:30] = 4
    return lab


def test_perfect_match_with_other_numbering():
    gt = blocks2d()
    pred = np.where(gt > 0, 100 - gt.astype(np.int64), 0)
    r = match_objects(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (4, 0, 0)
    assert r["f1"] == r["precision"] == r["recall"] == 1.0
    assert r["mean_matched_iou"] == 1.0


def test_split_object():
    gt = blocks2d()
    pred = gt.copy()
    pred[2:12, 2:6] = 8  # object 1 cut in three: no piece has IoU >= 0.5
    pred[2:12, 6:9] = 9
    r = match_objects(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 3, 1)
    assert r["f1"] == pytest.approx(6 / 10)
    # a small bite keeps the match: IoU 0.8
    pred = gt.copy()
    pred[2:12, 2:4] = 9
    r = match_objects(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (4, 1, 0)


def test_merged_pair():
    gt = np.zeros((20, 40), np.uint32)
    gt[5:15, 5:15] = 1
    gt[5:15, 15:25] = 2  # touching neighbours
    pred = (gt > 0).astype(np.uint32)  # merged into one
    r = match_objects(pred, gt)
    # IoU of the merge with either object is exactly 0.5: matched at 0.5...
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1)
    # ... but not above
    r = match_objects(pred, gt, iou_threshold=0.51)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 2)


def test_shifted_labels_lower_iou():
    gt = blocks2d()
    pred = np.roll(gt, 3, axis=1)  # IoU 7/13 ~ 0.54
    r = match_objects(pred, gt)
    assert r["tp"] == 4 and r["mean_matched_iou"] == pytest.approx(7 / 13)
    r = match_objects(pred, gt, iou_threshold=0.6)
    assert r["tp"] == 0 and r["fp"] == 4 and r["fn"] == 4 and r["f1"] == 0.0


def test_low_threshold_uses_one_to_one_assignment():
    gt = np.zeros((10, 30), np.uint32)
    gt[:, 0:10] = 1
    gt[:, 10:20] = 2
    pred = np.zeros_like(gt)
    pred[:, 3:17] = 5  # IoU 0.41 with 1, 0.41 with 2 ... one of them only
    pred[:, 17:20] = 6  # IoU 0.3 with 2
    r = match_objects(pred, gt, iou_threshold=0.25)
    # the maximum matching pairs 5 with 1 and 6 with 2
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)
    r = match_objects(pred, gt, iou_threshold=0.35)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)


def test_empty_inputs():
    z = np.zeros((8, 8), np.uint16)
    assert match_objects(z, z)["f1"] == 1.0
    gt = blocks2d()
    r = match_objects(np.zeros_like(gt), gt)
    assert (r["tp"], r["fp"], r["fn"], r["f1"], r["recall"]) == (0, 0, 4, 0.0, 0.0)
    r = match_objects(gt, np.zeros_like(gt))
    assert (r["tp"], r["fp"], r["fn"], r["f1"], r["precision"]) == (0, 4, 0, 0.0, 0.0)
    assert label_equivalent(z, z)


def test_input_checks():
    with pytest.raises(ValueError):
        match_objects(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError):
        match_objects(np.zeros((4, 4), int), np.zeros((4, 4), int), iou_threshold=0)
    with pytest.raises(TypeError):
        match_objects(np.zeros((4, 4)), np.zeros((4, 4), int))


def test_contingency_counts():
    a = np.array([[1, 1, 0, 3], [1, 2, 2, 3]])
    b = np.array([[7, 7, 7, 0], [8, 8, 8, 0]])
    t = contingency(a, b)
    pairs = {(int(t["a_labels"][i]), int(t["b_labels"][j])): int(c)
             for i, j, c in zip(t["pair_a"], t["pair_b"], t["pair_count"])}
    assert pairs == {(1, 7): 2, (1, 8): 1, (2, 8): 2}
    assert t["a_only"] == 2 and t["b_only"] == 1


def test_label_equivalent_permuted_and_huge_ids():
    gt = blocks2d()
    lut = np.array([0, 4_000_000_000, 17, 2**40, 5], dtype=np.uint64)
    assert label_equivalent(lut[gt], gt)
    assert "equivalent" in equivalence_report(lut[gt], gt)
    assert not equivalence_report(lut[gt], gt).startswith("not")


def test_label_equivalent_negative_cases():
    gt = blocks2d()
    split = gt.copy()
    split[2:12, 2:7] = 9
    assert not label_equivalent(split, gt)
    assert "b=1 <- a=[1, 9] (overlaps [50, 50] voxels)" in equivalence_report(split, gt)
    assert "a=1 -> b=[1, 9]" in equivalence_report(gt, split)
    merged = gt.copy()
    merged[merged == 2] = 1
    assert not label_equivalent(merged, gt)
    rep = equivalence_report(merged, gt)
    assert "split: 1 label(s) of a" in rep and "a=1 -> b=[1, 2]" in rep
    rep = equivalence_report(gt, merged)
    assert "merged: 1 label(s) of b" in rep and "b=1 <- a=[1, 2]" in rep
    grown = gt.copy()
    grown[12, 2:12] = 1  # same partition otherwise, one more row of foreground
    assert not label_equivalent(grown, gt)
    assert "foreground only in a: 10 voxels, first at (12, 2)" in equivalence_report(grown, gt)
    assert not label_equivalent(gt[:, :39], gt)
    assert "shape" in equivalence_report(gt[:, :39], gt)
    # same foreground, swapped pieces between objects
    swap = gt.copy()
    swap[2:4, 2:12] = 2
    assert not label_equivalent(swap, gt)


def test_large_volume_is_fast():
    rng = np.random.default_rng(0)
    # ~3000 cubes of 8^3 on a 128^3 grid with random labels
    ids = rng.permutation(np.arange(1, 16 ** 3 + 1)).reshape(16, 16, 16).astype(np.uint32)
    gt = np.kron(ids, np.ones((8, 8, 8), np.uint32))
    gt[gt % 4 == 0] = 0
    pred = np.roll(gt, 1, axis=0)
    t = time.perf_counter()
    r = match_objects(pred, gt)
    assert label_equivalent(gt * 3, gt)
    dt = time.perf_counter() - t
    assert r["tp"] == r["n_gt"] == 3072  # IoU 7/9
    assert dt < 5, dt


def test_seam_report_counts_splits_merges_and_fragments():
    from mpicellpose.tools.demo import seam_report

    gt = np.zeros((8, 16), np.int32)
    gt[2:6, 4:12] = 1          # cut by the face at x = 8 (blocks of 8 along x)
    gt[2:6, 13:15] = 2         # inside block 1
    pred = gt.copy()
    r = seam_report(pred, gt, (8, 8))
    assert r == {"cut": 1, "rejoined": 1, "seam_splits": 0, "seam_merges": 0, "seam_fragments": 0}
    sliver = pred.copy()
    sliver[2:4, 8] = 3         # a 2-voxel piece of object 1 on the face, left as its own label
    r = seam_report(sliver, gt, (8, 8))
    assert (r["seam_fragments"], r["rejoined"], r["seam_splits"]) == (1, 1, 0)
    far = pred.copy()
    far[7, 0] = 4              # a false positive away from every face is not a seam fragment
    assert seam_report(far, gt, (8, 8))["seam_fragments"] == 0
    split = pred.copy()
    split[2:6, 8:12] = 5       # object 1 left in two halves
    assert seam_report(split, gt, (8, 8))["seam_splits"] == 1
    merged = pred.copy()
    merged[2:6, 12:15] = 1     # objects 1 and 2 joined across the face
    assert seam_report(merged, gt, (8, 8))["seam_merges"] == 1
