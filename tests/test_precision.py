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


# --------------------------------------------------------------------------- the automatic choice (issue 28)
from mpicellpose.cellpose import precision as prec  # noqa: E402

EMULATED = (False, "the CPU has no AVX-512 BF16 or AMX instructions: torch emulates bfloat16")
NATIVE = (True, "the CPU has amx_bf16")


def test_cpu_capability_from_the_instructions_and_the_onednn_limit():
    assert prec.cpu_bf16_support({"avx2", "fma", "avx512f"}, {}) == EMULATED
    assert prec.cpu_bf16_support({"avx2", "avx512_bf16"}, {}) == (True, "the CPU has avx512_bf16")
    assert prec.cpu_bf16_support({"amx_bf16", "avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"})[0]
    assert prec.cpu_bf16_support({"amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "ALL"})[0]
    native, why = prec.cpu_bf16_support({"amx_bf16"}, {"DNNL_MAX_CPU_ISA": "AVX512_CORE"})
    assert not native and "DNNL_MAX_CPU_ISA=AVX512_CORE" in why
    assert prec.gpu_bf16_support((9, 0))[0] and not prec.gpu_bf16_support((7, 5))[0]


def test_cellpose4_default_becomes_float32_only_where_bfloat16_is_emulated():
    cpsam, standin = {"name": "cpsam", "kind": "builtin"}, {"name": "demo", "loader": "cp4-demo-standin"}
    p, why = prec.resolve_precision(None, 4, cpsam, {}, support=EMULATED)
    assert p == "float32" and "AVX-512 BF16" in why and "--precision bfloat16" in why
    assert prec.resolve_precision(None, 4, cpsam, {}, support=NATIVE) == (None, None)  # the model's own: bf16
    # what the user asked for is kept (and warned of when the network starts)
    assert prec.resolve_precision("bfloat16", 4, cpsam, {}, support=EMULATED) == ("bfloat16", None)
    assert prec.resolve_precision(None, 4, cpsam, {"use_bfloat16": True}, support=EMULATED) == (None, None)
    # models that run in float32 anyway: nothing to choose, no device asked
    asked = []
    ask = lambda: asked.append(1) or "cpu"  # noqa: E731
    assert prec.resolve_precision(None, 3, {"name": "cyto3"}, {}, device=ask) == (None, None)
    assert prec.resolve_precision(None, 4, standin, {}, device=ask) == (None, None)
    assert asked == []
    assert prec.model_precision(4, cpsam, {}) == "bfloat16" and prec.model_precision(4, standin, {}) == "float32"


@pytest.mark.parametrize("support,expect", [(EMULATED, "float32"), (NATIVE, None)])
def test_the_choice_reaches_settings_fingerprint_and_plan(tmp_path, monkeypatch, capsys, support, expect):
    from mpicellpose import cli
    from mpicellpose.runner.phases import plan as plan_mod

    models = tmp_path / "models"
    models.mkdir()
    with open(models / "cpsam", "wb") as f:  # cached cpsam weights (sparse file: no disk used)
        f.truncate(4096)
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(models))
    monkeypatch.setattr("mpicellpose.cellpose.models.sha256_file", lambda path: "0" * 64)
    monkeypatch.setattr(plan_mod, "cellpose_version", lambda: (4, "4.2.1.1"))
    monkeypatch.setattr(prec, "bf16_support", lambda device=None: support)
    cfg = RunConfig(input=np.zeros((32, 32), np.uint16), blocksize=16, model_kwargs={"pretrained_model": "cpsam"})
    vol = plan_mod.open_volume(cfg)
    s = plan_mod.resolve_settings(cfg, vol)
    assert s.precision == expect and (s.precision_why is not None) == (expect is not None)
    assert plan_mod.fingerprint_of(cfg, vol, s, 2).get("precision") == expect
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    numpy_array_to_zarr(tmp_path / "in.zarr", np.zeros((32, 32), np.uint16), (16, 16))
    monkeypatch.setattr("mpicellpose.cellpose.models.cellpose_version", lambda: (4, "4.2.1.1"))
    assert cli.main(["plan", str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"), "--model", "cpsam",
                     "--blocksize", "16"]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("network precision")]
    assert len(line) == 1, out
    assert line[0].startswith(f"network precision {expect or 'bfloat16'}")
    assert ("emulated" if not support[0] else "native") in line[0]


def test_bfloat16_where_emulated_is_warned_with_a_measured_slowdown(monkeypatch, caplog):
    monkeypatch.setattr(prec, "bf16_support", lambda device=None: EMULATED)
    monkeypatch.setattr(prec, "measured_bf16_slowdown", lambda threads=1: 42.0)
    monkeypatch.setattr(prec, "_WARNED", set())
    with caplog.at_level("WARNING", logger="mpicellpose"):
        msg = prec.warn_if_emulated("bfloat16", "cpu")
        assert prec.warn_if_emulated("bfloat16", "cpu") is None  # once per process and device
    assert "42x slower" in msg and "--precision float32" in msg
    assert sum("42x slower" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(prec, "bf16_support", lambda device=None: NATIVE)
    monkeypatch.setattr(prec, "_WARNED", set())
    assert prec.warn_if_emulated("bfloat16", "cpu") is None and prec.warn_if_emulated("float32", "cpu") is None


def test_measured_slowdown_is_a_real_measurement():
    pytest.importorskip("torch")
    ratio = prec.measured_bf16_slowdown()
    native = prec.cpu_bf16_support()[0]
    assert ratio > 0
    if not native:  # emulated bfloat16 is always much slower than float32
        assert ratio > 3, ratio


def test_info_says_whether_the_cpu_computes_bfloat16(monkeypatch, capsys):
    from mpicellpose.tools import info

    for support, word in ((EMULATED, "emulated"), (NATIVE, "native")):
        monkeypatch.setattr(info, "cpu_bf16_support", lambda s=support: s)
        report = info.format_report(info.collect_info(None, "cpu"))
        line = [ln.strip() for ln in report.splitlines() if "CPU bfloat16" in ln]
        assert line == [f"CPU bfloat16: {word} ({support[1]})"
                        + ("; Cellpose 4 runs in float32 on this CPU unless told otherwise" if word == "emulated"
                           else "")], report
