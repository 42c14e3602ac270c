"""Behaviour the reference gets wrong (ANCHOR.md 'Where it breaks'), plus API contracts."""
import copy
import time

import numpy as np
import pytest
import zarr
from scipy import ndimage

import cases
from conftest import ROOT
from mpicellpose import distributed_eval, numpy_array_to_zarr, process_block
from mpicellpose.errors import ConfigError, InputError
from mpicellpose.synthetic.metrics import equivalence_report, label_equivalent
from segmenters import Identity


def touching_cells_volume():
    """Ground-truth labels: boxes cut by the face at x=16, and two distinct cells
    (3 and 4) touching face to face exactly across that face."""
    gt = np.zeros((20, 24, 32), np.uint32)
    gt[2:9, 2:10, 10:22] = 1      # cut by the face at x = 16
    gt[11:18, 3:9, 14:17] = 2     # small cap: only one voxel column beyond the face
    gt[2:10, 13:21, 8:16] = 3     # ends exactly at the face ...
    gt[2:10, 13:21, 16:25] = 4    # ... and 4 starts there: touching, distinct
    gt[12:19, 12:22, 20:30] = 5   # entirely inside the second block
    return gt


def test_iou_joins_cut_objects_and_keeps_touching_cells_apart(tmp_path):
    gt = touching_cells_volume()
    lab, _ = distributed_eval(gt, (20, 24, 16), tmp_path / "iou.zarr", backend=Identity(), stitch="iou", overlap=4)
    got = lab[...]
    assert label_equivalent(got, gt), equivalence_report(got, gt)
    # the reference's rule (touch) merges the two distinct cells 3 and 4
    lab, _ = distributed_eval(gt, (20, 24, 16), tmp_path / "touch.zarr", backend=Identity(), stitch="touch", overlap=4)
    got = lab[...]
    assert got.max() == 4 and got[5, 15, 12] == got[5, 15, 20]


@pytest.mark.parametrize("blocksize,overlap", [((5, 7, 6), (9, 9, 12)), ((3, 4, 5), (7, 1, 11)), ((20, 24, 10), 6)])
def test_overlap_larger_than_block(tmp_path, blocksize, overlap):
    gt = touching_cells_volume()
    lab, _ = distributed_eval(gt, blocksize, tmp_path / "o.zarr", backend=Identity(), stitch="iou", overlap=overlap,
                              iou_depth=12)
    assert label_equivalent(lab[...], gt), equivalence_report(lab[...], gt)


def test_more_than_99999_labels_in_one_block(tmp_path):
    img = np.zeros((700, 700), np.uint8)
    img[::2, ::2] = 200  # 122,500 isolated pixels
    lab, boxes = distributed_eval(img, (700, 350), tmp_path / "many.zarr", backend="threshold",
                                  backend_kwargs={"threshold": 100})
    got = lab[...]
    assert got.max() == 350 * 350 == len(boxes)
    assert len(np.unique(got)) == 350 * 350 + 1
    assert label_equivalent(got, ndimage.label(img > 100)[0])


def test_channel_axis_is_not_spatial(tmp_path):
    img = cases.blobs((20, 30, 26), 11)
    multi = np.stack([img, 255 - img], axis=0)  # (C, Z, Y, X)
    lab, _ = distributed_eval(multi, 8, tmp_path / "c.zarr", backend="threshold",
                              backend_kwargs={"threshold": 100, "channel": 0}, channel_axis=0)
    assert lab.shape == img.shape
    assert label_equivalent(lab[...], ndimage.label(img > 100)[0])
    # eval_kwargs['channel_axis'] (the reference's spelling) works the same
    lab2, _ = distributed_eval(np.moveaxis(multi, 0, -1), 8, tmp_path / "c2.zarr", backend="threshold",
                               backend_kwargs={"threshold": 100}, eval_kwargs={"channel_axis": 3})
    assert np.array_equal(lab2[...], lab[...])


