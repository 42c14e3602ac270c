"""--pipeline flows (issue 12): the network once per voxel, then masks per block.

* the cost model and the slabs (pure): network evaluations per output voxel under both
  pipelines, which slabs a block needs;
* the flow step against Cellpose's own ``eval`` (real Cellpose 3, the shipped model): on a
  region whose core is a sub-box, the three orientations' values over the core, summed, equal
  ``eval``'s flows of the whole region cropped to the core, exactly (a plane needs only
  in-plane context, so running the planes through the core only changes nothing); masks from
  those flows equal ``eval``'s masks;
* end to end under mpiexec: labels identical at 1, 2 and 3 ranks, close to whole-volume Cellpose,
  the cost recorded in the provenance, and a run killed in the flow step resumes to the same
  labels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from mpicellpose.runner import workdir
from mpicellpose.grid import cost
from mpicellpose.cellpose import flowfield as ff
from mpicellpose.grid import geometry as geo
from mpicellpose.synthetic.metrics import match_objects
from mpicellpose.grid.boxes import BoxGrid, auto_flow_box, flow_bytes_per_voxel
from mpicellpose.volumes.storage import numpy_array_to_zarr
from mpicellpose.synthetic.nuclei import make_nuclei

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _settings(shape, block, overlap, halo, box=1):
    return SimpleNamespace(grid=geo.BlockGrid(shape, block, overlap), shape=shape, flow_halo=halo, pipeline="flows",
                           flow_box=box, eval_kwargs={"diameter": 16})


# --------------------------------------------------------------------------- pure
def test_cost_interior_box_is_square_of_the_halo_growth():
    s = _settings((240, 240, 240), (80,) * 3, (32,) * 3, 16)
    middle = s.grid.linear_of((1, 1, 1))
    core = 80 ** 3
    assert cost.network_voxels(s, [middle], "flows") / core == pytest.approx((112 / 80) ** 2)
    assert cost.network_voxels(s, [middle], "blocks") / core == pytest.approx((144 / 80) ** 3)
    # 160^3, 8 blocks of 80^3 at the volume's corners, each its own box
    s = _settings((160, 160, 160), (80,) * 3, (32,) * 3, 16)
    every = range(len(s.grid))
    assert cost.network_voxels(s, every, "flows") / 160 ** 3 == pytest.approx((96 / 80) ** 2)
    assert cost.network_voxels(s, every, "blocks") / 160 ** 3 == pytest.approx((112 / 80) ** 3)
    # a box of two blocks per side spans the volume: no halo, every voxel once per orientation
    s = _settings((160, 160, 160), (80,) * 3, (32,) * 3, 16, box=2)
    assert cost.network_voxels(s, every, "flows") == 160 ** 3
    assert cost.network_cost(s, every)["flows_per_voxel"] == 1.0
    # the automatic box keeps the mask region within 2^27 voxels: 3 blocks of 128^3 with a 60-voxel
    # overlap (504^3), 1 of 256^3
    assert auto_flow_box(geo.BlockGrid((4096,) * 3, (128,) * 3, (60,) * 3), 16) == 3
    assert auto_flow_box(geo.BlockGrid((4096,) * 3, (256,) * 3, (60,) * 3), 16) == 1
    s = _settings((4096,) * 3, (256,) * 3, (60,) * 3, 16, box=2)
    cube = [s.grid.linear_of((4 + i, 4 + j, 4 + k)) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    boxes = BoxGrid(s.grid, cube, 2, 16)
    assert len(boxes) == 1 and boxes.network_voxels(boxes.linears) == 512 * 544 * 544
    one = BoxGrid(s.grid, cube[:1], 2, 16)  # a box with one kept block is computed whole
    assert one.network_voxels(one.linears) == 512 * 544 * 544
    s2 = _settings((100, 100), (50, 50), (10, 10), 5)
    assert cost.network_voxels(s2, range(4), "flows") == 4 * 55 * 55
    s2 = _settings((100, 100), (50, 50), (10, 10), 5, box=2)
    assert cost.network_voxels(s2, range(4), "flows") == 100 * 100
    assert flow_bytes_per_voxel(3) == 8 and flow_bytes_per_voxel(2) == 6


def test_box_neighbours_and_shell_pieces():
    grid = geo.BlockGrid((30, 30), (10, 10), (4, 4))
    boxes = BoxGrid(grid, range(9), 1, 3)
    centre, corner = grid.linear_of((1, 1)), grid.linear_of((0, 0))
    assert sorted(boxes.neighbours(centre)) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert sorted(boxes.neighbours(corner)) == [1, 3, 4]
    assert boxes.pieces(centre)[(-1, -1)] == ((10, 14), (10, 14)) and len(boxes.pieces(centre)) == 8
    # a corner box writes only what its neighbours read: its two high bands, in five pieces
    assert sorted(boxes.needed_pieces(corner)) == [(-1, 1), (0, 1), (1, -1), (1, 0), (1, 1)]
    # the mask leaves out box 1: nothing is written for it alone
    masked = BoxGrid(grid, [0, 3, 4], 1, 3)
    assert masked.neighbours(0) == [1, 3, 4] and sorted(masked.needed_pieces(0)) == [(1, -1), (1, 0), (1, 1)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_own_core_and_neighbours_shells_cover_every_mask_region(k):
    """What a box's mask step assembles (its core, the pieces of its neighbours' shells, 'no cell'
    for boxes the mask leaves out) covers its mask region exactly once."""
    grid = geo.BlockGrid((50, 70, 90), (12, 16, 20), (6, 5, 7))
    rng = np.random.default_rng(k)
    kept = [b for b in range(len(grid)) if rng.random() > 0.2]
    boxes = BoxGrid(grid, kept, k, 7)
    every = np.zeros(grid.shape, np.int32)
    for b in boxes.linears:
        for blk in boxes.blocks_of(int(b)):
            every[grid.block(blk).core_slices] += 1
    want = np.zeros(grid.shape, np.int32)
    for b in kept:
        want[grid.block(b).core_slices] = 1
    assert np.array_equal(every, want)  # each kept block in exactly one box with a kept block
    assert np.array_equal(boxes.box_of_block(np.arange(len(grid))),
                          [boxes.touching(grid.block(b).core)[0] for b in range(len(grid))])
    for y in boxes.linears[:: max(1, len(boxes) // 12)]:
        region = boxes.mask_region(int(y))
        cover = np.zeros(geo.box_shape(region), np.int32)
        origin = [a for a, _ in region]
        cover[geo.box_slices(boxes.core(int(y)), origin)] += 1
        for n in boxes.neighbours(int(y)):
            if not boxes.has_kept[n]:
                cover[geo.box_slices(geo.box_intersect(boxes.core(n), region), origin)] += 1
                continue
            for piece in boxes.needed_pieces(n).values():
                inter = geo.box_intersect(piece, region)
                if inter is not None:
                    cover[geo.box_slices(inter, origin)] += 1
        assert cover.min() == 1 and cover.max() == 1, (k, int(y))


def test_default_halo_is_sixteen_network_pixels_and_never_exceeds_the_block(tmp_path):
    from mpicellpose.config import RunConfig
    from mpicellpose.errors import ConfigError
    from mpicellpose.runner.phases.plan import open_volume, resolve_settings

    img = np.zeros((40, 64, 64), np.uint16)
    cfg = RunConfig(input=img, blocksize=(12, 32, 32), model_kwargs={"pretrained_model": "demo"})
    s = resolve_settings(cfg, open_volume(cfg))
    assert s.pipeline == "flows" and s.flow_halo == 12  # 16, clipped to the 12-voxel blocks
    assert s.flow_box == 4  # one box spans the volume: 4 blocks of 12 along z
    cfg = RunConfig(input=img, blocksize=(12, 32, 32), flow_box=1, model_kwargs={"pretrained_model": "demo"})
    assert resolve_settings(cfg, open_volume(cfg)).flow_box == 1
    with pytest.raises(ConfigError, match="flow_box must be a number of blocks >= 1"):
        RunConfig(input=img, flow_box=0)
    cfg = RunConfig(input=img, blocksize=32, eval_kwargs={"diameter": 60}, model_kwargs={"pretrained_model": "demo"})
    assert resolve_settings(cfg, open_volume(cfg)).flow_halo == 32
    with pytest.raises(ConfigError, match="flow-halo 40 is larger than the block"):
        cfg = RunConfig(input=img, blocksize=32, flow_halo=40, model_kwargs={"pretrained_model": "demo"})
        resolve_settings(cfg, open_volume(cfg))
    with pytest.raises(ConfigError, match="needs the Cellpose backend"):
        cfg = RunConfig(input=img, blocksize=32, backend="threshold", pipeline="flows")
        resolve_settings(cfg, open_volume(cfg))
    with pytest.raises(ConfigError, match="plane-by-plane"):
        cfg = RunConfig(input=img, blocksize=32, eval_kwargs={"stitch_threshold": 0.5}, pipeline="flows",
                        model_kwargs={"pretrained_model": "demo"})
        resolve_settings(cfg, open_volume(cfg))


def test_resume_with_other_boxes_is_refused_by_name(tmp_path):
    """The boxes decide the flow field: a resume with another --flow-box is refused and says so."""
    from mpicellpose.config import RunConfig
    from mpicellpose.errors import ResumeMismatchError
    from mpicellpose.runner.phases.plan import make_plan, open_volume

    numpy_array_to_zarr(tmp_path / "in.zarr", np.zeros((32, 64, 64), np.uint16), (32, 32, 32))

    def plan(**kw):
        cfg = RunConfig(input=str(tmp_path / "in.zarr"), output=str(tmp_path / "out.zarr"), blocksize=32,
                        model_kwargs={"pretrained_model": "demo"}, **kw)
        return make_plan(cfg, open_volume(cfg), 2)

    assert plan(flow_box=1).settings.flow_box == 1
    with pytest.raises(ResumeMismatchError, match=r"pipeline\.flow_box: 1 -> 2"):
        plan()


def test_too_little_scratch_space_is_refused_before_any_work(tmp_path, monkeypatch):
    from mpicellpose.config import RunConfig
    from mpicellpose.errors import InputError
    from mpicellpose.runner.phases.plan import make_plan, open_volume

    numpy_array_to_zarr(tmp_path / "in.zarr", np.zeros((32, 64, 64), np.uint16), (32, 32, 32))
    cfg = RunConfig(input=str(tmp_path / "in.zarr"), output=str(tmp_path / "out.zarr"), blocksize=32,
                    flow_box=1, model_kwargs={"pretrained_model": "demo"})
    from mpicellpose.runner.phases.plan import resolve_settings

    need = cost.flow_scratch_bytes(resolve_settings(cfg, open_volume(cfg)), range(4))
    assert need >= 4 * 32 ** 3 * 4  # four boxes of 32^3 in a 2 x 2 layer: most of each core is shell
    monkeypatch.setattr(workdir, "free_bytes", lambda path: need - 1)
    with pytest.raises(InputError, match=r"shells of --pipeline flows need up to .* MiB in the work directory"):
        make_plan(cfg, open_volume(cfg), 2)
    assert not (tmp_path / "out.mpicellpose-work").exists()  # nothing written
    monkeypatch.setattr(workdir, "free_bytes", lambda path: need)
    assert make_plan(cfg, open_volume(cfg), 2).settings.pipeline == "flows"


# --------------------------------------------------------------------------- against Cellpose's eval
@pytest.fixture(scope="module")
def demo_segmenter():
    pytest.importorskip("cellpose")
    from mpicellpose.cellpose.backends import make_backend
    from mpicellpose.cellpose.models import resolve_model

    def build(eval_kwargs):
        return make_backend("cellpose", model_kwargs={"pretrained_model": "demo"}, eval_kwargs=eval_kwargs,
                            resolved=resolve_model({"pretrained_model": "demo"}), threads=2, ndim=3)
    return build


@pytest.mark.slow
def test_core_flows_equal_evals_flows_of_the_region(demo_segmenter):
    img, _ = make_nuclei((28, 56, 60), seed=4)
    # bsize: Cellpose 3.1's 3D path tiles at 224 whatever it is given; the flow step must too
    seg = demo_segmenter({"normalize": {"lowhigh": [float(np.percentile(img, 1)), float(np.percentile(img, 99))]},
                          "diameter": 16.0, "bsize": 48})
    image, ek = seg.prepare(img, 3)
    ref, (_, dP, cellprob), _ = seg.model.eval(image, **ek)
    core = (slice(6, 20), slice(10, 40), slice(16, 52))
    calls = []
    original = seg.model._run_net
    seg.model._run_net = lambda *a, **k: calls.append(1) or original(*a, **k)  # a caller's wrapper
    per, nvs = zip(*(ff.compute_flows(seg, img, core, 3, p) for p in range(3)))
    assert seg.model.__dict__.get("_run_net") is not None  # the caller's wrapper is back
    seg.model._run_net = original
    flows = ff.combine(np.concatenate(per))  # summed in Cellpose's order, in single precision
    assert np.array_equal(flows[:3], dP[(slice(None),) + core])
    assert np.array_equal(flows[3], cellprob[core])
    # each orientation ran on the planes through the core only
    assert list(nvs) == [14 * 56 * 60, 30 * 28 * 60, 36 * 28 * 56]
    # masks from eval's flows (through half precision) equal eval's masks
    whole = np.concatenate([dP, cellprob[None]])
    masks = ff.compute_masks(seg, ff.to_half(whole).astype(np.float32), 3, img.size)
    assert ref.max() > 5 and match_objects(masks, ref)["f1"] == 1.0


# --------------------------------------------------------------------------- end to end
def _mpicellpose(n, *args, env=None, timeout=600):
    cmd = [str(BIN / "mpiexec"), "-n", str(n), str(BIN / "mpicellpose"), *map(str, args)]
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    pytest.importorskip("cellpose")
    d = tmp_path_factory.mktemp("flows")
    img, gt = make_nuclei((32, 64, 64), seed=7)
    numpy_array_to_zarr(d / "in.zarr", img, (32, 32, 32))
    return d, img, gt


ARGS = ("--model", "demo", "--blocksize", "32,32,32", "--threads", "1", "--device", "cpu", "--pipeline", "flows",
        "--flow-box", "1")


@pytest.mark.slow
@pytest.mark.mpi
def test_flows_pipeline_ranks_resume_and_cost(volume):
    d, img, gt = volume
    # the automatic box spans this volume: no halo, every voxel once per orientation, no shell
    r0 = _mpicellpose(1, "segment", d / "in.zarr", d / "auto.zarr", *ARGS[:-2])
    assert r0.returncode == 0, r0.stderr[-3000:]
    c = zarr.open(str(d / "auto.zarr"), mode="r").attrs["mpicellpose"]["cost"]
    assert c["pipeline"] == "flows" and c["flow_halo"] == 16 and c["flow_box"] == 2 and c["flows_per_voxel"] == 1.0
    assert c["measured_shell_bytes_written"] == 0 and c["fs_bytes_per_voxel_parts"]["shells_read"] == 0
    auto = zarr.open(str(d / "auto.zarr"), mode="r")[...]
    assert match_objects(auto, gt)["f1"] > 0.9  # the shipped model finds the synthetic nuclei

    # one box per block: four boxes exchange shells
    r1 = _mpicellpose(1, "segment", d / "in.zarr", d / "one.zarr", *ARGS)
    assert r1.returncode == 0, r1.stderr[-3000:]
    one = zarr.open(str(d / "one.zarr"), mode="r")
    meta = one.attrs["mpicellpose"]
    c = meta["cost"]
    assert c["flow_box"] == 1 and c["network_per_voxel"] == c["flows_per_voxel"] < c["blocks_per_voxel"]
    assert c["network_voxels_measured"] == pytest.approx(c["flows_per_voxel"] * img.size, rel=0.01)
    assert c["measured_shell_bytes_written"] > 0 and c["measured_shell_bytes_read"] > 0
    assert "flows" in meta["timings"]
    assert match_objects(one[...], auto)["f1"] > 0.95  # box faces change little

    # killed in the flow step on rank 1 after its first box, then the same command: the same labels
    env = {"MPICELLPOSE_FAULT": "flows:1:kill:1"}
    r2 = _mpicellpose(2, "segment", d / "in.zarr", d / "two.zarr", *ARGS, env=env)
    assert r2.returncode != 0
    assert (d / "two.mpicellpose-work" / "shells").is_dir()
    r3 = _mpicellpose(2, "segment", d / "in.zarr", d / "two.zarr", *ARGS)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert np.array_equal(one[...], zarr.open(str(d / "two.zarr"), mode="r")[...])
    assert not (d / "two.mpicellpose-work").exists()  # the shells removed with the rest
    # killed in the mask step (rank 0, as it records its first block), then resumed
    env = {"MPICELLPOSE_FAULT": "segment:0:kill:0"}
    r6 = _mpicellpose(3, "segment", d / "in.zarr", d / "three.zarr", *ARGS, env=env)
    assert r6.returncode != 0 and "injecting fault 'segment:0:kill:0'" in r6.stderr
    r5 = _mpicellpose(3, "segment", d / "in.zarr", d / "three.zarr", *ARGS)
    assert r5.returncode == 0, r5.stderr[-3000:]
    assert np.array_equal(one[...], zarr.open(str(d / "three.zarr"), mode="r")[...])

    # a GPU rank's defaults: masks built in a CPU thread during the flow step and the next box read
    # in a thread while the network runs: the same labels
    r4 = _mpicellpose(2, "segment", d / "in.zarr", d / "ahead.zarr", *ARGS, "--masks-during-flows", "on",
                      "--read-ahead", "on")
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert np.array_equal(one[...], zarr.open(str(d / "ahead.zarr"), mode="r")[...])


@pytest.mark.slow
def test_process_block_under_flows_costs_one_block(volume):
    """Under --pipeline flows, process_block computes the block alone (its read region one box):
    about one block's network, and the run's objects in its core."""
    from mpicellpose import distributed_eval, process_block

    d, img, _ = volume
    mask = np.zeros((1, 2, 2), bool)
    mask[0, 0, :] = True  # blocks (0, 0, 0) and (0, 0, 1); (0, 1, *) are left out: no cell there
    model = {"pretrained_model": "demo"}
    distributed_eval(str(d / "in.zarr"), (32, 32, 32), str(d / "pb.zarr"), mask=mask, model_kwargs=model,
                     eval_kwargs={}, keep_work=True, threads=1, device="cpu")
    scratch = zarr.open(str(d / "pb.mpicellpose-work" / "scratch.zarr"), mode="r")
    lab, boxes, ids = process_block((0, 0, 1), None, str(d / "in.zarr"), model, {}, (32, 32, 32), None,
                                    test_mode=True, threads=1, device="cpu", mask=mask)
    run = scratch[:, :32, 32:]
    assert lab.max() > 0 and match_objects(lab, run)["f1"] > 0.9
    assert json.loads(json.dumps(len(boxes))) == len(ids) == lab.max()
    # exact=True: the block's flow box and its neighbours as the run computes them, the run's labels
    lab, boxes, ids = process_block((0, 0, 1), None, str(d / "in.zarr"), model, {}, (32, 32, 32), None,
                                    test_mode=True, threads=1, device="cpu", mask=mask, exact=True)
    assert np.array_equal(lab, run)
