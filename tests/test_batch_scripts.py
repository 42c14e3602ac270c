"""Batch scripts: generator vs shipped templates, bash -n, shellcheck, and execution.

The scripts are *executed* here with the scheduler's variables faked and the launcher
(``srun``, ``mpirun``, ``jsrun``) replaced by a shim first on PATH.  The shim records
and checks the launcher arguments, then runs the real ``mpiexec -n 2`` with the rest
of the command, so the script really segments a small zarr volume.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpicellpose.tools import batch
from mpicellpose.cli import batch as batch_cli
from mpicellpose.tools.batch import BatchOptions, BatchScriptError, parse_segment_args, render

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TIMEOUT = 120
SHIPPED = sorted(batch.SHIPPED_TEMPLATES)

#: CLI arguments that reproduce each shipped template
SHIPPED_ARGV = {
    "slurm/mpicellpose.sbatch": ["--scheduler", "slurm"],
    "lsf/mpicellpose.bsub": ["--scheduler", "lsf"],
    "lsf/mpicellpose-jsrun.bsub": ["--scheduler", "lsf-jsrun", "--gpus", "12",
                                   "--gpus-per-node", "6", "--cpus-per-task", "7"],
}


def find_mpiexec():
    """The venv's mpiexec (next to sys.executable), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    return shutil.which("mpiexec")


def _parser():
    parser = argparse.ArgumentParser(prog="mpicellpose")
    sub = parser.add_subparsers()
    batch_cli.register(sub)
    return parser


def run_cli(argv, capsys):
    args = _parser().parse_args(["batch-script", *argv])
    code = batch_cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# ======================================================================================
# one source of truth
# ======================================================================================
@pytest.mark.parametrize("rel", SHIPPED)
def test_shipped_template_is_what_batch_py_generates(rel):
    path = SCRIPTS / rel
    assert path.exists(), f"{path} missing: python -m mpicellpose.tools.batch --write-templates scripts"
    assert path.read_text() == batch.shipped_templates()[rel], (
        f"{rel} differs from the generator: regenerate with "
        "'python -m mpicellpose.tools.batch --write-templates scripts'")
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize("rel", SHIPPED)
def test_cli_with_defaults_reproduces_shipped_template(rel, capsys):
    code, out, _ = run_cli(SHIPPED_ARGV[rel], capsys)
    assert code == 0
    assert out == (SCRIPTS / rel).read_text()


def test_write_templates(tmp_path):
    paths = batch.write_templates(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in paths) == SHIPPED
    for p in paths:
        assert p.stat().st_mode & stat.S_IXUSR


def test_readme_exists_and_mentions_mpi4py():
    text = (SCRIPTS / "README.md").read_text()
    assert "python -m mpi4py" in text and "MPI_Abort" in text


# ======================================================================================
# syntax: bash -n and shellcheck, for shipped and generated variants
# ======================================================================================
def _variants():
    seg = parse_segment_args(["segment", "/data/my input.zarr", "/data/out's.zarr",
                              "--diameter", "17", "--stitch", "iou", "--eval-kwargs",
                              '{"niter": 200, "flow3D_smooth": 1}'])
    out = {}
    for sched in batch.SCHEDULERS:
        out[f"{sched}-full"] = render(BatchOptions(
            scheduler=sched, gpus=10, gpus_per_node=4, walltime="1-12:30:00", signal_minutes=15,
            job_name="seg_run.1", queue="gpu-long", account="abc123", cpus_per_task=6,
            env_setup=("module load cuda/12.4", 'source "$HOME/venv/bin/activate"'),
            segment=seg, script_path="/home/me/seg job.sh"))
        out[f"{sched}-one-node"] = render(BatchOptions(scheduler=sched, gpus=2, gpus_per_node=4))
    return out


VARIANTS = _variants()


def _script_files(tmp_path):
    files = [SCRIPTS / rel for rel in SHIPPED]
    for name, text in VARIANTS.items():
        p = tmp_path / f"{name}.sh"
        p.write_text(text)
        files.append(p)
    return files


def test_bash_n(tmp_path):
    for path in _script_files(tmp_path):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


