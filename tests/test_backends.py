"""Backends: Cellpose argument translation (3.x and 4.x), model resolution, OOM retry."""
import numpy as np
import pytest

from mpicellpose.cellpose import cellpose4 as c4
from mpicellpose.cellpose import models as md
from mpicellpose.cellpose import segmenter as sg
from mpicellpose.errors import ConfigError, ModelNotFoundError


def test_translate_v3_keeps_arguments_and_defaults_channels():
    mk, ek, ignored = sg.translate_kwargs({"model_type": "cyto3"}, {"diameter": 20, "interp": True}, 3)
    assert mk == {"model_type": "cyto3"} and ek["channels"] == [0, 0] and ek["interp"] is True
    assert ignored == []


def test_translate_v4_drops_v3_only_arguments_and_maps_model_type():
    user_mk = {"model_type": "cpsam", "nchan": 2}
    user_ek = {"channels": [1, 2], "interp": False, "bsize": 256, "diameter": 30, "flow_threshold": 0.5}
    mk, ek, ignored = sg.translate_kwargs(user_mk, user_ek, 4)
    assert mk == {"pretrained_model": "cpsam"}
    assert ek == {"bsize": 256, "diameter": 30, "flow_threshold": 0.5}  # bsize 256 passes; others: see below
    assert "eval_kwargs['channels']" in ignored and "eval_kwargs['interp']" in ignored
    assert "model_kwargs['nchan']" in ignored
    # the caller's dicts are untouched
    assert user_mk == {"model_type": "cpsam", "nchan": 2} and "channels" in user_ek


def test_resolve_demo_path_and_random(tmp_path):
    res = md.resolve_model({"pretrained_model": "demo"})
    assert res["kind"] == "path" and res["name"] == "demo" and len(res["sha256"]) == 64
    w = tmp_path / "my_model"
    w.write_bytes(b"weights")
    res = md.resolve_model({"pretrained_model": str(w)})
    assert res["path"] == str(w.resolve())
    assert md.resolve_model({"pretrained_model": False})["kind"] == "random"


def test_resolve_builtin_from_local_models_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    (tmp_path / "nucleitorch_0").write_bytes(b"x")
    res = md.resolve_model({"model_type": "nuclei"})
    assert res["kind"] == "builtin" and res["path"] == str(tmp_path / "nucleitorch_0")


def test_builtin_missing_offline_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    monkeypatch.setattr(md, "_network_ok", lambda *a, **k: False)
    with pytest.raises(ModelNotFoundError) as e:
        md.resolve_model({"pretrained_model": "cyto3"})
    msg = str(e.value)
    assert str(tmp_path / "cyto3") in msg and "CELLPOSE_LOCAL_MODELS_PATH" in msg and "--model PATH" in msg


