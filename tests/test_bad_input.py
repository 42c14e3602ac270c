"""Bad input: a clear message naming the problem, before heavy work, reported once,
every rank exiting cleanly; and nothing the user had is lost (issue 5)."""
import json
import os

import numpy as np
import pytest
import zarr

import cases
from conftest import run_mpi
from mpicellpose import cli, distributed_eval
from mpicellpose.grid import stitch
from mpicellpose.volumes.storage import numpy_array_to_zarr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    img = cases.blobs((20, 24, 22), 31)
    numpy_array_to_zarr(d / "in.zarr", img, 8)
    numpy_array_to_zarr(d / "in2d.zarr", img[0], 8)
    numpy_array_to_zarr(d / "one_d.zarr", np.arange(50, dtype=np.uint16), 10)
    numpy_array_to_zarr(d / "six_d.zarr", np.zeros((2, 2, 2, 2, 2, 2), np.uint8), 2)
    numpy_array_to_zarr(d / "empty_axis.zarr", np.zeros((0, 10, 10), np.uint8), 5)
    numpy_array_to_zarr(d / "complex.zarr", np.zeros((8, 8, 8), np.complex64), 4)
    f = img.astype(np.float32)
    f[3, 4, 5:10] = np.nan
    numpy_array_to_zarr(d / "nan.zarr", f, 8)
    numpy_array_to_zarr(d / "bigmask.zarr", np.ones((40, 24, 22), bool), 8)
    g = zarr.open_group(str(d / "group.zarr"), mode="w")
    g.create_array("raw", shape=img.shape, dtype=img.dtype, chunks=(8, 8, 8))[...] = img
    (d / "notzarr.txt").write_text("hello")
    numpy_array_to_zarr(d / "foreign.zarr", np.ones((5, 5), np.uint8), 5)
    return d


T = ["--backend", "threshold", "--threshold", "100"]

CASES = [
    ("missing input", ["{d}/nope.zarr", "{o}"] + T, "input '{d}/nope.zarr' does not exist"),
    ("not an array", ["{d}/notzarr.txt", "{o}"] + T, "cannot tell what kind of input '{d}/notzarr.txt' is"),
    ("group without dataset", ["{d}/group.zarr", "{o}"] + T,
     "is not an OME-Zarr image (no 'multiscales' metadata); choose an array with dataset (--dataset): arrays ['raw']"),
    ("group, wrong dataset", ["{d}/group.zarr", "{o}", "--dataset", "nope"] + T, "has no dataset 'nope'"),
    ("1-D input", ["{d}/one_d.zarr", "{o}"] + T, "input has 1 axes (50,); mpicellpose segments 2D or 3D volumes"),
    ("6-D input", ["{d}/six_d.zarr", "{o}"] + T, "input has 6 axes"),
    ("zero-sized axis", ["{d}/empty_axis.zarr", "{o}"] + T, "has a zero-sized axis"),
    ("blocksize wrong length", ["{d}/in.zarr", "{o}", "--blocksize", "8,8"] + T,
     "blocksize has 2 values (8, 8) but the volume has 3 spatial axes"),
    ("blocksize zero", ["{d}/in.zarr", "{o}", "--blocksize", "0"] + T, "blocksize must be >= 1 on every axis, got (0, 0, 0)"),
    ("blocksize not a number", ["{d}/in.zarr", "{o}", "--blocksize", "a,b"] + T, "blocksize must be integers"),
    ("negative overlap", ["{d}/in.zarr", "{o}", "--overlap", "-2"] + T, "overlap must be >= 0 on every axis"),
    ("mask larger than volume", ["{d}/in.zarr", "{o}", "--mask", "{d}/bigmask.zarr"] + T,
     "mask shape (40, 24, 22) cannot map onto volume shape (20, 24, 22)"),
    ("mask of other dimensionality", ["{d}/in.zarr", "{o}", "--mask", "{d}/in2d.zarr"] + T, "mask has 2 axes"),
    ("mask missing", ["{d}/in.zarr", "{o}", "--mask", "{d}/nomask.zarr"] + T, "mask '{d}/nomask.zarr' does not exist"),
    ("output is the input", ["{d}/in.zarr", "{d}/in.zarr"] + T, "is the same path as the input"),
    ("output exists, not ours", ["{d}/in.zarr", "{d}/foreign.zarr"] + T,
     "exists and was not made by mpicellpose; pass --overwrite"),
    ("read-only output location", ["{d}/in.zarr", "/sys/mpicellpose-out.zarr"] + T, "is not writable"),
    ("complex dtype", ["{d}/complex.zarr", "{o}"] + T, "input dtype complex64 is not supported"),
    ("NaN in float input", ["{d}/nan.zarr", "{o}"] + T, "contains 5 NaN/inf voxels"),
    ("channel axis out of range", ["{d}/in.zarr", "{o}", "--channel-axis", "5"] + T,
     "channel_axis 5 is out of range for an input with 3 axes"),
    ("threshold missing", ["{d}/in.zarr", "{o}", "--backend", "threshold"], "--backend threshold needs --threshold T"),
    ("iou without overlap", ["{d}/in.zarr", "{o}", "--stitch", "iou", "--overlap", "0"] + T,
     "stitch='iou' needs an overlap of at least 1 voxel"),
    ("iou threshold out of range", ["{d}/in.zarr", "{o}", "--iou-threshold", "2"] + T, "iou_threshold must be in (0, 1]"),
    ("missing model file", ["{d}/in.zarr", "{o}", "--model", "{d}/weights.pth"], "model file '{d}/weights.pth' does not exist"),
    ("unknown model name", ["{d}/in.zarr", "{o}", "--model", "cyto99"], "unknown model 'cyto99'"),
    ("built-in model offline", ["{d}/in.zarr", "{o}", "--model", "nuclei"],
     "Cellpose model 'nuclei': weights not found at {d}/models/nucleitorch_0"),
    ("unknown eval_kwargs key", ["{d}/in.zarr", "{o}", "--model", "demo", "--eval-kwargs", '{{"flow_thresh": 0.4}}'],
     "unknown eval_kwargs key(s) ['flow_thresh']"),
    ("non-positive diameter", ["{d}/in.zarr", "{o}", "--model", "demo", "--diameter", "-3"],
     "diameter must be a positive number, got -3.0"),
]


