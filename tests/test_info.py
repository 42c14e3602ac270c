"""``mpicellpose info``: in-process, without torch, and under ``mpiexec -n 2``."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mpicellpose.tools import info
from mpicellpose.cli import info as info_cli

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def find_mpiexec():
    """The venv's mpiexec (next to sys.executable), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    return shutil.which("mpiexec")


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for key in list(env):  # a scheduler's variables would confuse mpiexec
        if key.startswith(("SLURM_", "LSB_", "LSF_", "PMI_", "PMIX_", "OMPI_")):
            del env[key]
    return env


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    info_cli.register(sub)
    return parser.parse_args(["info", *argv])


def test_info_in_process_text(capsys):
    args = _parse([])
    assert args.func is info_cli.main
    assert info_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "mpicellpose support information" in out
    for word in ("numpy", "scipy", "zarr", "numcodecs", "mpi4py", "MPI library", "torch",
                 "CUDA (torch)", "cellpose", "tifffile", "rank    0"):
        assert word in out
    assert "ranks per node" in out


def test_info_in_process_json(capsys):
    assert info_cli.main(_parse(["--json"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"versions", "torch", "mpi", "ranks", "nodes"}
    assert len(data["ranks"]) == 1
    rank = data["ranks"][0]
    assert rank["rank"] == 0 and rank["device"] in ("cpu", "cuda:0", "mps")
    assert data["versions"]["mpicellpose"]
    assert data["mpi"]["cuda_aware"] in ("yes", "no", "unknown")
    assert data["nodes"][0]["ranks"] == 1


def test_info_device_override(capsys):
    assert info_cli.main(_parse(["--json", "--device", "cpu"])) == 0
    rank = json.loads(capsys.readouterr().out)["ranks"][0]
    assert rank["device"] == "cpu" and "requested" in rank["reason"]


def test_info_bad_device_is_reported_not_raised(capsys):
    assert info_cli.main(_parse(["--json", "--device", "cuda:99"])) == 0
    rank = json.loads(capsys.readouterr().out)["ranks"][0]
    assert rank["device"] == "error"


def test_info_without_torch_and_cellpose(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    real_version = info.metadata.version

    def version(dist):
        if dist in ("torch", "cellpose"):
            raise info.metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(info.metadata, "version", version)
    assert info_cli.main(_parse([])) == 0
    out = capsys.readouterr().out
    assert "torch         not installed" in out
    assert "cellpose      not installed" in out
    assert "CUDA (torch)  not installed" in out
    assert info_cli.main(_parse(["--json"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["versions"]["torch"] == "not installed"
    assert data["versions"]["cellpose_major"] == "not installed"
    assert data["ranks"][0]["device"] == "cpu"


def test_info_with_fake_gpus(monkeypatch, capsys):
    torch = types.ModuleType("torch")
    torch.version = types.SimpleNamespace(cuda="12.4")
    torch.cuda = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 2,
        get_device_properties=lambda i: types.SimpleNamespace(name="H100", total_memory=80 * 2**30))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert info_cli.main(_parse([])) == 0
    out = capsys.readouterr().out
    assert "CUDA (torch)  12.4" in out
    assert "sees 2 GPU(s) [CUDA_VISIBLE_DEVICES=4,5] -> cuda:0" in out
    assert "cuda:1 H100 80 GiB" in out


@pytest.mark.parametrize("env,expected", [
    ({"MPICH_GPU_SUPPORT_ENABLED": "1"}, "yes"),
    ({"MPICH_GPU_SUPPORT_ENABLED": "0"}, "no"),
    ({"MV2_USE_CUDA": "1"}, "yes"),
    ({"OMPI_MCA_opal_cuda_support": "true"}, "yes"),
    ({"UCX_TLS": "rc,cuda_copy,cuda_ipc"}, "yes"),
    ({}, "unknown"),
])
def test_cuda_aware_heuristics(env, expected, monkeypatch):
    MPI = pytest.importorskip("mpi4py.MPI")
    for name in ("Query_cuda_support", "MPIX_Query_cuda_support"):
        if hasattr(MPI, name):
            monkeypatch.delattr(MPI, name)
    assert info.cuda_aware_mpi(env)[0] == expected


def test_cuda_aware_prefers_mpi4py_query(monkeypatch):
    MPI = pytest.importorskip("mpi4py.MPI")
    monkeypatch.setattr(MPI, "Query_cuda_support", lambda: True, raising=False)
    assert info.cuda_aware_mpi({}) == ("yes", "mpi4py MPI.Query_cuda_support()")


def test_cellpose_major_line(monkeypatch):
    real_version = info.metadata.version
    monkeypatch.setattr(info.metadata, "version",
                        lambda d: "4.0.1" if d == "cellpose" else real_version(d))
    assert info.collect_versions()["cellpose_major"].startswith("4.x")


def test_format_report_marks_uneven_nodes():
    data = info.collect_info(None)
    data["ranks"] = [dict(data["ranks"][0], rank=i, hostname=h)
                     for i, h in enumerate(["a", "a", "b"])]
    data["nodes"] = [{"hostname": "a", "ranks": 2, "rank_ids": [0, 1]},
                     {"hostname": "b", "ranks": 1, "rank_ids": [2]}]
    text = info.format_report(data)
    assert "3 rank(s) on 2 node(s), ranks per node: a=2, b=1  (uneven)" in text


# --------------------------------------------------------------------------------------
# under mpiexec
# --------------------------------------------------------------------------------------
def _run_mpi(module_args, n=2):
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to sys.executable nor on PATH")
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", *module_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=subprocess_env(), cwd=str(REPO))


@pytest.mark.mpi
def test_info_module_under_mpiexec_json():
    """``python -m mpi4py -m mpicellpose.tools.info --json`` (works even if the CLI is broken)."""
    proc = _run_mpi(["mpicellpose.tools.info", "--json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # only rank 0 prints
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    assert data["mpi"]["size"] == 2
    assert sorted(r["local_rank"] for r in data["ranks"]) == [0, 1]
    assert all(r["local_size"] == 2 for r in data["ranks"])
    assert data["nodes"][0]["ranks"] == 2


@pytest.mark.mpi
def test_cli_info_under_mpiexec_text():
    """The real CLI: ``python -m mpi4py -m mpicellpose info``."""
    proc = _run_mpi(["mpicellpose", "info"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("mpicellpose support information") == 1
    assert "rank    0" in proc.stdout and "rank    1" in proc.stdout
    assert "2 rank(s) on 1 node(s)" in proc.stdout


@pytest.mark.mpi
def test_cli_info_under_mpiexec_json():
    proc = _run_mpi(["mpicellpose", "info", "--json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["ranks"]) == 2


def test_info_is_registered_in_cli():
    spec = importlib.util.find_spec("mpicellpose.cli")
    assert spec is not None
    from mpicellpose import cli
    assert "mpicellpose.cli.info" in cli._SUBCOMMAND_MODULES
    assert "mpicellpose.cli.batch" in cli._SUBCOMMAND_MODULES