def test_missing_path_never_falls_back(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        md.resolve_model({"pretrained_model": str(tmp_path / "w.pth")})
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        md.resolve_model({"pretrained_model": str(tmp_path)})
    with pytest.raises(ModelNotFoundError, match="unknown model 'cytoX'"):
        md.resolve_model({"pretrained_model": "cytoX"})


def test_eval_kwargs_checked_against_installed_signature():
    sg.check_eval_kwargs({"diameter": 30, "flow_threshold": 0.4, "channels": [0, 0]})
    with pytest.raises(ConfigError, match=r"unknown eval_kwargs key\(s\) \['diamter'\]"):
        sg.check_eval_kwargs({"diamter": 30})


class _FakeModel:
    def __init__(self, fail_above):
        self.fail_above, self.calls = fail_above, []

    def eval(self, image, **kw):
        self.calls.append(kw["batch_size"])
        if kw["batch_size"] > self.fail_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.ones(image.shape[:2], np.int32), None, None


def _segmenter(model):
    seg = object.__new__(sg.CellposeSegmenter)
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


def test_demo_model_under_cellpose4_is_the_stand_in_and_cp3_name_refused(monkeypatch):
    # was: 'demo' refused under Cellpose 4; now 'demo' is the shipped Cellpose 4 stand-in there
    monkeypatch.setattr(md, "cellpose_version", lambda: (4, "4.2.1.1"))
    with pytest.raises(ConfigError, match=r"install 'cellpose>=3.1.1,<4'"):
        md.resolve_model({"pretrained_model": "demo_nuclei_v1"})
    res = md.resolve_model({"pretrained_model": "demo"})
    assert res["loader"] == "cp4-demo-standin" and res["path"].endswith("demo_cp4_v1")


def test_demo_under_cellpose3_is_the_cp3_model_and_cp4_name_refused(monkeypatch):
    monkeypatch.setattr(md, "cellpose_version", lambda: (3, "3.1.1.3"))
    res = md.resolve_model({"pretrained_model": "demo"})
    assert "loader" not in res and res["path"].endswith("demo_nuclei_v1")
    with pytest.raises(ConfigError, match=r"Cellpose 4 model"):
        md.resolve_model({"pretrained_model": "demo_cp4_v1"})


def test_shipped_cp4_stand_in_matches_its_provenance():
    from mpicellpose.cellpose import shipped
    from mpicellpose.volumes.storage import sha256_file

    path, info = shipped.demo_cp4_model_path(), shipped.demo_cp4_model_info()
    assert path.stat().st_size == info["size_bytes"] < 5_000_000 and sha256_file(path) == info["sha256"]
    assert info["training"]["seed"] == 0 and info["native_diameter"] == 16.0


@pytest.mark.parametrize("bsize", [224, 384, None, 256])
def test_translate_v4_bsize_only_256(bsize):
    if bsize in (None, 256):
        assert sg.translate_kwargs({}, {"bsize": bsize}, 4)[1] == {"bsize": bsize}
        return
    with pytest.raises(ConfigError, match=r"bsize=%d: .*256x256 tiles only" % bsize):
        sg.translate_kwargs({}, {"bsize": bsize}, 4)
    assert sg.translate_kwargs({}, {"bsize": bsize}, 3)[1]["bsize"] == bsize  # Cellpose 3: any tile size


def test_translate_use_bfloat16_dropped_under_v3_kept_under_v4():
    mk, _, ignored = sg.translate_kwargs({"use_bfloat16": False}, {}, 3)
    assert mk == {} and any("use_bfloat16" in i for i in ignored)
    assert sg.translate_kwargs({"use_bfloat16": False}, {}, 4)[0] == {"use_bfloat16": False}


def test_cp4_normalize_is_always_a_full_dict():
    for user in (None, True, False, {"lowhigh": [1, 5]}, {"normalize": False, "percentile": [2, 98]}):
        ek = {} if user is None else {"normalize": user}
        norm = c4.cp4_normalize(ek)["normalize"]
        assert set(norm) == set(c4.CP4_NORMALIZE_DEFAULTS)
        assert norm["normalize"] is (user is not False and not (isinstance(user, dict) and user.get("normalize") is False))
    assert c4.cp4_normalize({"normalize": {"lowhigh": [1, 5]}})["normalize"]["lowhigh"] == [1, 5]
    out = c4.cp4_normalize({"invert": True, "diameter": 16})
    assert out["normalize"]["invert"] is True and "invert" not in out and out["diameter"] == 16


def test_cellpose4_import_errors_name_what_to_install(monkeypatch):
    monkeypatch.setattr(md, "cellpose_version", lambda: (4, "4.2.1.1"))
    monkeypatch.setattr(md, "_torchvision_for_torch", lambda: "torchvision==0.28.*")
    err = md._cellpose_import_error(ModuleNotFoundError("No module named 'torchvision'", name="torchvision"))
    msg = str(err)
    assert "\n" not in msg and "needs torchvision" in msg and "pip install 'torchvision==0.28.*'" in msg
    err = md._cellpose_import_error(RuntimeError("operator torchvision::nms does not exist"))
    assert "compiled ops do not load" in str(err) and "torchvision==0.28.*" in str(err)
    monkeypatch.setattr(md, "cellpose_version", lambda: (None, None))
    assert "mpicellpose[cellpose]" in str(md._cellpose_import_error(ImportError("x")))