def test_shellcheck(tmp_path):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    for path in _script_files(tmp_path):
        # shipped scripts: every level; generated ones contain the test's --env-setup lines
        # (a 'source' shellcheck cannot follow: info SC1091), so from warnings up
        level = "style" if path.parent == SCRIPTS or SCRIPTS in path.parents else "warning"
        proc = subprocess.run([exe, "--shell=bash", f"--severity={level}", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{path.name}:\n{proc.stdout}{proc.stderr}"


# ======================================================================================
# content and validation
# ======================================================================================
def test_slurm_header_and_signal():
    text = batch.shipped_templates()["slurm/mpicellpose.sbatch"]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks=8", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --time=12:00:00",
                 "#SBATCH --signal=B:USR1@600", "#SBATCH --output=mpicellpose-%j.out",
                 "set -euo pipefail", "##SBATCH --partition=gpu"):
        assert line in text.splitlines(), line
    assert "python -m mpi4py" in text or "-m mpi4py -m mpicellpose" in text
    # every #SBATCH line comes before the first command
    lines = text.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))


def test_lsf_header_and_signal():
    text = batch.shipped_templates()["lsf/mpicellpose.bsub"]
    for line in ("#BSUB -n 8", '#BSUB -R "span[ptile=4]"', "#BSUB -W 12:00", "#BSUB -wa USR1",
                 "#BSUB -wt 10", "#BSUB -o mpicellpose-%J.out",
                 '#BSUB -gpu "num=4:mode=shared:j_exclusive=yes"'):
        assert line in text.splitlines(), line
    lines = text.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#BSUB"))


def test_jsrun_header():
    text = batch.shipped_templates()["lsf/mpicellpose-jsrun.bsub"]
    for line in ("#BSUB -nnodes 2", "#BSUB -W 12:00", "#BSUB -wa USR1", "#BSUB -wt 10"):
        assert line in text.splitlines(), line
    assert "NRANKS=${MPICELLPOSE_NRANKS-12}" in text
    assert "CPUS_PER_RANK=${MPICELLPOSE_CPUS_PER_RANK-7}" in text


def test_options_are_rendered():
    t = VARIANTS["slurm-full"]
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks=10", "#SBATCH --time=1-12:30:00",
                 "#SBATCH --signal=B:USR1@900", "#SBATCH --partition=gpu-long",
                 "#SBATCH --account=abc123", "#SBATCH --cpus-per-task=6",
                 "#SBATCH --job-name=seg_run.1", "module load cuda/12.4",
                 "INPUT=${MPICELLPOSE_INPUT-'/data/my input.zarr'}",
                 "DIAMETER=${MPICELLPOSE_DIAMETER-17}", "MODEL=${MPICELLPOSE_MODEL-}",
                 "RESUBMIT_SCRIPT=${MPICELLPOSE_RESUBMIT_SCRIPT-'/home/me/seg job.sh'}"):
        assert line in t.splitlines() or line in t, line
    assert "the last node runs 2" in t
    lsf = VARIANTS["lsf-full"]
    for line in ("#BSUB -W 36:30", "#BSUB -wt 15", "#BSUB -q gpu-long", "#BSUB -P abc123",
                 "#BSUB -n 10", '#BSUB -R "span[ptile=4]"', '#BSUB -R "affinity[core(6)]"'):
        assert line in lsf.splitlines(), line
    js = VARIANTS["lsf-jsrun-full"]
    assert "#BSUB -nnodes 3" in js.splitlines()
    one = VARIANTS["slurm-one-node"]
    assert "#SBATCH --nodes=1" in one and "#SBATCH --ntasks-per-node=2" in one


@pytest.mark.parametrize("text,seconds", [
    ("12:00:00", 43200), ("1:30", 5400), ("90", 5400), ("2-00:00:00", 172800),
    ("1-12", 129600), ("0:00:30", 30), ("48:00:00", 172800),
])
def test_parse_walltime(text, seconds):
    assert batch.parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["", "12h", "1:60", "1:00:61", "0", "0:00", "-5", "1:2:3:4",
                                  "abc", "1.5"])
def test_parse_walltime_rejects(text):
    with pytest.raises(BatchScriptError, match="walltime"):
        batch.parse_walltime(text)


def test_time_formats():
    assert batch._slurm_time(90 * 60) == "01:30:00"
    assert batch._slurm_time(36 * 3600) == "1-12:00:00"
    assert batch._lsf_time(36 * 3600) == "36:00"
    assert batch._lsf_time(30 * 60 + 1) == "0:31"  # LSF counts whole minutes: round up