def fmt(x, d, o):
    return x.format(d=d, o=o)


# a wrong option value is a usage error (exit 2, as an unknown flag is); a wrong file, an error (exit 1)
USAGE = {"blocksize wrong length", "blocksize zero", "blocksize not a number", "negative overlap",
         "mask larger than volume", "mask of other dimensionality", "channel axis out of range", "threshold missing",
         "iou without overlap", "iou threshold out of range", "unknown eval_kwargs key", "non-positive diameter"}


def exit_code(name):
    return 2 if name in USAGE else 1


@pytest.mark.parametrize("name,args,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_input_message(data, tmp_path, capsys, monkeypatch, name, args, msg):
    if name == "read-only output location" and not os.path.isdir("/sys"):
        pytest.skip("no /sys")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(data / "models"))
    out = tmp_path / "out.zarr"
    rc = cli.main(["segment"] + [fmt(a, data, out) for a in args])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("mpicellpose: error:")]
    assert rc == exit_code(name), err
    assert len(lines) == 1, err
    assert fmt(msg, data, out) in lines[0], lines[0]
    if name != "NaN in float input":  # detected before any block ran: nothing written
        assert not out.exists()


def test_foreign_output_untouched_then_overwrite(data, tmp_path, capsys):
    target = tmp_path / "foreign.zarr"
    numpy_array_to_zarr(target, np.full((5, 5), 7, np.uint8), 5)
    rc = cli.main(["segment", str(data / "in.zarr"), str(target)] + T)
    assert rc == 1 and "pass --overwrite" in capsys.readouterr().err
    assert (zarr.open(str(target), mode="r")[...] == 7).all()  # not modified
    rc = cli.main(["segment", str(data / "in.zarr"), str(target), "--overwrite"] + T)
    assert rc == 0 and zarr.open(str(target), mode="r").shape == (20, 24, 22)


def test_changed_configuration_refused_then_restart(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.zarr"
    monkeypatch.setenv("MPICELLPOSE_FAULT", "segment:0:raise:2")
    assert cli.main(["segment", str(data / "in.zarr"), str(out), "--blocksize", "8"] + T) == 1
    monkeypatch.delenv("MPICELLPOSE_FAULT")
    capsys.readouterr()
    rc = cli.main(["segment", str(data / "in.zarr"), str(out), "--blocksize", "10"] + T)
    err = capsys.readouterr().err
    assert rc == 1 and "holds a run with another configuration (blocksize: [8, 8, 8] -> [10, 10, 10]" in err
    assert "--restart" in err
    assert cli.main(["segment", str(data / "in.zarr"), str(out), "--blocksize", "10", "--restart"] + T) == 0


def test_uint64_when_objects_exceed_uint32(tmp_path, monkeypatch):
    monkeypatch.setattr(stitch, "MAX_UINT32_LABEL", 10)
    img = cases.blobs((30, 30, 30), 32)
    lab, boxes = distributed_eval(img, 10, tmp_path / "u.zarr", backend="threshold", backend_kwargs={"threshold": 100})
    assert lab.dtype == np.uint64 and len(boxes) > 10
    assert lab[...].max() == len(boxes)


def test_bad_json_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["segment", "a", "b", "--eval-kwargs", "{nope"])
    assert e.value.code == 2 and "not valid JSON" in capsys.readouterr().err


@pytest.mark.mpi
@pytest.mark.parametrize("idx", [0, 7, 11, 15])
def test_bad_input_reported_once_under_mpi(data, tmp_path, idx):
    name, args, msg = CASES[idx]
    out = tmp_path / "out.zarr"
    proc = run_mpi(2, ["-m", "mpicellpose", "segment"] + [fmt(a, data, out) for a in args], check=False, timeout=90)
    assert proc.returncode == exit_code(name), proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("mpicellpose: error:")]
    assert len(lines) == 1 and fmt(msg, data, out) in lines[0], proc.stderr
