"""The shipped demo weights load through Cellpose and segment held-out nuclei in 3D."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mpicellpose.synthetic.metrics import match_objects
from mpicellpose.cellpose.shipped import DEMO_MODEL_NAME, demo_model_info, demo_model_path
from mpicellpose.synthetic.nuclei import make_nuclei


def test_shipped_files_and_provenance():
    path = demo_model_path()
    assert DEMO_MODEL_NAME == "demo"
    assert path.is_file(), path
    size = path.stat().st_size
    assert 5e6 < size <= 30e6
    info = demo_model_info()
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["size_bytes"] == size
    assert info["diam_mean"] == 16.0
    assert info["validation"]["val_3d"]["scores"]["f1"] >= 0.95
    assert min(info["validation"]["val_3d"]["generator"]["shape"]) >= 128
    json.dumps(info)  # plain JSON


@pytest.mark.cellpose
def test_demo_model_segments_held_out_volume():
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("cellpose.models")
    torch.set_num_threads(2)
    model = models.CellposeModel(gpu=False, pretrained_model=str(demo_model_path()))
    assert float(model.diam_mean) == 16.0
    img, gt = make_nuclei((64, 64, 64), seed=4242, gradient=(1, 0.5, 1.0))
    pred = model.eval(img, channels=[0, 0], z_axis=0, do_3D=True, diameter=16)[0]
    pred = np.asarray(pred)
    assert pred.shape == gt.shape
    r = match_objects(pred, gt, 0.5)
    assert r["f1"] >= 0.9, r