@pytest.mark.parametrize("kwargs,match", [
    (dict(gpus=0), "--gpus"),
    (dict(gpus_per_node=0), "--gpus-per-node"),
    (dict(gpus_per_node=128), "typo"),
    (dict(walltime="5:00", signal_minutes=300), "not shorter"),
    (dict(walltime="10", signal_minutes=10), "not shorter"),
    (dict(signal_minutes=0), "--signal-minutes"),
    (dict(walltime="48:00:00", signal_minutes=1200), "65535"),
    (dict(job_name="my job"), "--job-name"),
    (dict(queue="a;b"), "--queue"),
    (dict(account="x'y"), "--account"),
    (dict(cpus_per_task=0), "--cpus-per-task"),
    (dict(scheduler="pbs"), "--scheduler"),
    (dict(walltime="1:99"), "minutes and seconds"),
    (dict(env_setup=("a\nb",)), "newlines"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(BatchScriptError, match=match):
        BatchOptions(**kwargs).validate()


def test_lsf_signal_may_exceed_slurm_limit():
    BatchOptions(scheduler="lsf", walltime="48:00:00", signal_minutes=1200).validate()


def test_batch_script_error_is_value_error():
    assert issubclass(BatchScriptError, ValueError)


def test_parse_segment_args():
    s = parse_segment_args(["--", "segment", "in.zarr", "out.zarr", "--model=nuclei",
                            "--blocksize", "64,128,128", "--overwrite", "--threshold", "100",
                            "--backend", "threshold"])
    assert (s.input, s.output, s.model, s.blocksize, s.backend) == (
        "in.zarr", "out.zarr", "nuclei", "64,128,128", "threshold")
    assert s.diameter == "" and s.overlap == ""
    assert s.extra == ("--overwrite", "--threshold", "100")
    assert parse_segment_args([]) == batch.SegmentSpec()
    assert parse_segment_args(["in.zarr", "out.zarr"]).input == "in.zarr"  # 'segment' optional


@pytest.mark.parametrize("argv", [["segment"], ["segment", "in.zarr"],
                                  ["segment", "--diameter", "3", "a", "b"],
                                  ["segment", "a", "b", "--model"]])
def test_parse_segment_args_errors(argv):
    with pytest.raises(BatchScriptError):
        parse_segment_args(argv)


def test_cli_errors_are_clear(capsys):
    code, out, err = run_cli(["--scheduler", "slurm", "--walltime", "12h"], capsys)
    assert code == 2 and "walltime" in err and out == ""
    code, _, err = run_cli(["--scheduler", "lsf", "--gpus", "8", "--", "segment", "x"], capsys)
    assert code == 2 and "INPUT and OUTPUT" in err


def test_cli_rejects_bad_segment_options(capsys):
    """The real segment parser (when importable) catches typos before submission."""
    try:
        from mpicellpose.cli import build_parser
        build_parser()
    except Exception as exc:  # pragma: no cover - until the segment subcommand exists
        pytest.skip(f"segment parser not importable: {exc}")
    code, _, err = run_cli(["--scheduler", "slurm", "--", "segment", "a.zarr", "b.zarr",
                            "--no-such-option"], capsys)
    assert code == 2 and "not valid for 'mpicellpose segment'" in err


def test_cli_remainder_note(capsys):
    code, out, err = run_cli(["--scheduler", "slurm", "--gpus", "10"], capsys)
    assert code == 0 and "last node runs 2" in err
    assert "#SBATCH --nodes=3" in out


def test_cli_output_file(tmp_path, capsys):
    target = tmp_path / "seg.sbatch"
    argv = ["--scheduler", "slurm", "--gpus", "16", "--env-setup", "module load a\nmodule load b",
            "--output", str(target), "--", "segment", "in.zarr", "out.zarr", "--diameter", "20"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and target.exists() and os.access(target, os.X_OK)
    assert f"sbatch {target}" in out
    text = target.read_text()
    assert f"RESUBMIT_SCRIPT=${{MPICELLPOSE_RESUBMIT_SCRIPT-{target}}}" in text
    assert "\nmodule load a\nmodule load b\n" in text
    assert "--env-setup 'module load a' --env-setup 'module load b'" in text
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "exists" in err
    code, _, _ = run_cli(["--force", *argv], capsys)
    assert code == 0


# ======================================================================================
# execution with shims
# ======================================================================================
SHIM = r'''#!@PYTHON@
"""Stand-in for srun / mpirun / jsrun / sbatch / bsub (tests only)."""
import json, os, signal, subprocess, sys, time

name = os.path.basename(sys.argv[0])
argv = sys.argv[1:]
LOG = os.environ["SHIM_LOG"]


def record(rec):
    with open(LOG, "a") as f:
        f.write(json.dumps(rec) + "\n")


def contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


if name in ("sbatch", "bsub"):
    record({"name": name, "argv": argv, "cwd": os.getcwd(),
            "stdin": sys.stdin.read() if name == "bsub" else None,
            "count": os.environ.get("MPICELLPOSE_RESUBMIT_COUNT")})
    print("Job <99> is submitted" if name == "bsub" else "Submitted batch job 99")
    sys.exit(0)
if name == "mpirun" and argv == ["--version"]:
    print(os.environ.get("SHIM_MPIRUN_VERSION", "HYDRA build details:\n    Version: 5.0.2"))
    sys.exit(0)

python = os.environ["MPICELLPOSE_PYTHON"]
if python not in argv:
    sys.stderr.write(f"shim {name}: {python} not in {argv}\n")
    sys.exit(98)
idx = argv.index(python)
launcher_args, command = argv[:idx], argv[idx:]
rec = {"name": name, "launcher_args": launcher_args, "command": command,
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
for opt in ("-f", "--hostfile"):
    if opt in launcher_args:
        with open(launcher_args[launcher_args.index(opt) + 1]) as f:
            rec["hostfile"] = f.read()
expect = json.loads(os.environ.get("SHIM_EXPECT", "[]"))
rec["missing"] = [e for e in expect if not contains(launcher_args, e)]
record(rec)
if rec["missing"]:
    sys.stderr.write(f"shim {name}: expected {rec['missing']} in {launcher_args}\n")
    sys.exit(97)

mode = os.environ.get("SHIM_MODE", "run")
if mode == "record":
    sys.exit(0)
if mode == "wait_signal":
    got = []
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: got.append(signum))
    record({"name": name, "event": "waiting"})
    end = time.time() + 60
    while not got and time.time() < end:
        time.sleep(0.05)
    record({"name": name, "event": "stopped", "signals": got})
    sys.exit(3 if got else 0)

# run the real thing: mpiexec -n 2 <command>, without the faked scheduler's variables
env = {k: v for k, v in os.environ.items()
       if not k.startswith(("SLURM_", "LSB_", "LSF_", "SHIM_"))}
sys.exit(subprocess.call([os.environ["SHIM_MPIEXEC"], "-n", os.environ.get("SHIM_NP", "2"),
                          *command], env=env))
'''

SCHEDULER_ENV = {
    "slurm": {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]"},
    "lsf": {"LSB_JOBID": "4243", "LSB_MCPU_HOSTS": "nodeA 4 nodeB 4", "LSB_DJOB_NUMPROC": "8"},
    "lsf-jsrun": {"LSB_JOBID": "4244",
                  "LSB_MCPU_HOSTS": "batch1 1 nodeA 42 nodeB 42"},
}

EXPECTED_LAUNCHER = {
    "slurm": ("srun", [["--ntasks=8"], ["--ntasks-per-node=4"], ["--gpus-per-task=1"],
                       ["--kill-on-bad-exit=1"]]),
    "lsf": ("mpirun", [["-n", "8"], ["-f"]]),
    "lsf-jsrun": ("jsrun", [["--nrs", "12"], ["--rs_per_host", "6"], ["--tasks_per_rs", "1"],
                            ["--gpu_per_rs", "1"], ["--cpu_per_rs", "7"], ["--bind", "packed:7"],
                            ["--latency_priority", "gpu-cpu"],
                            ["--smpiargs=-disable_gpu_hooks"]]),
}

TEMPLATE_OF = {"slurm": "slurm/mpicellpose.sbatch", "lsf": "lsf/mpicellpose.bsub",
               "lsf-jsrun": "lsf/mpicellpose-jsrun.bsub"}


class Job:
    """A faked scheduler job: env, shims on PATH, a log of launcher calls."""

    def __init__(self, tmp_path, scheduler, mode="run", expect=None, **overrides):
        self.tmp = tmp_path
        self.scheduler = scheduler
        self.script = SCRIPTS / TEMPLATE_OF[scheduler]
        bin_dir = tmp_path / "shimbin"
        bin_dir.mkdir(exist_ok=True)
        for name in ("srun", "mpirun", "jsrun", "sbatch", "bsub"):
            p = bin_dir / name
            p.write_text(SHIM.replace("@PYTHON@", sys.executable))
            p.chmod(0o755)
        self.log = tmp_path / "shim.jsonl"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "LSB_", "LSF_", "PMI_", "PMIX_", "OMPI_",
                                    "MPICELLPOSE_", "SHIM_"))}
        env.update({
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if p),
            "TMPDIR": str(tmp_path),
            "MPICELLPOSE_PYTHON": sys.executable,
            "SHIM_LOG": str(self.log),
            "SHIM_MODE": mode,
            "SHIM_MPIEXEC": find_mpiexec() or "mpiexec",
            "SHIM_EXPECT": json.dumps(EXPECTED_LAUNCHER[scheduler][1] if expect is None
                                      else expect),
        })
        env.update(SCHEDULER_ENV[scheduler])
        if scheduler == "lsf":
            hosts = tmp_path / "djob_hostfile"
            hosts.write_text("nodeA\n" * 4 + "nodeB\n" * 4)
            env["LSB_DJOB_HOSTFILE"] = str(hosts)
        if scheduler == "slurm":
            env["SLURM_SUBMIT_DIR"] = str(tmp_path)
        else:
            env["LSB_SUBCWD"] = str(tmp_path)
        env.update({k: v for k, v in overrides.items() if v is not None})
        for k, v in overrides.items():
            if v is None:
                env.pop(k, None)
        self.env = env

    def run(self, timeout=TIMEOUT):
        return subprocess.run(["bash", str(self.script)], cwd=str(self.tmp), env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def records(self):
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def launches(self):
        return [r for r in self.records() if "launcher_args" in r]


@pytest.fixture
def volume(tmp_path):
    """A 40x48x48 uint16 zarr with separated bright balls, some across block faces."""
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, size=(40, 48, 48)).astype(np.uint16)
    centers = [(6, 6, 6), (8, 24, 30), (24, 10, 40), (30, 36, 12), (16, 38, 24), (32, 30, 40),
               (24, 24, 6)]
    for i, a in enumerate(centers):
        for b in centers[i + 1:]:
            assert np.linalg.norm(np.subtract(a, b)) > 11
    zz, yy, xx = np.ogrid[:40, :48, :48]
    for z, y, x in centers:
        img[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 16] = 500
    path = tmp_path / "input.zarr"
    arr = zarr.open_array(str(path), mode="w", shape=img.shape, chunks=(20, 24, 24),
                          dtype="uint16")
    arr[:] = img
    return path, img


