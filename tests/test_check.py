"""``mpicellpose check`` (issue 24): block-wise vs whole-region Cellpose on a sample region.

Its numbers are the benchmarks' own (``benchmarks/run_all.seam_quality`` on the same two label
volumes), its block-wise labels are what ``segment`` gives on the same region with the same
settings, a setting that breaks seams by construction (no overlap, touch stitching, on dense
nuclei) fails and a named setting passes, ``segment --check`` stops on a failing check, and a
following ``segment`` records the check in its provenance.
"""
import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, run_mpi
from mpicellpose.grid import geometry as geo
from mpicellpose.tools import check as ck
from mpicellpose.tools import check_report as rep

sys.path.insert(0, str(ROOT / "benchmarks"))

ARGS = ["--model", "demo", "--threads", "1", "--log-level", "WARNING"]


# --------------------------------------------------------------------------- pure parts
def test_a_given_region_is_widened_to_whole_blocks_and_bad_ones_are_refused():
    assert ck.parse_region("5:70,100:101,0:200", (128, 256, 200), (32, 64, 64)) == ((0, 64, 0), (96, 128, 200))
    for bad in ("0:10,0:10", "10:5,0:1,0:1", "0:10,0:10,0:999", "a:b,0:1,0:1"):
        with pytest.raises(ValueError, match="--region"):
            ck.parse_region(bad, (128, 256, 200), (32, 64, 64))


def test_candidate_regions_are_two_blocks_around_a_corner_and_start_on_a_block_face():
    grid = geo.BlockGrid((100, 200, 64), (32, 64, 64), (8, 8, 8))
    cands = ck.corner_regions(grid)
    assert len(cands) == 3 * 3 * 1
    for start, stop in cands:
        assert all(a % b == 0 for a, b in zip(start, grid.blocksize))
        assert all(z - a == min(2 * b, n - a) for a, z, b, n in list(zip(start, stop, grid.blocksize, grid.shape))[:2])
        assert (start[2], stop[2]) == (0, 64)  # an axis of one block: whole
    assert cands[0] == ((32, 64, 0), (96, 192, 64))  # the most central first


def test_the_fixes_tried_name_the_settings_that_could_mend_seams():
    from mpicellpose.config import RunConfig
    from mpicellpose.runner.phases.plan import Settings

    s = Settings((256, 256), (64, 64), (0, 0), None, "touch", 1, {"diameter": 16.0}, None, None, None, ("y", "x"),
                 "flows", 16, 1)
    labels = [label for label, _ in ck.candidate_fixes(RunConfig(input="x", stitch="touch", overlap=0), s)]
    assert labels == ["--stitch iou --overlap 32", "--overlap 16", "--flow-halo 32", "--pipeline blocks"]


def test_splits_and_merges_are_told_apart_at_faces_and_away_from_them():
    oracle = np.zeros((1, 16), np.uint16)
    oracle[0, 5:12], oracle[0, 0:2], oracle[0, 2:5] = 1, 2, 3  # 1 crosses the face at 8; 2, 3 do not
    pred = oracle.copy()
    pred[0, 8:12] = 4           # 1 split at the face
    pred[0, 0:5] = 5            # 2 and 3 merged away from any face
    m = rep.compare(pred, oracle, (1, 8))
    assert (m["cut"], m["split_at_faces"], m["split_away"], m["merged_away"], m["merged_at_faces"]) == (1, 1, 0, 1, 0)
    assert rep.judge(m) and not rep.judge(rep.compare(oracle, oracle, (1, 8)))
    assert rep.disagreement(pred, oracle).sum() == 3 + 2  # the piece 5:8, and object 2 (lost in the merge)


def test_the_mask_is_cropped_at_the_regions_resolution(tmp_path):
    import zarr

    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True  # covers voxels y 16:32, x 32:48 of a 64 x 64 volume
    path = ck.write_mask_crop(mask, (64, 64), (0, 32), (32, 64), str(tmp_path / "m.zarr"))
    got = np.asarray(zarr.open(path, mode="r")[...])
    assert got.shape == (32, 32) and got[16:32, 0:16].all() and got.sum() == 16 * 16


# --------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def dense2d(tmp_path_factory):
    from mpicellpose.synthetic.nuclei import make_nuclei
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    d = tmp_path_factory.mktemp("dense2d")
    img, _ = make_nuclei((192, 192), seed=3, density=0.45, touching_fraction=0.6)
    numpy_array_to_zarr(str(d / "image.zarr"), img, (64, 64))
    return d


def benchmark_numbers(work, d, blocksize):
    """The benchmarks' seam quality of the check's kept labels, the oracle standing for the truth."""
    import zarr

    import run_all

    oracle = np.asarray(zarr.open(str(work / "oracle.zarr"), mode="r")[...])
    zarr.save_array(str(d / "truth.zarr"), oracle)

    class Env:
        def err(self, where, msg):
            raise AssertionError(f"{where}: {msg}")

    q = run_all.seam_quality(Env(), "check", str(d), {"blocksize": blocksize},
                             {"whole": str(work / "oracle.zarr"), "ours": str(work / "blockwise0.zarr")})
    return q["ours"]


