"""`mpicellpose plan` (issue 17, point 4): a memory estimate within 1.5x of the measured peak of
a one-rank run, printed once whatever the launcher, with the launcher's rank count."""
import json
import os
import subprocess
import sys

import pytest

from conftest import mpi_env, run_mpi
from mpicellpose import cli
from mpicellpose.cli.plan import memory_estimate
from mpicellpose.storage import numpy_array_to_zarr
from mpicellpose.synthetic import make_nuclei

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
    proc = run_mpi(2, args[:-1] + ["0"], timeout=90, check=False)  # an error: once, every rank exits 1
    assert proc.returncode == 1 and proc.stderr.count("mpicellpose: error:") == 1, proc.stderr


def test_plan_says_when_the_output_is_already_complete(tmp_path, capsys):
    src = volume(tmp_path, 24)
    args = [src, tmp_path / "out.zarr", "--backend", "threshold", "--threshold", "1000", "--blocksize", "12"]
    assert planned(args, capsys)["already_complete"] is False
    assert cli.main(["segment"] + [str(a) for a in args]) == 0
    capsys.readouterr()
    assert planned(args, capsys)["already_complete"] is True
    assert cli.main(["plan"] + [str(a) for a in args]) == 0
    assert "already complete with this configuration" in capsys.readouterr().out