def _segment_env(volume, tmp_path):
    path, _ = volume
    return {"MPICELLPOSE_INPUT": str(path), "MPICELLPOSE_OUTPUT": str(tmp_path / "labels.zarr"),
            "MPICELLPOSE_BACKEND": "threshold", "MPICELLPOSE_MODEL": "",
            "MPICELLPOSE_DIAMETER": "", "MPICELLPOSE_BLOCKSIZE": "24",
            "MPICELLPOSE_EXTRA_ARGS": "--threshold 100"}


EXPECTED_COMMAND_TAIL = ["-m", "mpi4py", "-m", "mpicellpose", "segment"]


@pytest.mark.parametrize("scheduler", batch.SCHEDULERS)
def test_script_launcher_arguments_record_only(scheduler, tmp_path, volume):
    """The script calls its launcher with one rank per GPU (shim records, runs nothing)."""
    job = Job(tmp_path, scheduler, mode="record", **_segment_env(volume, tmp_path))
    proc = job.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = job.launches()
    name = EXPECTED_LAUNCHER[scheduler][0]
    assert [r["name"] for r in launches] == [name, name]  # info, then segment
    assert launches[0]["command"][1:] == ["-m", "mpi4py", "-m", "mpicellpose", "info"]
    seg = launches[1]
    assert seg["missing"] == []
    assert seg["command"][0] == sys.executable
    assert seg["command"][1:] == EXPECTED_COMMAND_TAIL + [
        str(volume[0]), str(tmp_path / "labels.zarr"), "--backend", "threshold",
        "--blocksize", "24", "--threshold", "100"]
    if scheduler == "lsf":
        assert seg["hostfile"] == "nodeA:4\nnodeB:4\n"  # hydra syntax, from LSB_DJOB_HOSTFILE
    assert "finished" in proc.stdout


