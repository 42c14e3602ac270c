"""Backends: Cellpose argument translation (3.x and 4.x), model resolution, OOM retry."""
import numpy as np
import pytest

from mpicellpose import backends as bk
from mpicellpose.errors import ConfigError, ModelNotFoundError


def test_translate_v3_keeps_arguments_and_defaults_channels():
    mk, ek, ignored = bk.translate_kwargs({"model_type": "cyto3"}, {"diameter": 20, "interp": True}, 3)
    assert mk == {"model_type": "cyto3"} and ek["channels"] == [0, 0] and ek["interp"] is True
    assert ignored == []


def test_translate_v4_drops_v3_only_arguments_and_maps_model_type():
    user_mk = {"model_type": "cpsam", "nchan": 2}
    user_ek = {"channels": [1, 2], "interp": False, "bsize": 224, "diameter": 30, "flow_threshold": 0.5}
    mk, ek, ignored = bk.translate_kwargs(user_mk, user_ek, 4)
    assert mk == {"pretrained_model": "cpsam"}
    assert ek == {"diameter": 30, "flow_threshold": 0.5}
    assert "eval_kwargs['channels']" in ignored and "eval_kwargs['interp']" in ignored
    assert "model_kwargs['nchan']" in ignored and any("bsize" in i for i in ignored)
    # the caller's dicts are untouched
    assert user_mk == {"model_type": "cpsam", "nchan": 2} and "channels" in user_ek


def test_resolve_demo_path_and_random(tmp_path):
    res = bk.resolve_model({"pretrained_model": "demo"})
    assert res["kind"] == "path" and res["name"] == "demo" and len(res["sha256"]) == 64
    w = tmp_path / "my_model"
    w.write_bytes(b"weights")
    res = bk.resolve_model({"pretrained_model": str(w)})
    assert res["path"] == str(w.resolve())
    assert bk.resolve_model({"pretrained_model": False})["kind"] == "random"


def test_resolve_builtin_from_local_models_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    (tmp_path / "nucleitorch_0").write_bytes(b"x")
    res = bk.resolve_model({"model_type": "nuclei"})
    assert res["kind"] == "builtin" and res["path"] == str(tmp_path / "nucleitorch_0")


def test_builtin_missing_offline_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    monkeypatch.setattr(bk, "_network_ok", lambda *a, **k: False)
    with pytest.raises(ModelNotFoundError) as e:
        bk.resolve_model({"pretrained_model": "cyto3"})
    msg = str(e.value)
    assert str(tmp_path / "cyto3") in msg and "CELLPOSE_LOCAL_MODELS_PATH" in msg and "--model PATH" in msg


def test_missing_path_never_falls_back(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        bk.resolve_model({"pretrained_model": str(tmp_path / "w.pth")})
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        bk.resolve_model({"pretrained_model": str(tmp_path)})
    with pytest.raises(ModelNotFoundError, match="unknown model 'cytoX'"):
        bk.resolve_model({"pretrained_model": "cytoX"})


def test_eval_kwargs_checked_against_installed_signature():
    bk.check_eval_kwargs({"diameter": 30, "flow_threshold": 0.4, "channels": [0, 0]})
    with pytest.raises(ConfigError, match=r"unknown eval_kwargs key\(s\) \['diamter'\]"):
        bk.check_eval_kwargs({"diamter": 30})


class _FakeModel:
    def __init__(self, fail_above):
        self.fail_above, self.calls = fail_above, []

    def eval(self, image, **kw):
        self.calls.append(kw["batch_size"])
        if kw["batch_size"] > self.fail_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.ones(image.shape[:2], np.int32), None, None


def _segmenter(model):
    seg = object.__new__(bk.CellposeSegmenter)
    seg.model, seg.ndim, seg.eval_kwargs = model, 2, {"batch_size": 16}
    return seg


def test_out_of_memory_retries_with_smaller_batches():
    model = _FakeModel(fail_above=2)
    out = _segmenter(model).segment(np.zeros((8, 8), np.float32))
    assert out.shape == (8, 8) and model.calls == [16, 8, 4, 2]
    model = _FakeModel(fail_above=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        _segmenter(model).segment(np.zeros((8, 8), np.float32))
    assert model.calls[-1] == 1


def test_other_errors_are_not_retried():
    class Broken:
        calls = 0

        def eval(self, image, **kw):
            Broken.calls += 1
            raise ValueError("bad input")

    with pytest.raises(ValueError):
        _segmenter(Broken()).segment(np.zeros((4, 4)))
    assert Broken.calls == 1


def test_demo_model_under_cellpose4_is_refused_with_a_hint(monkeypatch):
    monkeypatch.setattr(bk, "cellpose_version", lambda: (4, "4.2.1.1"))
    with pytest.raises(ConfigError, match=r"install 'cellpose>=3.1.1,<4'"):
        bk.resolve_model({"pretrained_model": "demo"})
