"""--precision and --batch-size (issue 12): the network in half precision, real Cellpose 3.

float32 leaves Cellpose's code path alone; bfloat16 runs the forward pass under autocast and
hands float32 back, so the labels stay close to float32's (measured: docs/pipeline.md).
"""
from __future__ import annotations

import numpy as np
import pytest

from mpicellpose.config import RunConfig, from_mapping
from mpicellpose.errors import ConfigError
from mpicellpose.synthetic.metrics import match_objects
from mpicellpose.cellpose.precision import check_precision, cp4_model_kwargs
from mpicellpose.synthetic.nuclei import make_nuclei


def test_bad_precision_and_batch_size_are_refused_with_one_message():
    with pytest.raises(ConfigError, match="precision must be"):
        RunConfig(input=np.zeros((8, 8)), precision="half")
    with pytest.raises(ConfigError, match="batch_size must be a whole number"):
        from_mapping({"input": "x.zarr", "batch_size": 0})
    with pytest.raises(ConfigError, match="batch_size must be a whole number"):
        RunConfig(input=np.zeros((8, 8)), eval_kwargs={"batch_size": 2.5})
    assert from_mapping({"input": "x.zarr", "batch_size": 4}).eval_kwargs == {"batch_size": 4}
    with pytest.raises(ConfigError, match="Cellpose 4 runs its network in bfloat16 or float32"):
        check_precision("float16", 4)
    check_precision("float16", 3)
    assert cp4_model_kwargs({}, "float32") == {"use_bfloat16": False}
    assert cp4_model_kwargs({"use_bfloat16": True}, "bfloat16") == {"use_bfloat16": True}
    assert cp4_model_kwargs({"x": 1}, None) == {"x": 1}
    with pytest.raises(ConfigError, match="contradicts model_kwargs use_bfloat16"):
        cp4_model_kwargs({"use_bfloat16": True}, "float32")


def test_precision_is_part_of_the_fingerprint():
    from mpicellpose.runner.phases.plan import fingerprint_of, open_volume, resolve_settings, run_id_of

    img = np.zeros((32, 32), np.uint16)
    ids = []
    for p in (None, "bfloat16", "float32"):
        cfg = RunConfig(input=img, blocksize=16, model_kwargs={"pretrained_model": "demo"}, precision=p)
        vol = open_volume(cfg)
        ids.append(run_id_of(fingerprint_of(cfg, vol, resolve_settings(cfg, vol), 2)))
    assert len(set(ids)) == 3  # a resume in another precision is refused, not mixed


@pytest.fixture(scope="module")
def image2d():
    img, truth = make_nuclei((192, 192), seed=5, density=0.3)
    return img, truth


def test_bfloat16_network_agrees_with_float32(image2d):
    pytest.importorskip("cellpose")
    import torch

    from mpicellpose.cellpose.segmenter import CellposeSegmenter

    img, truth = image2d
    kw = dict(resolved=None, device="cpu", threads=1, ndim=2)
    full = CellposeSegmenter({"pretrained_model": "demo"}, {}, **kw)
    half = CellposeSegmenter({"pretrained_model": "demo"}, {}, precision="bfloat16", **kw)
    assert getattr(half.model.net, "_mpicellpose_precision", None) == "bfloat16"
    assert getattr(full.model.net, "_mpicellpose_precision", None) is None
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 2, 64, 64)).astype(np.float32))
    with torch.no_grad():
        y32, y16 = full.model.net(x)[0], half.model.net(x)[0]
    assert y16.dtype == torch.float32 and y16.shape == y32.shape
    rel = float((y16 - y32).abs().mean() / y32.abs().mean())
    assert 0 < rel < 0.03, rel  # it did run in bfloat16, and close to float32
    a, b = full.segment(img), half.segment(img)
    m = match_objects(a, b, 0.5)
    assert a.max() > 20 and m["f1"] >= 0.95, m
    # against the truth, half precision is as good as full (within one object in a hundred)
    assert match_objects(truth, b, 0.5)["f1"] >= match_objects(truth, a, 0.5)["f1"] - 0.02