def test_slurm_cpus_per_task_passed_on(tmp_path, volume):
    expect = EXPECTED_LAUNCHER["slurm"][1] + [["--cpus-per-task=3"]]
    job = Job(tmp_path, "slurm", mode="record", expect=expect, SLURM_CPUS_PER_TASK="3",
              MPICELLPOSE_RUN_INFO="0", **_segment_env(volume, tmp_path))
    proc = job.run()
    assert proc.returncode == 0, proc.stderr
    (seg,) = job.launches()
    assert seg["OMP_NUM_THREADS"] == "3"


def test_lsf_openmpi_flavour(tmp_path, volume):
    expect = [["-n", "8"], ["--hostfile"], ["--bind-to", "none"], ["-x", "PATH"]]
    job = Job(tmp_path, "lsf", mode="record", expect=expect, MPICELLPOSE_RUN_INFO="0",
              SHIM_MPIRUN_VERSION="mpirun (Open MPI) 4.1.6", **_segment_env(volume, tmp_path))
    proc = job.run()
    assert proc.returncode == 0, proc.stderr
    (seg,) = job.launches()
    assert seg["hostfile"] == "nodeA slots=4\nnodeB slots=4\n"


def test_lsf_mcpu_hosts_fallback_and_lsf_flavour(tmp_path, volume):
    job = Job(tmp_path, "lsf", mode="record", expect=[["-n", "6"]], MPICELLPOSE_RUN_INFO="0",
              MPICELLPOSE_MPI_FLAVOR="lsf", LSB_MCPU_HOSTS="h1 4 h2 2",
              **_segment_env(volume, tmp_path))
    job.env.pop("LSB_DJOB_HOSTFILE")
    proc = job.run()
    assert proc.returncode == 0, proc.stderr
    (seg,) = job.launches()
    assert seg["launcher_args"] == ["-n", "6"]
    assert "6 rank(s) on 2 node(s)" in proc.stdout


