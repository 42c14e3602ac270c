"""What a newcomer's first run must not do silently: a multi-channel image given to a one-channel model
(refused at plan time, naming ``--channel``), and a finished run with no object, or with objects far
from the diameter the network was told (a loud warning with the likely causes)."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, mpi_env
from mpicellpose.errors import InputError
from mpicellpose.cellpose.model_channels import check_channels, model_channels
from mpicellpose.runner.phases.finish import result_warnings
from mpicellpose.runner.phases.table import median_diameter, size_classes

DEMO = {"name": "demo", "kind": "path", "path": "x"}


def _check(n, resolved=DEMO, major=3, chosen=False, cp_channels=False):
    check_channels(n, resolved, major, chosen=chosen, cellpose_channels=cp_channels, what="stack.tif",
                   axes=("z", "c", "y", "x"), channel_axis=1)


def test_channels_that_do_not_fit_the_model_are_refused_with_the_option_that_fixes_it():
    with pytest.raises(InputError, match=r"stack.tif has 2 channels \(axis 1 of Z,C,Y,X\) but demo segments one "
                                         r"channel: choose with --channel 0"):
        _check(2)
    with pytest.raises(InputError, match="--channel chose 2 channels but demo segments one channel"):
        _check(2, chosen=True)
    _check(1)  # one channel: nothing to say
    _check(2, cp_channels=True)  # Cellpose 3's own channels=[c, n]: the user mapped them
    cyto = {"name": "cyto3", "kind": "builtin"}
    _check(2, cyto)  # a cytoplasm + nucleus model takes two
    with pytest.raises(InputError, match="cyto3 segments up to 2: choose with --channel C,N"):
        _check(3, cyto)
    _check(3, {"name": "cpsam", "kind": "builtin"}, major=4)  # Cellpose 4 takes the first three in order
    with pytest.raises(InputError, match="at most two"):
        _check(3, {"name": "/models/mine", "kind": "path"})  # a custom Cellpose 3 model: at most two
    assert model_channels({"name": "nuclei", "kind": "builtin"}, 3) == (1, 1)
    assert model_channels({"name": "/models/mine", "kind": "path"}, 3) is None


def test_a_two_channel_tiff_without_channel_is_refused_in_seconds(tmp_path):
    """The newcomer's case: an ImageJ Z,C,Y,X stack, the one-channel demo model, no --channel."""
    tifffile = pytest.importorskip("tifffile")
    img = np.random.default_rng(0).integers(0, 500, (8, 2, 32, 32)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "two.tif", img, imagej=True, metadata={"axes": "ZCYX"})
    proc = subprocess.run([sys.executable, "-m", "mpicellpose", "segment", str(tmp_path / "two.tif"),
                           str(tmp_path / "out.zarr"), "--model", "demo"], capture_output=True, text=True,
                          timeout=120, env=mpi_env(), cwd=ROOT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "two.tif has 2 channels (axis 1 of Z,C,Y,X) but demo segments one channel" in proc.stderr
    assert "--channel 0" in proc.stderr and not (tmp_path / "out.zarr").exists()


def _plan(diameter=16.0, ndim=3, kept=(0, 1)):
    return SimpleNamespace(kept=kept, eval_kwargs={"diameter": diameter}, channel_axis=None,
                           resolved_model={"name": "demo"}, normalization={"normalize": {"lowhigh": [0.0, 99.0]}},
                           shape=(64,) * ndim)


def test_no_object_and_implausible_sizes_are_warned_with_the_likely_causes():
    cfg = SimpleNamespace(backend="cellpose")
    none = result_warnings(cfg, _plan(), 0, size_classes([]))
    assert len(none) == 1 and none[0].startswith("no object was found in 2 block(s)")
    for cause in ("channel", "diameter (16 voxels", "model (demo", "normalisation (bounds [0.0, 99.0]"):
        assert cause in none[0], none[0]
    ball = lambda d: int(np.pi / 6 * d ** 3)  # noqa: E731 - voxels of a ball d across
    assert result_warnings(cfg, _plan(), 50, size_classes([ball(16)] * 50)) == []  # as told
    assert result_warnings(cfg, _plan(), 50, size_classes([ball(9)] * 40 + [ball(30)] * 10)) == []
    small = result_warnings(cfg, _plan(), 200, size_classes([40] * 200))  # noise: ~4 voxels across
    assert len(small) == 1 and "about 4 voxels across but the network was told 16" in small[0]
    assert "far smaller" in small[0]
    large = result_warnings(cfg, _plan(diameter=5.0), 3, size_classes([ball(40)] * 3))
    assert len(large) == 1 and "far larger" in large[0]
    disk = size_classes([int(np.pi / 4 * 20 ** 2)] * 9)
    assert 14 < median_diameter(disk, 2) < 28 and result_warnings(cfg, _plan(20.0, 2), 9, disk) == []
    # other backends have no diameter to compare with; a run with nothing to segment has nothing to say
    assert result_warnings(SimpleNamespace(backend="threshold"), _plan(), 0, size_classes([])) == []
    assert result_warnings(cfg, _plan(kept=()), 0, size_classes([])) == []


def test_the_demos_speed_names_the_step_that_ran_the_network():
    from mpicellpose.tools.demo import per_megavoxel

    flows = per_megavoxel({"flows": 40.0, "segment": 4.0, "total": 50.0}, 4e6)
    assert flows == {"network": 10.0, "masks": 1.0, "whole_pipeline": 12.5}
    blocks = per_megavoxel({"segment": 20.0, "total": 24.0}, 2e6)
    assert blocks == {"network_and_masks": 10.0, "whole_pipeline": 12.0}