def assert_same_as_benchmarks(run, bench):
    assert run["f1"] == round(bench["vs_whole"]["f1"], 4)
    assert run["mean_iou"] == round(bench["vs_whole"]["mean_matched_iou"], 4)
    assert (run["cut"], run["split_at_faces"], run["merged_at_faces"], run["fragments_at_faces"]) == \
        (bench["seam"]["cut"], bench["seam"]["seam_splits"], bench["seam"]["seam_merges"],
         bench["seam"]["seam_fragments"])
    assert run["seam_errors"] == bench["seam_errors"]


def test_no_overlap_with_touch_stitching_fails_names_a_fix_and_measures_what_the_benchmarks_and_segment_do(dense2d):
    import zarr

    from mpicellpose.synthetic.metrics import label_equivalent

    d, out = dense2d, dense2d / "touch.zarr"
    proc = run_mpi(1, ["-m", "mpicellpose", "check", d / "image.zarr", out, "--blocksize", "64", "--overlap", "0",
                       "--stitch", "touch", "--keep-check", "--json"] + ARGS, timeout=300, check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((d / "touch.check.json").read_text())
    asked, fix = report["runs"][0], report["runs"][-1]
    assert not asked["passed"] and asked["why"]
    assert fix["passed"] and report["fix"] == fix["label"] and fix["label"].startswith("--stitch iou")
    assert fix["label"] in report["verdict"] and "network evaluations per voxel" in report["verdict"]
    # under --pipeline flows the seams are the flow boxes' faces: here one box of 3 x 3 blocks spans the
    # image, so the region is the image (its blocks' faces still cut objects and touch stitching merges)
    assert report["region"]["shape"] == [192, 192] and report["region"]["blocks"] == 9
    assert os.path.getsize(report["png"]) > 10_000
    work = d / "touch.check-work"
    assert_same_as_benchmarks(asked, benchmark_numbers(work, d, 64))
    # the block-wise labels are segment's on the same region with the same settings
    norm = json.dumps({"normalize": report["normalization"]})
    run_mpi(1, ["-m", "mpicellpose", "segment", work / "region.zarr", d / "seg.zarr", "--blocksize", "64",
                "--overlap", "0", "--stitch", "touch", "--eval-kwargs", norm] + ARGS, timeout=300)
    assert label_equivalent(zarr.open(str(d / "seg.zarr"), mode="r")[...],
                            zarr.open(str(work / "blockwise0.zarr"), mode="r")[...])


def test_segment_check_stops_on_a_failing_check_and_records_a_passing_one(dense2d):
    import zarr

    d = dense2d
    proc = run_mpi(2, ["-m", "mpicellpose", "segment", d / "image.zarr", d / "stopped.zarr", "--blocksize", "64",
                       "--overlap", "0", "--stitch", "touch", "--check"] + ARGS, timeout=300, check=False)
    assert proc.returncode == 4 and "segment not started" in proc.stdout, proc.stderr[-3000:]
    assert "verdict: FAIL" in proc.stdout and not (d / "stopped.zarr").exists()
    run_mpi(1, ["-m", "mpicellpose", "segment", d / "image.zarr", d / "ok.zarr", "--blocksize", "64", "--check",
                "--min-f1", "0.5", "--max-seam-errors", "100"] + ARGS, timeout=300)
    rec = zarr.open(str(d / "ok.zarr"), mode="r").attrs["mpicellpose"]["provenance"]["check"]
    assert rec["settings_match"] and rec["passed"] and rec["file"] == "ok.check.json"
    assert rec["runs"][0]["f1"] >= 0.5 and rec["region"]["shape"] in ([128, 128], [192, 192])


def test_on_the_demo_volume_check_measures_what_the_benchmarks_measure(tmp_path):
    from mpicellpose.tools.demo import demo_paths, generate

    generate(str(tmp_path), 48, seed=2)
    image, _, _ = demo_paths(str(tmp_path))
    out = tmp_path / "demo_labels.zarr"
    proc = run_mpi(1, ["-m", "mpicellpose", "check", image, out, "--blocksize", "24", "--overlap", "16",
                       "--keep-check", "--json", "--no-fixes"] + ARGS, timeout=400, check=False)
    assert proc.returncode in (0, 4), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["region"]["shape"] == [48, 48, 48] and report["region"]["blocks"] == 8
    assert report["runs"][0]["cut"] > 0 and report["oracle"]["objects"] > 0
    assert_same_as_benchmarks(report["runs"][0], benchmark_numbers(tmp_path / "demo_labels.check-work", tmp_path, 24))