def test_extra_args_with_spaces_survive(tmp_path, volume):
    """A generated script keeps quoted arguments intact all the way to the launcher."""
    path, _ = volume
    text = render(BatchOptions(scheduler="slurm", segment=parse_segment_args(
        ["segment", str(path), str(tmp_path / "out dir" / "l.zarr"), "--eval-kwargs",
         '{"niter": 200, "x": "a b"}'])))
    script = tmp_path / "gen.sbatch"
    script.write_text(text)
    job = Job(tmp_path, "slurm", mode="record", MPICELLPOSE_RUN_INFO="0")
    job.script = script
    proc = job.run()
    assert proc.returncode == 0, proc.stderr
    (seg,) = job.launches()
    assert seg["command"][-4:] == [str(path), str(tmp_path / "out dir" / "l.zarr"),
                                   "--eval-kwargs", '{"niter": 200, "x": "a b"}']


@pytest.mark.parametrize("scheduler,var", [("slurm", "SLURM_JOB_ID"), ("lsf", "LSB_JOBID"),
                                           ("lsf-jsrun", "LSB_JOBID")])
def test_script_refuses_to_run_outside_the_scheduler(scheduler, var, tmp_path, volume):
    job = Job(tmp_path, scheduler, mode="record", **{var: None}, **_segment_env(volume, tmp_path))
    proc = job.run()
    assert proc.returncode != 0
    assert "not running under" in proc.stderr
    assert job.launches() == []


def test_script_checks_input_exists(tmp_path):
    job = Job(tmp_path, "slurm", mode="record", MPICELLPOSE_INPUT=str(tmp_path / "nope.zarr"))
    proc = job.run()
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and job.launches() == []


