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
from mpicellpose.runner.phases.flows import cores_touching, needed_flows, needed_slabs
from mpicellpose.grid.slabs import SlabGrid, auto_flow_slab, flow_bytes_per_voxel
from mpicellpose.volumes.storage import numpy_array_to_zarr
from mpicellpose.synthetic.nuclei import make_nuclei

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _settings(shape, block, overlap, halo, group=1):
    return SimpleNamespace(grid=geo.BlockGrid(shape, block, overlap), shape=shape, flow_halo=halo, pipeline="flows",
                           flow_slab=group, eval_kwargs={"diameter": 16})


# --------------------------------------------------------------------------- pure
def test_cost_interior_block_is_square_of_the_halo_growth():
    s = _settings((240, 240, 240), (80,) * 3, (32,) * 3, 16)
    middle = s.grid.linear_of((1, 1, 1))
    core = 80 ** 3
    assert cost.network_voxels(s, [middle], "flows") / core == pytest.approx((112 / 80) ** 2)
    assert cost.network_voxels(s, [middle], "blocks") / core == pytest.approx((144 / 80) ** 3)
    # the end-to-end benchmark case: 160^3, 8 blocks of 80^3 at the volume's corners
    s = _settings((160, 160, 160), (80,) * 3, (32,) * 3, 16)
    every = range(len(s.grid))
    assert cost.network_voxels(s, every, "flows") / 160 ** 3 == pytest.approx((96 / 80) ** 2)
    assert cost.network_voxels(s, every, "blocks") / 160 ** 3 == pytest.approx((112 / 80) ** 3)
    # slabs two blocks wide span the whole planes there: no halo, every voxel once per orientation
    s = _settings((160, 160, 160), (80,) * 3, (32,) * 3, 16, group=2)
    assert cost.network_voxels(s, every, "flows") == 160 ** 3
    assert cost.network_cost(s, every)["flows_per_voxel"] == 1.0
    # 256^3 blocks in a 4096^3 volume: the automatic slabs are 2 blocks wide (within twice a read region)
    big = geo.BlockGrid((4096,) * 3, (256,) * 3, (60,) * 3)
    assert auto_flow_slab(big) == 2 and auto_flow_slab(geo.BlockGrid((4096,) * 3, (512,) * 3, (60,) * 3)) == 1
    s = _settings((4096,) * 3, (256,) * 3, (60,) * 3, 16, group=2)
    cube = [s.grid.linear_of((4 + i, 4 + j, 4 + k)) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    slabs = SlabGrid(s.grid, cube, 2, 16)  # per orientation, two layers of one 2x2 slab
    assert len(slabs) == 6
    assert slabs.network_voxels(slabs.linears) == 8 * 256 ** 3 * (544 / 512) ** 2
    one = SlabGrid(s.grid, cube[:1], 2, 16)  # a slab spans its kept cores only
    assert one.network_voxels(one.linears[:1]) == 256 * 288 * 288 // 3
    s2 = _settings((100, 100), (50, 50), (10, 10), 5)
    assert cost.network_voxels(s2, range(4), "flows") == 4 * 55 * 55
    s2 = _settings((100, 100), (50, 50), (10, 10), 5, group=2)
    assert cost.network_voxels(s2, range(4), "flows") == 100 * 100
    assert flow_bytes_per_voxel(3) == 18 and flow_bytes_per_voxel(2) == 6


def test_needed_flows_cover_the_read_region():
    grid = geo.BlockGrid((30, 30), (10, 10), (4, 4))
    centre = grid.linear_of((1, 1))
    assert sorted(cores_touching(grid, grid.block(centre).read)) == list(range(9))
    corner = grid.linear_of((0, 0))
    assert sorted(cores_touching(grid, grid.block(corner).read)) == [0, 1, 3, 4]
    # the mask leaves out block 1: its flows are never computed
    assert needed_flows(grid, [0, 3, 4], [corner]) == [0, 3, 4]


def test_slabs_cover_each_kept_core_once_per_orientation():
    grid = geo.BlockGrid((50, 70, 90), (20, 20, 20), (6, 6, 6))
    kept = [b for b in range(len(grid)) if b % 5]  # a mask leaves some blocks out
    for group in (1, 2, 3):
        slabs = SlabGrid(grid, kept, group, 7)
        cover = np.zeros((3, *grid.shape), np.int32)
        for s in slabs.linears:
            slab = slabs.block(s)
            assert set(slab.blocks) <= set(kept) and slab.blocks
            for b in slab.blocks:
                cover[(slab.orient,) + grid.block(b).core_slices] += 1
            a = slab.orient  # no context along the planes' normal; the halo in plane, clipped
            assert slab.read[a] == slab.core[a]
            for k in range(3):
                if k != a:
                    assert slab.read[k] == (max(0, slab.core[k][0] - 7), min(grid.shape[k], slab.core[k][1] + 7))
        want = np.zeros(grid.shape, np.int32)
        for b in kept:
            want[grid.block(b).core_slices] = 1
        assert all(np.array_equal(cover[p], want) for p in range(3))
        # a block's mask step reads the slabs of every kept core its read region touches
        blk = grid.linear_of((1, 1, 1))
        need = needed_slabs(slabs, kept, [blk])
        assert need == slabs.of_blocks(needed_flows(grid, kept, [blk]))
        assert {slabs.block(s).orient for s in need} == {0, 1, 2}


def test_default_halo_is_sixteen_network_pixels_and_never_exceeds_the_block(tmp_path):
    from mpicellpose.config import RunConfig
    from mpicellpose.errors import ConfigError
    from mpicellpose.runner.phases.plan import open_volume, resolve_settings

    img = np.zeros((40, 64, 64), np.uint16)
    cfg = RunConfig(input=img, blocksize=(12, 32, 32), model_kwargs={"pretrained_model": "demo"})
    s = resolve_settings(cfg, open_volume(cfg))
    assert s.pipeline == "flows" and s.flow_halo == 12  # 16, clipped to the 12-voxel blocks
    assert s.flow_slab == 4  # the slabs span whole planes: 4 blocks of 12 along z (ZX, ZY planes)
    cfg = RunConfig(input=img, blocksize=(12, 32, 32), flow_slab=1, model_kwargs={"pretrained_model": "demo"})
    assert resolve_settings(cfg, open_volume(cfg)).flow_slab == 1
    with pytest.raises(ConfigError, match="flow_slab must be a number of blocks >= 1"):
        RunConfig(input=img, flow_slab=0)
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


def test_resume_with_other_slabs_is_refused_by_name(tmp_path):
    """The slabs decide the flow field: a resume with another --flow-slab is refused and says so."""
    from mpicellpose.config import RunConfig
    from mpicellpose.errors import ResumeMismatchError
    from mpicellpose.runner.phases.plan import make_plan, open_volume

    numpy_array_to_zarr(tmp_path / "in.zarr", np.zeros((32, 64, 64), np.uint16), (32, 32, 32))

    def plan(**kw):
        cfg = RunConfig(input=str(tmp_path / "in.zarr"), output=str(tmp_path / "out.zarr"), blocksize=32,
                        model_kwargs={"pretrained_model": "demo"}, **kw)
        return make_plan(cfg, open_volume(cfg), 2)

    assert plan(flow_slab=1).settings.flow_slab == 1
    with pytest.raises(ResumeMismatchError, match=r"pipeline\.flow_slab: 1 -> 2"):
        plan()


def test_too_little_scratch_space_is_refused_before_any_work(tmp_path, monkeypatch):
    from mpicellpose.config import RunConfig
    from mpicellpose.errors import InputError
    from mpicellpose.runner.phases.plan import make_plan, open_volume

    numpy_array_to_zarr(tmp_path / "in.zarr", np.zeros((32, 64, 64), np.uint16), (32, 32, 32))
    cfg = RunConfig(input=str(tmp_path / "in.zarr"), output=str(tmp_path / "out.zarr"), blocksize=32,
                    model_kwargs={"pretrained_model": "demo"})
    need = 32 * 64 * 64 * 18  # 18 bytes per voxel in 3D
    monkeypatch.setattr(workdir, "free_bytes", lambda path: need - 1)
    with pytest.raises(InputError, match=r"flow field of --pipeline flows needs .* GiB in the work directory"):
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


ARGS = ("--model", "demo", "--blocksize", "32,32,32", "--threads", "1", "--device", "cpu", "--pipeline", "flows")


@pytest.mark.slow
@pytest.mark.mpi
def test_flows_pipeline_ranks_resume_and_cost(volume):
    d, img, gt = volume
    r1 = _mpicellpose(1, "segment", d / "in.zarr", d / "one.zarr", *ARGS)
    assert r1.returncode == 0, r1.stderr[-3000:]
    one = zarr.open(str(d / "one.zarr"), mode="r")
    meta = one.attrs["mpicellpose"]
    c = meta["cost"]
    assert c["pipeline"] == "flows" and c["flow_halo"] == 16 and c["flow_slab"] == 2
    # slabs two blocks wide span whole planes in every orientation: each voxel once per orientation
    assert c["flows_per_voxel"] == 1.0
    assert c["network_per_voxel"] == c["flows_per_voxel"] < c["blocks_per_voxel"]
    assert c["network_voxels_measured"] == pytest.approx(c["flows_per_voxel"] * img.size, rel=0.01)
    assert "flows" in meta["timings"] and "segment" in meta["timings"]
    assert match_objects(one[...], gt)["f1"] > 0.9  # the shipped model finds the synthetic nuclei

    # killed in the flow step on rank 1 after its first block, then the same command: the same labels
    env = {"MPICELLPOSE_FAULT": "flows:1:kill:1"}
    r2 = _mpicellpose(2, "segment", d / "in.zarr", d / "two.zarr", *ARGS, env=env)
    assert r2.returncode != 0
    assert (d / "two.mpicellpose-work" / "flows").is_dir()
    kept = sum(1 for p in (d / "two.mpicellpose-work" / "flows").rglob("*") if p.is_file())  # done-markers
    r3 = _mpicellpose(2, "segment", d / "in.zarr", d / "two.zarr", *ARGS)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert (f"{kept} reused from an earlier run" in r3.stderr) == (kept > 0), (kept, r3.stderr[-3000:])
    two = zarr.open(str(d / "two.zarr"), mode="r")
    assert np.array_equal(one[...], two[...])
    r5 = _mpicellpose(3, "segment", d / "in.zarr", d / "three.zarr", *ARGS)
    assert r5.returncode == 0, r5.stderr[-3000:]
    assert np.array_equal(one[...], zarr.open(str(d / "three.zarr"), mode="r")[...])
    assert not (d / "two.mpicellpose-work").exists()  # flows.zarr and flows/ removed with the rest

    # a GPU rank's defaults: masks built in a CPU thread during the flow step and the next block read
    # in a thread while the network runs: the same labels
    r4 = _mpicellpose(2, "segment", d / "in.zarr", d / "ahead.zarr", *ARGS, "--masks-during-flows", "on",
                      "--read-ahead", "on")
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert "the masks of 4 block(s) were built during the flow step" in r4.stderr
    assert np.array_equal(one[...], zarr.open(str(d / "ahead.zarr"), mode="r")[...])


@pytest.mark.slow
def test_process_block_equals_the_flows_run(volume):
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
    assert lab.max() > 0 and np.array_equal(lab, scratch[:, :32, 32:])
    assert json.loads(json.dumps(len(boxes))) == len(ids) == lab.max()
