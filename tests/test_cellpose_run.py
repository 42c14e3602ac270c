"""Real Cellpose inference with the shipped model: under mpiexec -n 2 and in-process, the same
labels; process_block(test_mode=True) equals the full run's block core; normalisation recorded."""
import numpy as np
import pytest
import zarr

from conftest import run_mpi
from mpicellpose import process_block
from mpicellpose.volumes.storage import numpy_array_to_zarr
from mpicellpose.synthetic.metrics import match_objects
from mpicellpose.synthetic.nuclei import make_nuclei

pytestmark = pytest.mark.cellpose

SHAPE, BLOCK = (40, 64, 64), "20,64,64"
ARGS = ["--model", "demo", "--diameter", "16", "--blocksize", BLOCK, "--overlap", "10", "--threads", "1",
        "--keep-work"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp")
    img, gt = make_nuclei(SHAPE, seed=7, touching_fraction=0.4)
    numpy_array_to_zarr(d / "in.zarr", img, (20, 32, 32))
    out2 = d / "n2" / "labels.zarr"
    out1 = d / "n1" / "labels.zarr"
    p2 = run_mpi(2, ["-m", "mpicellpose", "segment", d / "in.zarr", out2] + ARGS, timeout=400)
    p1 = run_mpi(1, ["-m", "mpicellpose", "segment", d / "in.zarr", out1] + ARGS, timeout=400)
    return d, img, gt, out1, out2, p2


@pytest.mark.mpi
def test_cellpose_two_ranks_segments_and_matches_one_rank(runs):
    d, img, gt, out1, out2, proc = runs
    lab2 = zarr.open(str(out2), mode="r")
    lab1 = zarr.open(str(out1), mode="r")
    scores = match_objects(lab2[...], gt, 0.5)
    assert scores["f1"] >= 0.85, scores
    assert np.array_equal(lab1[...], lab2[...]), "labels differ between 1 and 2 ranks"
    meta = lab2.attrs["mpicellpose"]
    lo, hi = meta["normalization"]["normalize"]["lowhigh"]
    assert lo < hi and meta["provenance"]["model"]["name"] == "demo"
    assert meta["n_stitched_objects"] > 0  # objects cut by the z face were rejoined


def test_process_block_matches_full_run_core(runs):
    d, img, gt, out1, _, _ = runs
    meta = zarr.open(str(out1), mode="r").attrs["mpicellpose"]
    norm = meta["normalization"]["normalize"]
    lab, boxes, ids = process_block((1, 0, 0), None, str(d / "in.zarr"), {"pretrained_model": "demo"},
                                    {"diameter": 16, "normalize": norm}, (20, 64, 64), 10, test_mode=True,
                                    threads=1, exact=True)
    scratch = zarr.open(str(d / "n1" / "labels.mpicellpose-work" / "scratch.zarr"), mode="r")
    assert lab.shape == (20, 64, 64) and lab.max() > 0
    assert np.array_equal(lab, scratch[20:40])
    assert len(boxes) == len(ids) == lab.max()


def test_process_block_on_a_crop_that_is_no_block_finds_the_runs_objects(runs):
    """The reference's one-block test: a crop around any point (block_index a dummy) is segmented on its own
    with the run's settings; its core agrees with the full run's labels there, and with the truth."""
    d, img, gt, out1, _, _ = runs
    full = zarr.open(str(out1), mode="r")[...]
    crop = (slice(4, 36), slice(10, 58), slice(6, 60))  # no block's read region
    lab, boxes, ids = process_block((0, 0, 0), crop, str(d / "in.zarr"), {"pretrained_model": "demo"},
                                    {"diameter": 16}, (20, 64, 64), 10, test_mode=True, threads=1)
    core = (slice(14, 34), slice(20, 58), slice(16, 60))  # less the overlap, one block long at most
    assert lab.shape == tuple(c.stop - c.start for c in core) and len(boxes) == len(ids) == lab.max() > 3
    # objects wholly inside the core: the same objects as the run's and as the truth
    assert match_objects(lab, full[core], 0.5)["f1"] >= 0.8
    assert match_objects(lab, gt[core], 0.5)["f1"] >= 0.8


@pytest.mark.slow
def test_process_block_defaults_equal_the_run(tmp_path):
    """3D, anisotropic, the shipped model, default settings (overlap from the model's diameter
    and the anisotropy, global normalisation over the blocks in the mask), a brightness
    gradient: process_block gives exactly the core the full run gives that block.  (Before,
    its default overlap was 2 x 30 whatever the model and the anisotropy, and it normalised
    per block: 242 voxels of this core differed.)"""
    from mpicellpose import distributed_eval

    img, _ = make_nuclei((12, 120, 120), seed=11, anisotropy=2.0, gradient=(2, 0.3, 1.0))
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (12, 40, 40))
    mask = np.zeros((1, 3, 3), bool)
    mask[0, 1, 1] = True  # the run segments only the middle block (0, 1, 1)
    model, ev = {"pretrained_model": "demo"}, {"anisotropy": 2.0}
    labels, _ = distributed_eval(str(tmp_path / "in.zarr"), (12, 40, 40), str(tmp_path / "out.zarr"), mask=mask,
                                 model_kwargs=model, eval_kwargs=ev, keep_work=True, threads=1, device="cpu")
    meta = labels.attrs["mpicellpose"]
    assert meta["overlap"] == [16, 32, 32] and meta["normalization"] is not None  # the defaults were used
    scratch = zarr.open(str(tmp_path / "out.mpicellpose-work" / "scratch.zarr"), mode="r")
    lab, boxes, ids = process_block((0, 1, 1), None, str(tmp_path / "in.zarr"), model, ev, (12, 40, 40), None,
                                    test_mode=True, threads=1, device="cpu", mask=mask, exact=True)
    assert lab.max() > 2
    assert np.array_equal(lab, scratch[:, 40:80, 40:80])
    assert len(boxes) == len(ids) == lab.max()