def _run_until_signalled(job, sig=signal.SIGUSR1):
    proc = subprocess.Popen(["bash", str(job.script)], cwd=str(job.tmp), env=job.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 60
        while not any(r.get("event") == "waiting" for r in job.records()):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < end, "the launcher never started"
            time.sleep(0.05)
        os.kill(proc.pid, sig)  # what the scheduler does before the walltime
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.parametrize("scheduler,submit", [("slurm", "sbatch"), ("lsf", "bsub < "),
                                              ("lsf-jsrun", "bsub < ")])
def test_walltime_signal_is_forwarded_and_resume_explained(scheduler, submit, tmp_path, volume):
    job = Job(tmp_path, scheduler, mode="wait_signal", MPICELLPOSE_RUN_INFO="0",
              **_segment_env(volume, tmp_path))
    code, out, err = _run_until_signalled(job)
    stopped = [r for r in job.records() if r.get("event") == "stopped"]
    assert stopped and stopped[0]["signals"] == [int(signal.SIGUSR1)]
    assert code == 3  # the launcher's status is passed on
    assert "SIGUSR1 received" in err
    assert "to RESUME, submit the same script again" in err
    assert submit in err
    assert not [r for r in job.records() if r["name"] in ("sbatch", "bsub")]  # no auto-resubmit


def test_auto_resubmit_slurm(tmp_path, volume):
    job = Job(tmp_path, "slurm", mode="wait_signal", MPICELLPOSE_RUN_INFO="0",
              MPICELLPOSE_AUTO_RESUBMIT="1", MPICELLPOSE_RESUBMIT_COUNT="2",
              **_segment_env(volume, tmp_path))
    code, _, err = _run_until_signalled(job)
    assert code == 3
    subs = [r for r in job.records() if r["name"] == "sbatch"]
    assert len(subs) == 1, err
    assert subs[0]["argv"] == [str(job.script)] and subs[0]["count"] == "3"
    assert subs[0]["cwd"] == str(tmp_path)


def test_auto_resubmit_stops_after_max(tmp_path, volume):
    job = Job(tmp_path, "slurm", mode="wait_signal", MPICELLPOSE_RUN_INFO="0",
              MPICELLPOSE_AUTO_RESUBMIT="1", MPICELLPOSE_RESUBMIT_COUNT="10",
              **_segment_env(volume, tmp_path))
    code, _, err = _run_until_signalled(job)
    assert code == 3 and "resubmissions reached" in err
    assert not [r for r in job.records() if r["name"] == "sbatch"]


def test_auto_resubmit_lsf_needs_script_path(tmp_path, volume):
    job = Job(tmp_path, "lsf", mode="wait_signal", MPICELLPOSE_RUN_INFO="0",
              MPICELLPOSE_AUTO_RESUBMIT="1", **_segment_env(volume, tmp_path))
    code, _, err = _run_until_signalled(job)
    assert code == 3 and "not resubmitting" in err
    again = tmp_path / "again"
    again.mkdir()
    job2 = Job(again, "lsf", mode="wait_signal", MPICELLPOSE_RUN_INFO="0", MPICELLPOSE_AUTO_RESUBMIT="1",
               MPICELLPOSE_RESUBMIT_SCRIPT=str(SCRIPTS / "lsf/mpicellpose.bsub"),
               **_segment_env(volume, tmp_path))
    code, _, err = _run_until_signalled(job2)
    subs = [r for r in job2.records() if r["name"] == "bsub"]
    assert code == 3 and len(subs) == 1, err
    assert subs[0]["stdin"] == (SCRIPTS / "lsf/mpicellpose.bsub").read_text()
    assert subs[0]["count"] == "1"


def test_sigterm_is_forwarded_too(tmp_path, volume):
    job = Job(tmp_path, "slurm", mode="wait_signal", MPICELLPOSE_RUN_INFO="0",
              **_segment_env(volume, tmp_path))
    code, _, err = _run_until_signalled(job, signal.SIGTERM)
    stopped = [r for r in job.records() if r.get("event") == "stopped"]
    assert stopped[0]["signals"] == [int(signal.SIGTERM)] and code == 3
    assert "after SIGTERM" in err


@pytest.mark.mpi
@pytest.mark.parametrize("scheduler", batch.SCHEDULERS)
def test_script_segments_a_volume(scheduler, tmp_path, volume):
    """End to end: the shipped script, shimmed launcher, real mpiexec -n 2, real segment."""
    from scipy import ndimage
    import zarr

    if find_mpiexec() is None:
        pytest.skip("mpiexec not found")
    _, img = volume
    job = Job(tmp_path, scheduler, mode="run", **_segment_env(volume, tmp_path))
    proc = job.run(timeout=2 * TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mpicellpose support information" in proc.stdout  # RUN_INFO=1
    assert "finished" in proc.stdout
    out = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")
    assert np.issubdtype(out.dtype, np.integer)
    labels = out[:]
    assert labels.shape == img.shape
    _, n_expected = ndimage.label(img > 100)
    ids = np.unique(labels)
    assert len(ids[ids != 0]) == n_expected == 7