def test_caller_arguments_are_not_mutated(tmp_path):
    img = cases.blobs((20, 20, 20), 12)
    calls = []

    def step(image, crop, scale):
        calls.append(crop)
        return image * scale

    steps = [(step, {"scale": 1})]
    mk, ek, bk = {"x": [1]}, {"diameter": 7}, {"threshold": 100, "connectivity": 1}
    before = copy.deepcopy((steps[0][1], mk, ek, bk))
    distributed_eval(img, 10, tmp_path / "m.zarr", preprocessing_steps=steps, model_kwargs=mk, eval_kwargs=ek,
                     backend="threshold", backend_kwargs=bk)
    assert (steps[0][1], mk, ek, bk) == before and len(steps) == 1
    assert len(calls) == 8 and all(isinstance(c, tuple) and len(c) == 3 for c in calls)


def test_preprocessing_that_changes_shape_is_refused(tmp_path):
    img = cases.blobs((20, 20), 13)
    with pytest.raises(Exception, match="changed the block shape"):
        distributed_eval(img, 10, tmp_path / "p.zarr", backend="threshold", backend_kwargs={"threshold": 100},
                         preprocessing_steps=[(lambda im, crop: im[1:], {})])


@pytest.mark.parametrize("shape,msg", [((50,), "1 axes"), ((2, 3, 4, 5, 6, 7), "6 axes"), ((4, 8, 8, 8), "channel_axis")])
def test_bad_dimensionality(tmp_path, shape, msg):
    with pytest.raises(InputError, match=msg):
        distributed_eval(np.zeros(shape, np.uint8), 4, tmp_path / "x.zarr", backend="threshold",
                         backend_kwargs={"threshold": 1})


def test_zarr_inputs_groups_and_v3_output(tmp_path):
    img = cases.blobs((24, 30, 18), 14)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (8, 8, 8))
    zarr3 = int(zarr.__version__.split(".")[0]) >= 3  # the suite also runs under zarr-python 2.18 in CI
    g = zarr.open_group(str(tmp_path / "grp.zarr"), mode="w")
    make = g.create_array if zarr3 else g.create_dataset
    make("raw", shape=img.shape, dtype=img.dtype, chunks=(8, 8, 8))[...] = img
    ref = ndimage.label(img > 100)[0]
    a, _ = distributed_eval(str(tmp_path / "in.zarr"), 9, tmp_path / "a.zarr", backend="threshold",
                            backend_kwargs={"threshold": 100}, zarr_format=3 if zarr3 else 2)
    b, _ = distributed_eval(str(tmp_path / "grp.zarr"), 9, tmp_path / "b.zarr", backend="threshold",
                            backend_kwargs={"threshold": 100}, dataset="raw")
    assert label_equivalent(a[...], ref) and np.array_equal(a[...], b[...])
    if zarr3:
        assert zarr.open(str(tmp_path / "a.zarr"), mode="r").metadata.zarr_format == 3


def test_process_block_test_mode_matches_full_run_core(tmp_path):
    img = cases.blobs((30, 40), 15)
    lab, boxes, ids = process_block((1, 2), None, img, {}, {}, (12, 15), 0, test_mode=True, backend="threshold",
                                    backend_kwargs={"threshold": 100})
    distributed_eval(img, (12, 15), tmp_path / "f.zarr", backend="threshold", backend_kwargs={"threshold": 100},
                     keep_work=True)
    scratch = zarr.open(str(tmp_path / "f.mpicellpose-work" / "scratch.zarr"), mode="r")
    assert np.array_equal(lab, scratch[12:24, 30:40])
    assert ids.tolist() == list(range(1, lab.max() + 1)) and len(boxes) == len(ids)
    # the block's read region as crop, with a dummy block index (the reference's test-mode habit): the same
    same, _, _ = process_block((0, 0), (slice(12, 24), slice(30, 40)), img, {}, {}, (12, 15), 0, test_mode=True,
                               backend="threshold", backend_kwargs={"threshold": 100})
    assert np.array_equal(same, lab)
    with pytest.raises(ConfigError, match="crop .* is empty or outside the volume"):
        process_block((1, 2), (slice(0, 5), slice(50, 60)), img, {}, {}, (12, 15), 0, test_mode=True,
                      backend="threshold", backend_kwargs={"threshold": 100})


