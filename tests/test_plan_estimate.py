"""`mpicellpose plan` (issue 17, point 4): a memory estimate within 1.5x of the measured peak of
a one-rank run, printed once whatever the launcher, with the launcher's rank count."""
import json
import os
import subprocess
import sys

import pytest

from conftest import mpi_env, run_mpi
from mpicellpose import cli
from mpicellpose.tools.dryrun import memory_estimate
from mpicellpose.volumes.storage import numpy_array_to_zarr
from mpicellpose.synthetic.nuclei import make_nuclei

# runs `mpicellpose ARGS...` in this interpreter and prints its peak resident memory at exit:
# VmHWM (this address space only; ru_maxrss would also count the parent's memory, which Linux
# carries over from fork into the exec'ed child), else ru_maxrss where there is no /proc
PEAK = ("import atexit, re, resource, runpy, sys\n"
        "def peak():\n"
        "    try:\n"
        "        return int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "    except (OSError, AttributeError):\n"
        "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "atexit.register(lambda: sys.stderr.write('PEAK_RSS_KB %d\\n' % peak()))\n"
        "sys.argv = ['mpicellpose'] + sys.argv[1:]\n"
        "runpy.run_module('mpicellpose', run_name='__main__')\n")


def peak_rss(args, tmp_path) -> int:
    env = mpi_env()
    env.pop("PMI_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", PEAK] + [str(a) for a in args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.rsplit("PEAK_RSS_KB ", 1)[1].split()[0]) * 1024


def planned(args, capsys) -> dict:
    assert cli.main(["plan"] + [str(a) for a in args] + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def check_estimate(args, tmp_path, capsys):
    report = planned(args, capsys)
    measured = peak_rss(["segment"] + args, tmp_path)
    estimate = report["memory_per_rank_estimate_bytes"]
    ratio = estimate / measured
    print(f"estimate {estimate / 2**20:.0f} MiB, measured peak {measured / 2**20:.0f} MiB, ratio {ratio:.2f}")
    assert 1 / 1.5 <= ratio <= 1.5, (estimate, measured)


def volume(tmp_path, side, seed=3):
    img, _ = make_nuclei((side, side, side), seed=seed)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, side)
    return tmp_path / "in.zarr"


def test_estimate_threshold_backend(tmp_path, capsys):
    src = volume(tmp_path, 96)
    check_estimate([src, tmp_path / "out.zarr", "--backend", "threshold", "--threshold", "1000", "--blocksize",
                    "96"], tmp_path, capsys)


@pytest.mark.cellpose
@pytest.mark.slow
def test_estimate_shipped_model(tmp_path, capsys):
    pytest.importorskip("cellpose")
    src = volume(tmp_path, 40)
    check_estimate([src, tmp_path / "out.zarr", "--model", "demo", "--blocksize", "40"], tmp_path, capsys)


def test_memory_model_grows_with_the_read_region_and_the_input_type():
    small = memory_estimate("cellpose", 10**5)
    big = memory_estimate("cellpose", 10**7)
    assert big["bytes"] > small["bytes"] > 500 * 2**20  # torch, Cellpose and the model are not free
    assert memory_estimate("cellpose", 10**6, itemsize=4, channels=2)["bytes"] > \
        memory_estimate("cellpose", 10**6)["bytes"]


@pytest.mark.mpi
def test_plan_prints_once_under_mpiexec_with_the_launchers_ranks(tmp_path):
    src = volume(tmp_path, 32)
    args = ["-m", "mpicellpose", "plan", src, tmp_path / "out.zarr", "--backend", "threshold", "--threshold", "1",
            "--blocksize", "16"]
    proc = run_mpi(2, args, timeout=90)
    assert proc.stdout.count("ranks 2:") == 1 and proc.stdout.count("volume (32, 32, 32)") == 1, proc.stdout
    proc = run_mpi(2, args + ["--ranks", "16"], timeout=90)
    assert proc.stdout.count("ranks 16:") == 1, proc.stdout
    assert "more ranks than blocks: 16 ranks for 8 block(s)" in proc.stdout and "will idle" in proc.stdout
    assert not os.path.exists(tmp_path / "out.zarr")
    proc = run_mpi(2, args[:-1] + ["0"], timeout=90, check=False)  # a bad value: once, every rank exits 2
    assert proc.returncode == 2 and proc.stderr.count("mpicellpose: error:") == 1, proc.stderr


def test_plan_says_when_the_output_is_already_complete(tmp_path, capsys):
    src = volume(tmp_path, 24)
    args = [src, tmp_path / "out.zarr", "--backend", "threshold", "--threshold", "1000", "--blocksize", "12"]
    assert planned(args, capsys)["already_complete"] is False
    assert cli.main(["segment"] + [str(a) for a in args]) == 0
    capsys.readouterr()
    assert planned(args, capsys)["already_complete"] is True
    assert cli.main(["plan"] + [str(a) for a in args]) == 0
    assert "already complete with this configuration" in capsys.readouterr().out


