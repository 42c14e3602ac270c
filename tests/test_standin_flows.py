"""The stand-in network for scale runs (``--model standin-flows``, issue 23).

* pure: its output has the shape and channel order of Cellpose's network, and a plane's values
  over a core do not depend on how far the plane extends beyond a halo around it;
* end to end under ``--pipeline flows`` (the real slabs, flow store, ``_compute_masks``, faces,
  merge, relabel): 1, 2 and 3 ranks give byte-identical labels that match the synthetic truth;
* many blocks: a run over more than 10^4 tiny blocks on 4 ranks completes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from mpicellpose.synthetic.metrics import match_objects
from mpicellpose.synthetic.nuclei import make_nuclei
from mpicellpose.volumes.storage import numpy_array_to_zarr

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARGS = ("--model", "standin-flows", "--threads", "1", "--device", "cpu", "--pipeline", "flows")
# the stand-in's domain: bright, separated objects of similar brightness
SEPARATED = {"touching_fraction": 0.0, "min_gap": 3.0, "intensity_jitter": 0.0}


def _normalised(img):
    lo, hi = np.percentile(img, [1, 99])
    return ((img - lo) / (hi - lo)).astype(np.float32)


def test_standin_output_is_cellposes_and_local():
    from mpicellpose.cellpose import standin

    img, gt = make_nuclei((4, 96, 96), seed=2, **SEPARATED)
    x = _normalised(img)[..., None]
    y = standin.planes(np.concatenate([x, np.zeros_like(x)], -1))  # Cellpose 3 hands two channels
    assert y.shape == (4, 96, 96, 3) and y.dtype == np.float32
    inside, outside = gt > 0, gt == 0
    assert (y[..., 2][inside] > 0).mean() > 0.9 and (y[..., 2][outside] < 0).mean() > 0.9
    assert np.abs(y[..., :2]).max() <= 5.0 + 1e-4 and np.abs(y[..., :2][inside]).mean() > 1.0
    # the flow points into the object: one step along it lands on the same object more often than not
    zz, yy, xx = np.nonzero(inside)
    ty = np.clip(np.rint(yy + y[zz, yy, xx, 0] / 5.0 * 2), 0, 95).astype(int)
    tx = np.clip(np.rint(xx + y[zz, yy, xx, 1] / 5.0 * 2), 0, 95).astype(int)
    assert (gt[zz, ty, tx] == gt[zz, yy, xx]).mean() > 0.95
    # a core 20 voxels from the crop's edge sees the same values as in the whole plane
    crop = standin.planes(x[:, 20:80, 10:90])
    assert np.array_equal(crop[:, 20:40, 20:60], y[:, 40:60, 30:70])
    # and the torch module Cellpose's run_net calls (--pipeline blocks) gives the same
    torch = pytest.importorskip("torch")
    net = standin.build_net()
    out, style = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    assert np.array_equal(out.numpy().transpose(0, 2, 3, 1), y) and style.shape == (4, 256)


def _segment(n, *args, timeout=280):
    cmd = [str(BIN / "mpiexec"), "-n", str(n), str(BIN / "mpicellpose"), "segment", *map(str, args), *ARGS]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
@pytest.mark.mpi
def test_standin_flows_labels_identical_across_ranks_and_true(tmp_path):
    pytest.importorskip("cellpose")
    img, gt = make_nuclei((48, 64, 64), seed=3, **SEPARATED)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (16, 32, 32))
    out = {}
    for n in (1, 2, 3):
        r = _segment(n, tmp_path / "in.zarr", tmp_path / f"n{n}.zarr", "--blocksize", "16,32,32")
        assert "flows: " in r.stderr  # the flow step ran (the network per flow box), then the masks
        if n > 1:  # one flow box spans this volume: the ranks beyond the first are told they idle
            assert f"{n} ranks for 1 flow box(es) of 3 block(s) per side: {n - 1} rank(s) will idle" in r.stderr
        arr = zarr.open(str(tmp_path / f"n{n}.zarr"), mode="r")
        assert arr.attrs["mpicellpose"]["cost"]["pipeline"] == "flows"
        out[n] = arr[...]
    assert out[1].max() >= 15
    assert np.array_equal(out[1], out[2]) and np.array_equal(out[1], out[3])
    assert match_objects(out[1], gt)["f1"] >= 0.9


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(900)
def test_standin_flows_ten_thousand_blocks(tmp_path):
    """10^4 blocks through the whole flows pipeline on 4 ranks.  In 2D (100 x 100 blocks of 8^2: 85 s on
    2 cores) rather than the scale series' 3D volume (22^3 blocks: 338 s), so the suite stays short; the
    bookkeeping per block (records, faces, merge, relabel, table) is the same."""
    pytest.importorskip("cellpose")
    shape = (800, 800)  # 100^2 = 10^4 blocks of 8^2
    img, gt = make_nuclei(shape, seed=1, mean_diameter=6.0, **dict(SEPARATED, min_gap=2.0))
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (200, 200))
    _segment(4, tmp_path / "in.zarr", tmp_path / "out.zarr", "--blocksize", "8,8", "--overlap", "4", "--flow-box", "10",
             timeout=850)  # 100 flow boxes of 10 x 10 blocks: shells exchanged, a sweep of 10 layers
    arr = zarr.open(str(tmp_path / "out.zarr"), mode="r")
    assert np.prod([-(-s // 8) for s in shape]) >= 10_000
    # objects of 4-8 pixels across in blocks of 8: most found (0.85 measured; small ones fall under min_size)
    assert match_objects(arr[...], gt)["f1"] >= 0.83