def test_process_block_test_mode_on_any_crop_segments_that_region():
    """The reference's documented one-block test: a crop around any point, block_index a dummy; the result
    is the crop's core (less the overlap on sides not at the volume's start, one block long at most)."""
    from scipy import ndimage

    from mpicellpose.synthetic.metrics import label_equivalent

    img = cases.blobs((60, 70), 15)
    bs, ov = (20, 25), 4
    for start in ((13, 7), (0, 30), (41, 50)):
        crop = tuple(slice(a, min(a + b + 2 * ov, n)) for a, b, n in zip(start, bs, img.shape))
        lab, boxes, ids = process_block((0, 0), crop, img, {}, {}, bs, ov, test_mode=True, backend="threshold",
                                        backend_kwargs={"threshold": 100})
        lo = [c.start + (ov if c.start else 0) for c in crop]
        hi = [min(c.stop, a + b) for c, a, b in zip(crop, lo, bs)]
        assert lab.shape == tuple(b - a for a, b in zip(lo, hi))
        whole_crop = ndimage.label(img[crop] > 100)[0]  # what the threshold backend finds in the crop
        core = whole_crop[tuple(slice(a - c.start, b - c.start) for a, b, c in zip(lo, hi, crop))]
        assert label_equivalent(lab, core) and ids.tolist() == list(range(1, lab.max() + 1))
        for k, b in zip(ids, boxes):  # boxes in the volume's coordinates
            inside = np.argwhere(lab == k) + lo
            assert [(s.start, s.stop) for s in b] == [(int(a), int(z) + 1) for a, z in
                                                      zip(inside.min(0), inside.max(0))]


def test_dask_cluster_options_are_accepted_with_one_line(tmp_path, caplog):
    img = np.zeros((8, 8), np.uint8)
    img[2:5, 2:5] = 1
    with caplog.at_level("WARNING", logger="mpicellpose"):
        labels, _ = distributed_eval(img, 4, tmp_path / "d.zarr", cluster_kwargs={"n_workers": 4, "ncpus": 2},
                                     backend="threshold", backend_kwargs={"threshold": 0})
    assert int(labels[...].max()) == 1
    said = [r.getMessage() for r in caplog.records if "Dask cluster" in r.getMessage()]
    assert len(said) == 1 and "(n_workers, ncpus)" in said[0] and "mpirun -n N" in said[0], said
    with pytest.raises(ConfigError, match="cluster_kwargs must be a dict"):
        distributed_eval(img, 4, tmp_path / "e.zarr", cluster_kwargs=["n_workers"], backend="threshold")


@pytest.mark.mpi
def test_failure_on_one_rank_stops_all_ranks_quickly(tmp_path, mpirun):
    t = time.time()
    proc = mpirun(3, [ROOT / "tests" / "mpi_fail.py", tmp_path], timeout=120, check=False)
    elapsed = time.time() - t
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = "".join((tmp_path / f"rank-{r}.txt").read_text() for r in range(3))
    lines = [l for l in text.splitlines() if l.startswith("caught")]
    assert len(lines) == 3, text
    for line in lines:
        assert "boom: simulated backend failure" in line and "block" in line
    # 48 blocks x 0.25 s / 3 ranks: without the abort notice ranks 0 and 2 would do all 32 of theirs
    done = sum(int(l.split()[-1]) for l in text.splitlines() if "blocks done" in l)
    assert done < 12, text
    assert elapsed < 60


def test_labels_backend_stitches_existing_segmentation(tmp_path):
    gt = touching_cells_volume()
    lab, _ = distributed_eval(gt, (20, 24, 16), tmp_path / "l.zarr", backend="labels", stitch="iou", overlap=4)
    assert label_equivalent(lab[...], gt)
    with pytest.raises(Exception, match="needs an integer input"):
        distributed_eval(gt.astype(np.float32), 16, tmp_path / "f.zarr", backend="labels")