# --------------------------------------------------------------------------- Cellpose 4 (cpsam) on a GPU
def test_cpsam_gpu_estimate_from_the_network_size():
    from mpicellpose.cellpose.cellpose4 import CPSAM_NET, STANDIN_NET, gpu_memory_estimate, tile_activation_bytes

    bf16, fp32 = gpu_memory_estimate(CPSAM_NET, 128 ** 3), gpu_memory_estimate(CPSAM_NET, 128 ** 3, bf16=False)
    assert bf16["weights"] == 2 * 305_000_000 and fp32["weights"] == 4 * 305_000_000  # 0.61 / 1.22 GB
    # one 256x256 tile: 16 heads x 1024^2 attention scores held ~3x, plus the stream: ~114 MiB in bf16
    assert 100 * 2**20 < tile_activation_bytes(CPSAM_NET) < 130 * 2**20
    assert tile_activation_bytes(CPSAM_NET, bf16=False) == 2 * tile_activation_bytes(CPSAM_NET)
    small_batch = gpu_memory_estimate(CPSAM_NET, 128 ** 3, batch_size=2)
    assert bf16["peak_step"] == "network" and small_batch["bytes"] < bf16["bytes"] - 600 * 2**20
    big = gpu_memory_estimate(CPSAM_NET, 1024 ** 3)  # the mask step grows with the block
    assert big["peak_step"] == "masks" and big["bytes"] > 48 * 2**30 > gpu_memory_estimate(CPSAM_NET, 512 ** 3)["bytes"]
    assert gpu_memory_estimate(STANDIN_NET, 128 ** 3)["weights"] < 2 * 2**20


def _cpsam_plan(tmp_path, capsys, monkeypatch, *extra):
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    with open(models / "cpsam", "wb") as f:  # the cached weights, as big as cpsam's (sparse: no disk used)
        f.truncate(4 * 305_000_000)
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(models))
    monkeypatch.setattr("mpicellpose.cellpose.models.sha256_file", lambda path: "0" * 64)  # not 1.2 GB of hashing
    if not (tmp_path / "in.zarr").exists():
        import numpy as np

        numpy_array_to_zarr(tmp_path / "in.zarr", np.zeros((64, 320, 320), np.uint16), (64, 160, 160))
    return planned([tmp_path / "in.zarr", tmp_path / "out.zarr", "--model", "cpsam", "--blocksize", "64,160,160",
                    "--overlap", "16"] + list(extra), capsys)


def test_plan_reports_cpsam_gpu_memory_and_warns_above_the_gpu(tmp_path, capsys, monkeypatch):
    r = _cpsam_plan(tmp_path, capsys, monkeypatch)
    g = r["gpu_memory_estimate"]
    assert g["network"] == "cpsam" and g["precision"] == "bfloat16" and g["batch_size"] == 8
    assert g["device_bytes"] == 16 * 2**30 and g["device_bytes_assumed"] is True
    assert not any("GPU memory per rank" in w for w in r["warnings"])
    assert r["memory_model"]["constant"] > 2 * 4 * 305_000_000  # the host also reads the fp32 weights
    fp32 = _cpsam_plan(tmp_path, capsys, monkeypatch, "--model-kwargs", '{"use_bfloat16": false}',
                       "--eval-kwargs", '{"batch_size": 2}', "--gpu-memory", "2")
    g2 = fp32["gpu_memory_estimate"]
    assert g2["precision"] == "float32" and g2["batch_size"] == 2 and g2["weights"] == 2 * g["weights"]
    assert g2["bytes"] > 2 * 2**30 and g2["device_bytes_assumed"] is False
    warn = [w for w in fp32["warnings"] if "of GPU memory per rank" in w]
    assert len(warn) == 1 and "but a GPU has 2 GiB (--gpu-memory)" in warn[0], fp32["warnings"]
    assert cli.main(["plan", str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"), "--model", "cpsam"]) == 0
    assert "GPU memory per rank (estimate, Cellpose 4 cpsam, bfloat16, batch_size 8)" in capsys.readouterr().out


def test_no_gpu_estimate_for_cellpose3_models(tmp_path, capsys):
    r = planned([volume(tmp_path, 32), tmp_path / "out.zarr", "--blocksize", "32", "--backend", "threshold",
                 "--threshold", "1"], capsys)
    assert "gpu_memory_estimate" not in r


def test_plan_on_a_tiff_says_what_the_run_will_do(tmp_path, capsys):
    """A 64-deep TIFF with the default 128^3 blocks: the block as it will be (clipped), no advice about the
    TIFF's pages (the user cannot change them), the work directory with the flow-box shells it will hold."""
    tifffile = pytest.importorskip("tifffile")
    import numpy as np

    tifffile.imwrite(tmp_path / "vol.tif", np.zeros((64, 160, 160), np.uint16), tile=(32, 32))
    assert cli.main(["plan", str(tmp_path / "vol.tif"), str(tmp_path / "out.zarr"), "--model", "demo"]) == 0
    out = capsys.readouterr().out
    assert "blocks (64, 128, 128) (--blocksize 128,128,128 clipped to the volume)" in out, out
    assert "not a multiple of the input chunks" not in out
    line = [ln for ln in out.splitlines() if ln.startswith("work directory up to")]
    assert len(line) == 1 and "shells" not in line[0], out  # one flow box spans the volume: no shell
    assert cli.main(["plan", str(tmp_path / "vol.tif"), str(tmp_path / "out.zarr"), "--model", "demo",
                     "--flow-box", "1"]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("work directory up to")]
    assert len(line) == 1 and "+ flow-box shells" in line[0], out
    assert "B per output voxel" in out and "entries in any directory" in out
