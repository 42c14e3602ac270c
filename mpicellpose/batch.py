"""``mpicellpose batch-script``: write a SLURM or LSF batch script for a run.

One MPI rank per GPU, ranks per node = GPUs per node, the scheduler's own
launcher (``srun``; ``mpirun`` under LSF; ``jsrun`` on IBM Summit-like
systems), a walltime warning signal that makes every rank stop cleanly after
its current block, and a trailer that says how to resume (or resubmits)::

    mpicellpose batch-script --scheduler slurm --gpus 128 --gpus-per-node 4 \\
        --walltime 12:00:00 --account abc123 --env-setup 'module load cuda' \\
        --output seg.sbatch -- segment /data/in.zarr /data/labels.zarr --diameter 30
    sbatch seg.sbatch

This module is the single source of truth for the scripts: the templates
shipped in ``scripts/`` are exactly what :func:`render` produces with
:data:`SHIPPED_TEMPLATES`' options (a test checks it).  Regenerate them with
``python -m mpicellpose.batch --write-templates scripts``.

Signals (the "walltime-aware" part):

* SLURM: ``#SBATCH --signal=B:USR1@600`` sends SIGUSR1 to the *batch shell only*
  (``B:``) 600 s before the limit (SLURM may send it up to 60 s early).  The
  script traps it and forwards it to ``srun``, which forwards it to every
  rank.  (Without ``B:`` SLURM signals the job steps' tasks directly and the
  script would not know the run was cut short.)
* LSF: ``#BSUB -wa USR1 -wt 10`` sends SIGUSR1 to the job's processes 10
  minutes before the limit; the script also forwards it to the launcher
  (``mpirun``/``jsrun``), which reaches ranks on other hosts.  A rank may
  therefore see the signal twice; mpicellpose treats repeats as one request.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEDULERS",
    "BatchScriptError",
    "SegmentSpec",
    "BatchOptions",
    "parse_walltime",
    "parse_segment_args",
    "render",
    "shipped_templates",
    "write_templates",
    "register",
    "main",
]

SCHEDULERS = ("slurm", "lsf", "lsf-jsrun")

#: the launcher each script calls (tests put a shim with this name first on PATH)
LAUNCHERS = {"slurm": "srun", "lsf": "mpirun", "lsf-jsrun": "jsrun"}

#: command that submits a script, per scheduler
SUBMIT = {"slurm": "sbatch {script}", "lsf": "bsub < {script}", "lsf-jsrun": "bsub < {script}"}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

#: placeholders written when no ``-- segment ...`` arguments are given
_PLACEHOLDERS = {
    "input": "/path/to/input.zarr",
    "output": "/path/to/labels.zarr",
    "model": "cyto3",
    "diameter": "30",
    "blocksize": "256",
    "overlap": "",
    "backend": "cellpose",
}

#: ``segment`` options that become variables at the top of the script
_VARIABLE_OPTIONS = ("--model", "--diameter", "--blocksize", "--overlap", "--backend")


class BatchScriptError(ValueError):
    """A ``batch-script`` argument is invalid (the message names it)."""


@dataclass(frozen=True)
class SegmentSpec:
    """What the script runs: ``mpicellpose segment INPUT OUTPUT [options]``.

    Empty strings mean "option not passed" (mpicellpose's default applies).
    """

    input: str = _PLACEHOLDERS["input"]
    output: str = _PLACEHOLDERS["output"]
    model: str = _PLACEHOLDERS["model"]
    diameter: str = _PLACEHOLDERS["diameter"]
    blocksize: str = _PLACEHOLDERS["blocksize"]
    overlap: str = _PLACEHOLDERS["overlap"]
    backend: str = _PLACEHOLDERS["backend"]
    extra: Tuple[str, ...] = ()
    #: the arguments as given (empty for the placeholder template)
    argv: Tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchOptions:
    """Everything a batch script depends on (validated by :meth:`validate`).

    Examples
    --------
    >>> opts = BatchOptions(scheduler="slurm", gpus=10, gpus_per_node=4).validate()
    >>> opts.nodes, opts.ranks_per_node
    (3, 4)
    """

    scheduler: str = "slurm"
    gpus: int = 8
    gpus_per_node: int = 4
    walltime: str = "12:00:00"
    signal_minutes: int = 10
    job_name: str = "mpicellpose"
    queue: Optional[str] = None
    account: Optional[str] = None
    cpus_per_task: Optional[int] = None
    env_setup: Tuple[str, ...] = ()
    segment: SegmentSpec = field(default_factory=SegmentSpec)
    #: absolute path the script is written to (used by AUTO_RESUBMIT); "" if unknown
    script_path: str = ""

    # ---- derived -----------------------------------------------------------------
    @property
    def walltime_seconds(self) -> int:
        """The walltime in seconds."""
        return parse_walltime(self.walltime)

    @property
    def ranks_per_node(self) -> int:
        """Ranks (= GPUs used) per node; fewer than ``gpus_per_node`` for a 1-node run."""
        return min(self.gpus, self.gpus_per_node)

    @property
    def nodes(self) -> int:
        """Nodes needed: ``ceil(gpus / gpus_per_node)``."""
        return -(-self.gpus // self.gpus_per_node)

    @property
    def remainder(self) -> int:
        """Ranks on the last node when ``gpus`` is not a multiple (0 if it is)."""
        return self.gpus % self.gpus_per_node if self.gpus > self.gpus_per_node else 0

    def validate(self) -> "BatchOptions":
        """Check every field; return ``self`` or raise :class:`BatchScriptError`."""
        if self.scheduler not in SCHEDULERS:
            raise BatchScriptError(f"--scheduler {self.scheduler!r}: choose one of "
                                   f"{', '.join(SCHEDULERS)}")
        for name, value in (("--gpus", self.gpus), ("--gpus-per-node", self.gpus_per_node)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BatchScriptError(f"{name} must be a positive integer, got {value!r}")
        if self.gpus_per_node > 64:
            raise BatchScriptError(f"--gpus-per-node {self.gpus_per_node}: more than 64 GPUs "
                                   "on one node is surely a typo")
        if self.cpus_per_task is not None and (
                isinstance(self.cpus_per_task, bool) or not isinstance(self.cpus_per_task, int)
                or self.cpus_per_task < 1):
            raise BatchScriptError(f"--cpus-per-task must be a positive integer, "
                                   f"got {self.cpus_per_task!r}")
        seconds = parse_walltime(self.walltime)  # raises with a clear message
        if isinstance(self.signal_minutes, bool) or not isinstance(self.signal_minutes, int) \
                or self.signal_minutes < 1:
            raise BatchScriptError(f"--signal-minutes must be a positive integer, "
                                   f"got {self.signal_minutes!r}")
        if self.signal_minutes * 60 >= seconds:
            raise BatchScriptError(
                f"--signal-minutes {self.signal_minutes} is not shorter than --walltime "
                f"{self.walltime}: the stop signal would come before the job starts working")
        if self.scheduler == "slurm" and self.signal_minutes * 60 > 65535:
            raise BatchScriptError(f"--signal-minutes {self.signal_minutes}: SLURM allows at "
                                   "most 65535 s (1092 min)")
        for name, value in (("--job-name", self.job_name), ("--queue", self.queue),
                            ("--account", self.account)):
            if value is not None and not _NAME_RE.match(value):
                raise BatchScriptError(f"{name} {value!r}: use letters, digits and . _ + - "
                                       "only (no spaces or quotes)")
        for line in self.env_setup:
            if "\n" in line or "\r" in line:
                raise BatchScriptError("--env-setup lines must not contain newlines "
                                       "(pass --env-setup once per line)")
        return self

    def command_line(self) -> str:
        """The normalised ``mpicellpose batch-script ...`` command that gives this script."""
        parts = ["mpicellpose", "batch-script", "--scheduler", self.scheduler,
                 "--gpus", str(self.gpus), "--gpus-per-node", str(self.gpus_per_node),
                 "--walltime", self.walltime, "--signal-minutes", str(self.signal_minutes),
                 "--job-name", self.job_name]
        if self.queue:
            parts += ["--queue", self.queue]
        if self.account:
            parts += ["--account", self.account]
        if self.cpus_per_task:
            parts += ["--cpus-per-task", str(self.cpus_per_task)]
        for line in self.env_setup:
            parts += ["--env-setup", line]
        if self.segment.argv:
            parts += ["--", "segment", *self.segment.argv]
        return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------------------
# argument parsing helpers (pure)
# ---------------------------------------------------------------------------------
_WALLTIME_RE = re.compile(
    r"^(?:(?P<days>\d+)-)?(?P<h>\d+)(?::(?P<m>\d{1,2}))?(?::(?P<s>\d{1,2}))?$")


def parse_walltime(text: str) -> int:
    """Walltime → seconds.

    Accepted: ``HH:MM:SS``, ``HH:MM`` (hours and minutes, as LSF's ``-W``),
    ``D-HH[:MM[:SS]]`` (SLURM's day form) and a bare number of minutes.

    Examples
    --------
    >>> parse_walltime("12:00:00"), parse_walltime("1:30"), parse_walltime("90")
    (43200, 5400, 5400)
    >>> parse_walltime("2-00:00:00")
    172800
    """
    if not isinstance(text, str):
        raise BatchScriptError(f"--walltime must be a string like 12:00:00, got {text!r}")
    value = text.strip()
    match = _WALLTIME_RE.match(value)
    if not match:
        raise BatchScriptError(f"--walltime {text!r}: use HH:MM:SS, HH:MM, D-HH:MM:SS or "
                               "a number of minutes")
    days, h, m, s = (match.group(k) for k in ("days", "h", "m", "s"))
    if days is None and m is None:  # bare number: minutes
        seconds = int(h) * 60
    else:
        if (m is not None and int(m) > 59) or (s is not None and int(s) > 59):
            raise BatchScriptError(f"--walltime {text!r}: minutes and seconds must be < 60")
        seconds = int(days or 0) * 86400 + int(h) * 3600 + int(m or 0) * 60 + int(s or 0)
    if seconds <= 0:
        raise BatchScriptError(f"--walltime {text!r} must be positive")
    return seconds


def _slurm_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"


def _lsf_time(seconds: int) -> str:
    minutes = -(-seconds // 60)  # LSF counts whole minutes: round up
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}"


def parse_segment_args(argv: Sequence[str]) -> SegmentSpec:
    """Split ``segment INPUT OUTPUT [options]`` into the script's variables.

    ``--model``, ``--diameter``, ``--blocksize``, ``--overlap`` and ``--backend``
    become variables at the top of the script; every other option is kept, in
    order, in ``EXTRA_ARGS``.  No arguments at all give the placeholder template.

    Examples
    --------
    >>> s = parse_segment_args(["--", "segment", "in.zarr", "out.zarr", "--diameter=17",
    ...                         "--threshold", "100"])
    >>> s.input, s.output, s.diameter, s.model, s.extra
    ('in.zarr', 'out.zarr', '17', '', ('--threshold', '100'))
    """
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        return SegmentSpec()
    if args[0] == "segment":
        args = args[1:]
    if len(args) < 2 or args[0].startswith("-") or args[1].startswith("-"):
        raise BatchScriptError("after '--' give the segment command with INPUT and OUTPUT "
                               "first: -- segment INPUT OUTPUT [options]")
    values: Dict[str, str] = {k: "" for k in ("model", "diameter", "blocksize", "overlap",
                                              "backend")}
    extra: List[str] = []
    rest = args[2:]
    i = 0
    while i < len(rest):
        token = rest[i]
        name, eq, value = token.partition("=")
        if name in _VARIABLE_OPTIONS:
            if not eq:
                if i + 1 >= len(rest):
                    raise BatchScriptError(f"segment option {name} needs a value")
                value = rest[i + 1]
                i += 1
            values[name[2:]] = value
        else:
            extra.append(token)
        i += 1
    return SegmentSpec(input=args[0], output=args[1], extra=tuple(extra),
                       argv=tuple(args), **values)


def _check_with_segment_parser(spec: SegmentSpec) -> None:
    """Let the real ``segment`` parser reject typos, when it is available."""
    if not spec.argv:
        return
    try:
        from .cli import build_parser  # noqa: PLC0415

        parser = build_parser()
    except Exception as exc:  # segment not importable here: the job will tell
        logger.debug("segment parser unavailable, arguments not checked: %s", exc)
        return
    try:
        parser.parse_args(["segment", *spec.argv])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise BatchScriptError("the arguments after '--' are not valid for "
                                   "'mpicellpose segment' (see the message above)") from None


# ---------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------
def _q(value: str) -> str:
    return shlex.quote(value) if value != "" else ""


def _fill(template: str, **values: str) -> str:
    """Replace every ``@NAME@`` field in one pass (inserted text is not rescanned)."""
    def field_value(match: "re.Match[str]") -> str:
        key = match.group(1)
        if key not in values:  # pragma: no cover - programming error
            raise RuntimeError(f"unfilled template field @{key}@")
        return values[key]

    return re.sub(r"@([A-Z_]+)@", field_value, template)


_HEADER_COMMON = """\
#
# Generated by:
#   @COMMAND@
# Regenerate with other values (mpicellpose batch-script --help) or edit freely.
#
# Submit:   @SUBMIT@
# Resume:   after a walltime stop, a crash or a cancel, submit the SAME script again
#           with the same INPUT, OUTPUT and options: finished blocks are kept and
#           skipped, the result is identical to an uninterrupted run.
# Override: the variables below can be set at submission time without editing, e.g.
#             MPICELLPOSE_INPUT=/data/a.zarr MPICELLPOSE_OUTPUT=/data/a_labels.zarr @SUBMIT@
#           (@SCHEDNAME@ passes the submission environment to the job).
"""

_SLURM_HEADER = """\
#!/bin/bash
# mpicellpose on SLURM: one MPI rank per GPU, @LAYOUT@.
@COMMON@#
# Walltime: '--signal=B:USR1@@SIGSEC@' makes SLURM send SIGUSR1 to this batch shell
# only ('B:') @SIGMIN@ minutes before the time limit (up to 60 s earlier: SLURM checks
# once a minute).  The trap below forwards it to srun, which forwards it to every rank:
# each rank finishes its current block, records its state and exits, well before
# SLURM's SIGTERM/SIGKILL at the limit.  Make the lead time longer than your slowest
# block takes.  (Without 'B:' SLURM would signal the tasks directly and this script
# would not know that the run was cut short.)
#
#SBATCH --job-name=@JOBNAME@
#SBATCH --nodes=@NODES@
#SBATCH --ntasks=@NTASKS@
#SBATCH --ntasks-per-node=@RPN@
#SBATCH --gpus-per-task=1
#SBATCH --time=@TIME@
#SBATCH --signal=B:USR1@@SIGSEC@
#SBATCH --output=@JOBNAME@-%j.out
@OPTIONAL@"""

_LSF_HEADER = """\
#!/bin/bash
# mpicellpose on LSF with mpirun: one MPI rank per GPU, @LAYOUT@.
@COMMON@#
# Walltime: '-wa USR1 -wt @SIGMIN@' makes LSF send SIGUSR1 to the job @SIGMIN@ minutes
# before the run limit (-W).  The trap below also forwards it to mpirun, which
# forwards it to the ranks on every host: each rank finishes its current block,
# records its state and exits.  Make the lead time longer than your slowest block.
# LSF needs the '<' when submitting (it reads the #BSUB lines from stdin).
#
#BSUB -J @JOBNAME@
#BSUB -n @NTASKS@
#BSUB -R "span[ptile=@RPN@]"
#BSUB -gpu "num=@RPN@:mode=shared:j_exclusive=yes"
#BSUB -W @TIME@
#BSUB -wa USR1
#BSUB -wt @SIGMIN@
#BSUB -o @JOBNAME@-%J.out
@OPTIONAL@"""

_JSRUN_HEADER = """\
#!/bin/bash
# mpicellpose on LSF with jsrun (IBM Summit-style CSM): one MPI rank (one jsrun
# resource set with one GPU) per GPU, @LAYOUT@.  Summit nodes have 6 GPUs and 42 cores.
@COMMON@#
# Walltime: '-wa USR1 -wt @SIGMIN@' makes LSF send SIGUSR1 to this batch script @SIGMIN@
# minutes before the run limit (-W).  The trap below forwards it to jsrun, which
# signals every rank: each rank finishes its current block, records its state and
# exits.  Make the lead time longer than your slowest block.
# LSF needs the '<' when submitting (it reads the #BSUB lines from stdin).
#
#BSUB -J @JOBNAME@
#BSUB -nnodes @NODES@
#BSUB -W @TIME@
#BSUB -wa USR1
#BSUB -wt @SIGMIN@
#BSUB -o @JOBNAME@-%J.out
@OPTIONAL@"""

_VARIABLES = """\

set -euo pipefail

# ----------------------------------------------------------------------------------
# What to segment.  MPICELLPOSE_<NAME> in the environment overrides <NAME>; an empty
# value drops the option (mpicellpose's default applies).
# ----------------------------------------------------------------------------------
INPUT=${MPICELLPOSE_INPUT-@INPUT@}
OUTPUT=${MPICELLPOSE_OUTPUT-@OUTPUT@}
MODEL=${MPICELLPOSE_MODEL-@MODEL@}          # model name or path to weights
DIAMETER=${MPICELLPOSE_DIAMETER-@DIAMETER@}       # expected object diameter in voxels
BLOCKSIZE=${MPICELLPOSE_BLOCKSIZE-@BLOCKSIZE@}    # N or Z,Y,X
OVERLAP=${MPICELLPOSE_OVERLAP-@OVERLAP@}           # N or Z,Y,X; empty: mpicellpose's default
BACKEND=${MPICELLPOSE_BACKEND-@BACKEND@}     # cellpose or threshold
# any other 'mpicellpose segment' options, e.g. (--stitch iou --overwrite);
# MPICELLPOSE_EXTRA_ARGS='--stitch touch' replaces them (split on spaces)
EXTRA_ARGS=(@EXTRA@)
if [[ -n ${MPICELLPOSE_EXTRA_ARGS+set} ]]; then
    read -r -a EXTRA_ARGS <<< "$MPICELLPOSE_EXTRA_ARGS"
fi
PYTHON=${MPICELLPOSE_PYTHON-python}           # the python that has mpicellpose installed
RUN_INFO=${MPICELLPOSE_RUN_INFO-1}            # 1: log 'mpicellpose info' (versions, GPUs) first
AUTO_RESUBMIT=${MPICELLPOSE_AUTO_RESUBMIT-0}  # 1: resubmit when stopped by the walltime signal
MAX_RESUBMITS=${MPICELLPOSE_MAX_RESUBMITS-10} # ... at most this many times in a chain
RESUBMIT_SCRIPT=${MPICELLPOSE_RESUBMIT_SCRIPT-@SCRIPT@}  # path of this file@RESUBMIT_NOTE@
@PLACEMENT@
# ----------------------------------------------------------------------------------
# Environment set-up: make 'python' the one with mpicellpose, mpi4py and a CUDA torch.
# ----------------------------------------------------------------------------------
set +u  # module and conda scripts often read unset variables
@ENV_SETUP@
set -u
"""

_ENV_PLACEHOLDER = """\
# module load cuda/12.4 openmpi/4.1.6
# source /path/to/venv/bin/activate        # or: conda activate mpicellpose"""

_RUNNER = r"""
# ----------------------------------------------------------------------------------
# Run (nothing below needs editing).
# ----------------------------------------------------------------------------------
if [[ $INPUT != *://* && ! -e $INPUT ]]; then
    echo "mpicellpose: INPUT '$INPUT' does not exist: edit INPUT in this script" \
         "or set MPICELLPOSE_INPUT" >&2
    exit 2
fi
ARGS=(segment "$INPUT" "$OUTPUT")
if [[ -n $BACKEND ]]; then ARGS+=(--backend "$BACKEND"); fi
if [[ -n $MODEL ]]; then ARGS+=(--model "$MODEL"); fi
if [[ -n $DIAMETER ]]; then ARGS+=(--diameter "$DIAMETER"); fi
if [[ -n $BLOCKSIZE ]]; then ARGS+=(--blocksize "$BLOCKSIZE"); fi
if [[ -n $OVERLAP ]]; then ARGS+=(--overlap "$OVERLAP"); fi
ARGS+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})

STOP_SIGNAL=
LAUNCHER_PID=
# shellcheck disable=SC2317  # called by the traps below
forward_signal() {  # runs when the scheduler signals this script
    STOP_SIGNAL=$1
    echo "mpicellpose: SIG$1 received at $(date): every rank stops after its current block" >&2
    if [[ -n $LAUNCHER_PID ]]; then
        kill -s "$1" "$LAUNCHER_PID" 2>/dev/null || true
    fi
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

run_launcher() {  # run "$@" in the background (so that traps run) and wait for it
    "$@" &
    LAUNCHER_PID=$!
    local status
    while true; do
        status=0
        wait "$LAUNCHER_PID" || status=$?
        # a trapped signal interrupts 'wait' while the launcher still runs: wait again
        if (( status > 128 )) && kill -0 "$LAUNCHER_PID" 2>/dev/null; then
            continue
        fi
        break
    done
    LAUNCHER_PID=
    return "$status"
}

echo "mpicellpose: job $JOB_ID, $NRANKS rank(s) on $NNODES node(s), started $(date)"
echo "mpicellpose: ${LAUNCH[*]} $PYTHON -m mpi4py -m mpicellpose ${ARGS[*]}"
if [[ $RUN_INFO == 1 ]]; then
    run_launcher "${LAUNCH[@]}" "$PYTHON" -m mpi4py -m mpicellpose info \
        || echo "mpicellpose: 'mpicellpose info' failed (continuing)" >&2
fi
status=0
if [[ -z $STOP_SIGNAL ]]; then
    # 'python -m mpi4py': an uncaught exception on one rank aborts all ranks
    run_launcher "${LAUNCH[@]}" "$PYTHON" -m mpi4py -m mpicellpose "${ARGS[@]}" || status=$?
else
    status=1
fi

# ----------------------------------------------------------------------------------
# Trailer: how to resume.
# ----------------------------------------------------------------------------------
if (( status == 0 )); then
    echo "mpicellpose: finished at $(date); labels in $OUTPUT"
    exit 0
fi
echo "mpicellpose: stopped with exit status $status at $(date)${STOP_SIGNAL:+ after SIG$STOP_SIGNAL (walltime warning or cancel)}." >&2
echo "mpicellpose: to RESUME, submit the same script again (same INPUT, OUTPUT, options):" >&2
echo "mpicellpose:     cd $SUBMIT_DIR && @SUBMIT_RESUME@" >&2
echo "mpicellpose: finished blocks are kept and skipped; see the messages above for errors." >&2
if [[ -n $STOP_SIGNAL && $AUTO_RESUBMIT == 1 ]]; then
    count=${MPICELLPOSE_RESUBMIT_COUNT:-0}
    script=@RESUBMIT_DEFAULT@
    if [[ -z $script || ! -r $script ]]; then
        echo "mpicellpose: AUTO_RESUBMIT=1 but RESUBMIT_SCRIPT ('$script') is not readable;" \
             "not resubmitting" >&2
    elif (( count >= MAX_RESUBMITS )); then
        echo "mpicellpose: AUTO_RESUBMIT: $MAX_RESUBMITS resubmissions reached; not resubmitting" >&2
    else
        echo "mpicellpose: AUTO_RESUBMIT=1: resubmitting $script ($((count + 1))/$MAX_RESUBMITS)" >&2
        (cd "$SUBMIT_DIR" && MPICELLPOSE_RESUBMIT_COUNT=$((count + 1)) @SUBMIT_AUTO@) \
            || echo "mpicellpose: resubmission failed" >&2
    fi
fi
exit "$status"
"""

_SLURM_PLACEMENT = """\

# ----------------------------------------------------------------------------------
# Placement: one rank per GPU.  srun gives each task its own GPU (--gpus-per-task=1),
# so every rank sees exactly one GPU and uses cuda:0.  Without --gpus-per-task on your
# site, use '#SBATCH --gres=gpu:@RPN@' and drop --gpus-per-task below: mpicellpose then
# binds node-local rank r to cuda:r.
# ----------------------------------------------------------------------------------
JOB_ID=${SLURM_JOB_ID:?not running under SLURM: submit with sbatch}
NRANKS=${SLURM_NTASKS:?SLURM_NTASKS is not set: keep the --ntasks line}
NNODES=${SLURM_NNODES:-@NODES@}
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
LAUNCH=(srun --ntasks="$NRANKS" --ntasks-per-node=@RPN@ --gpus-per-task=1 --kill-on-bad-exit=1)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    # srun does not inherit --cpus-per-task on every SLURM version: pass it on
    LAUNCH+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
fi
"""

_LSF_PLACEMENT = """\
MPIRUN=${MPICELLPOSE_MPIRUN-mpirun}
# how to tell mpirun the hosts: auto (from 'mpirun --version'), openmpi (also Spectrum
# MPI), hydra (MPICH, Intel MPI, MVAPICH) or lsf (an mpirun that reads LSF itself)
MPI_FLAVOR=${MPICELLPOSE_MPI_FLAVOR-auto}

# ----------------------------------------------------------------------------------
# Placement: one rank per GPU, @RPN@ per host.  LSF sets CUDA_VISIBLE_DEVICES to the
# host's GPUs of this job; mpicellpose binds node-local rank r to cuda:r.
# LSB_DJOB_HOSTFILE lists one line per slot (= rank); LSB_MCPU_HOSTS is "host n ...".
# ----------------------------------------------------------------------------------
JOB_ID=${LSB_JOBID:?not running under LSF: submit with bsub < this-script}
SUBMIT_DIR=${LSB_SUBCWD:-$PWD}
SLOTS=()
if [[ -n ${LSB_DJOB_HOSTFILE:-} && -r ${LSB_DJOB_HOSTFILE:-} ]]; then
    while read -r host _ || [[ -n ${host:-} ]]; do
        if [[ -n $host ]]; then SLOTS+=("$host"); fi
    done < "$LSB_DJOB_HOSTFILE"
elif [[ -n ${LSB_MCPU_HOSTS:-} ]]; then
    read -r -a mcpu <<< "$LSB_MCPU_HOSTS"
    for ((i = 0; i + 1 < ${#mcpu[@]}; i += 2)); do
        for ((k = 0; k < mcpu[i + 1]; k++)); do SLOTS+=("${mcpu[i]}"); done
    done
fi
if (( ${#SLOTS[@]} == 0 )); then
    echo "mpicellpose: neither LSB_DJOB_HOSTFILE nor LSB_MCPU_HOSTS lists hosts" >&2
    exit 2
fi
declare -A PER_HOST=()
HOSTS=()
for host in "${SLOTS[@]}"; do
    if [[ -z ${PER_HOST[$host]+set} ]]; then HOSTS+=("$host"); PER_HOST[$host]=0; fi
    PER_HOST[$host]=$((PER_HOST[$host] + 1))
done
NRANKS=${#SLOTS[@]}
NNODES=${#HOSTS[@]}
if [[ $MPI_FLAVOR == auto ]]; then
    case $("$MPIRUN" --version 2>&1 || true) in
        *"Open MPI"* | *OpenRTE* | *"Open RTE"* | *Spectrum* | *prterun*) MPI_FLAVOR=openmpi ;;
        *HYDRA* | *Hydra* | *"Intel(R) MPI"* | *MPICH* | *MVAPICH*) MPI_FLAVOR=hydra ;;
        *) MPI_FLAVOR=lsf ;;
    esac
fi
HOSTFILE=${TMPDIR:-/tmp}/mpicellpose-$JOB_ID.hosts
case $MPI_FLAVOR in
    openmpi)
        for host in "${HOSTS[@]}"; do echo "$host slots=${PER_HOST[$host]}"; done > "$HOSTFILE"
        LAUNCH=("$MPIRUN" -n "$NRANKS" --hostfile "$HOSTFILE" --bind-to none)
        # Open MPI does not pass the environment to other hosts unless told to
        for var in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV CONDA_PREFIX OMP_NUM_THREADS; do
            if [[ -n ${!var+set} ]]; then LAUNCH+=(-x "$var"); fi
        done
        ;;
    hydra)
        for host in "${HOSTS[@]}"; do echo "$host:${PER_HOST[$host]}"; done > "$HOSTFILE"
        LAUNCH=("$MPIRUN" -n "$NRANKS" -f "$HOSTFILE")
        ;;
    lsf)
        LAUNCH=("$MPIRUN" -n "$NRANKS")
        ;;
    *)
        echo "mpicellpose: MPI_FLAVOR '$MPI_FLAVOR': use auto, openmpi, hydra or lsf" >&2
        exit 2
        ;;
esac
"""

_JSRUN_PLACEMENT = """\
NRANKS=${MPICELLPOSE_NRANKS-@NTASKS@}          # total ranks = GPUs
GPUS_PER_NODE=${MPICELLPOSE_GPUS_PER_NODE-@RPN@}    # ranks (resource sets) per node
CPUS_PER_RANK=${MPICELLPOSE_CPUS_PER_RANK-@CPUS@}    # cores per rank (Summit: 7)
# Spectrum MPI: CUDA programs need -gpu or -disable_gpu_hooks (mpicellpose sends host memory)
SMPIARGS=${MPICELLPOSE_SMPIARGS--disable_gpu_hooks}

# ----------------------------------------------------------------------------------
# Placement: one resource set per GPU (1 task, 1 GPU, CPUS_PER_RANK cores), so every
# rank sees exactly one GPU and uses cuda:0.
# ----------------------------------------------------------------------------------
JOB_ID=${LSB_JOBID:?not running under LSF: submit with bsub < this-script}
SUBMIT_DIR=${LSB_SUBCWD:-$PWD}
NNODES=$(( (NRANKS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_RANK}
LAUNCH=(jsrun --nrs "$NRANKS" --rs_per_host "$GPUS_PER_NODE" --tasks_per_rs 1
        --gpu_per_rs 1 --cpu_per_rs "$CPUS_PER_RANK" --bind "packed:$CPUS_PER_RANK"
        --latency_priority gpu-cpu --smpiargs="$SMPIARGS")
"""


def _optional_lines(opts: BatchOptions) -> str:
    """Queue / account / CPU lines: active when given, commented examples otherwise."""
    lines: List[str] = []
    if opts.scheduler == "slurm":
        pre = "#SBATCH"
        queue = f"--partition={opts.queue}" if opts.queue else None
        account = f"--account={opts.account}" if opts.account else None
        cpus = f"--cpus-per-task={opts.cpus_per_task}" if opts.cpus_per_task else None
        examples = ("--partition=gpu", "--account=myproject", "--cpus-per-task=8")
    else:
        pre = "#BSUB"
        queue = f"-q {opts.queue}" if opts.queue else None
        account = f"-P {opts.account}" if opts.account else None
        cpus = None
        examples = ("-q gpu", "-P myproject", None)
        if opts.scheduler == "lsf":
            if opts.cpus_per_task:
                cpus = f'-R "affinity[core({opts.cpus_per_task})]"'
            examples = ("-q gpu", "-P myproject", '-R "affinity[core(8)]"')
    for active, example in zip((queue, account, cpus), examples):
        if active:
            lines.append(f"{pre} {active}")
        elif example:
            lines.append(f"#{pre} {example}")
    return "".join(line + "\n" for line in lines)


def render(opts: BatchOptions) -> str:
    """The batch script text for ``opts`` (validated first).

    Parameters
    ----------
    opts : BatchOptions

    Returns
    -------
    str
        A bash script (``#!/bin/bash``) for ``sbatch`` or ``bsub <``.

    Examples
    --------
    >>> text = render(BatchOptions(scheduler="slurm", gpus=8, gpus_per_node=4))
    >>> "#SBATCH --signal=B:USR1@600" in text and "srun" in text
    True
    """
    opts.validate()
    seg = opts.segment
    seconds = opts.walltime_seconds
    layout = (f"{opts.gpus} GPU(s) on {opts.nodes} node(s) x {opts.ranks_per_node}"
              + (f" (the last node runs {opts.remainder})" if opts.remainder else ""))
    script_name = Path(opts.script_path).name if opts.script_path else None
    default_name = {"slurm": "mpicellpose.sbatch", "lsf": "mpicellpose.bsub",
                    "lsf-jsrun": "mpicellpose-jsrun.bsub"}[opts.scheduler]
    submit = SUBMIT[opts.scheduler].format(script=script_name or default_name)
    sched_name = "sbatch" if opts.scheduler == "slurm" else "bsub"
    common = _fill(_HEADER_COMMON, COMMAND=opts.command_line(), SUBMIT=submit,
                   SCHEDNAME=sched_name)
    header_template = {"slurm": _SLURM_HEADER, "lsf": _LSF_HEADER,
                       "lsf-jsrun": _JSRUN_HEADER}[opts.scheduler]
    time_text = _slurm_time(seconds) if opts.scheduler == "slurm" else _lsf_time(seconds)
    header = _fill(header_template, LAYOUT=layout, COMMON=common, JOBNAME=opts.job_name,
                   NODES=str(opts.nodes), NTASKS=str(opts.gpus), RPN=str(opts.ranks_per_node),
                   TIME=time_text, SIGSEC=str(opts.signal_minutes * 60),
                   SIGMIN=str(opts.signal_minutes), OPTIONAL=_optional_lines(opts))
    placement = {"slurm": _SLURM_PLACEMENT, "lsf": _LSF_PLACEMENT,
                 "lsf-jsrun": _JSRUN_PLACEMENT}[opts.scheduler]
    placement = _fill(placement, RPN=str(opts.ranks_per_node), NODES=str(opts.nodes),
                      NTASKS=str(opts.gpus), CPUS=str(opts.cpus_per_task or 1))
    if opts.scheduler == "slurm":
        resubmit_note = " (empty: the job's copy, $0)"
        resubmit_default = '${RESUBMIT_SCRIPT:-$0}'
        submit_auto = 'sbatch "$script"'
        submit_resume = "sbatch ${RESUBMIT_SCRIPT:-<this script>}"
    else:
        resubmit_note = " (needed by AUTO_RESUBMIT)"
        resubmit_default = '$RESUBMIT_SCRIPT'
        submit_auto = 'bsub < "$script"'
        submit_resume = "bsub < ${RESUBMIT_SCRIPT:-<this script>}"
    env_setup = "\n".join(opts.env_setup) if opts.env_setup else _ENV_PLACEHOLDER
    variables = _fill(_VARIABLES, INPUT=_q(seg.input), OUTPUT=_q(seg.output),
                      MODEL=_q(seg.model), DIAMETER=_q(seg.diameter),
                      BLOCKSIZE=_q(seg.blocksize), OVERLAP=_q(seg.overlap),
                      BACKEND=_q(seg.backend),
                      EXTRA=" ".join(shlex.quote(a) for a in seg.extra),
                      SCRIPT=_q(opts.script_path), RESUBMIT_NOTE=resubmit_note,
                      PLACEMENT=placement, ENV_SETUP=env_setup)
    runner = _fill(_RUNNER, SUBMIT_RESUME=submit_resume, SUBMIT_AUTO=submit_auto,
                   RESUBMIT_DEFAULT=resubmit_default)
    return header + variables + runner


# ---------------------------------------------------------------------------------
# shipped templates
# ---------------------------------------------------------------------------------
#: path in the repository → options of the shipped template
SHIPPED_TEMPLATES: Dict[str, BatchOptions] = {
    "slurm/mpicellpose.sbatch": BatchOptions(scheduler="slurm"),
    "lsf/mpicellpose.bsub": BatchOptions(scheduler="lsf"),
    "lsf/mpicellpose-jsrun.bsub": BatchOptions(scheduler="lsf-jsrun", gpus=12, gpus_per_node=6,
                                               cpus_per_task=7),
}


def shipped_templates() -> Dict[str, str]:
    """Relative path (under ``scripts/``) → text of every shipped template."""
    return {path: render(opts) for path, opts in SHIPPED_TEMPLATES.items()}


def write_templates(directory) -> List[Path]:
    """(Re)write the shipped templates under ``directory`` (the repo's ``scripts/``)."""
    written = []
    for rel, text in shipped_templates().items():
        path = Path(directory) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------
def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``batch-script`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "batch-script",
        help="write a SLURM/LSF batch script (one rank per GPU, walltime-aware, resumable)",
        description="Write a batch script that runs 'mpicellpose segment' on N GPUs, one MPI "
                    "rank per GPU, with the scheduler's launcher; it stops cleanly before the "
                    "walltime and tells how to resume.  Example: mpicellpose batch-script "
                    "--scheduler slurm --gpus 128 --gpus-per-node 4 --walltime 12:00:00 "
                    "--output seg.sbatch -- segment in.zarr labels.zarr --diameter 30",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scheduler", choices=SCHEDULERS, required=True,
                        help="slurm (srun), lsf (mpirun) or lsf-jsrun (IBM Summit-style jsrun)")
    parser.add_argument("--gpus", type=int, default=8, help="total GPUs = MPI ranks")
    parser.add_argument("--gpus-per-node", type=int, default=4,
                        help="GPUs per node = ranks per node")
    parser.add_argument("--walltime", default="12:00:00",
                        help="HH:MM:SS, HH:MM, D-HH:MM:SS or minutes")
    parser.add_argument("--signal-minutes", type=int, default=10,
                        help="send the stop signal this many minutes before the walltime")
    parser.add_argument("--job-name", default="mpicellpose", help="job name (also log name)")
    parser.add_argument("--queue", default=None, help="SLURM partition / LSF queue")
    parser.add_argument("--account", default=None, help="SLURM account / LSF project (-P)")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help="CPU cores per rank (SLURM --cpus-per-task, jsrun -c)")
    parser.add_argument("--env-setup", action="append", default=[], metavar="LINE",
                        help="shell line(s) that set up the environment, e.g. "
                             "'module load cuda' (repeat, or separate lines with newlines)")
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="write the script here (executable) instead of stdout")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    parser.add_argument("segment_args", nargs=argparse.REMAINDER, metavar="-- segment ...",
                        help="the segment command: -- segment INPUT OUTPUT [options]; "
                             "omitted: placeholders to edit")
    parser.set_defaults(func=main)
    return parser


def options_from_args(args: argparse.Namespace) -> BatchOptions:
    """Build and validate :class:`BatchOptions` from parsed CLI arguments."""
    env_lines: List[str] = []
    for item in args.env_setup or ():
        env_lines.extend(line.rstrip() for line in str(item).splitlines() if line.strip())
    segment = parse_segment_args(args.segment_args or ())
    script_path = os.path.abspath(args.output) if args.output not in (None, "-") else ""
    opts = BatchOptions(scheduler=args.scheduler, gpus=args.gpus,
                        gpus_per_node=args.gpus_per_node, walltime=args.walltime,
                        signal_minutes=args.signal_minutes, job_name=args.job_name,
                        queue=args.queue, account=args.account,
                        cpus_per_task=args.cpus_per_task, env_setup=tuple(env_lines),
                        segment=segment, script_path=script_path)
    return opts.validate()


def main(args: argparse.Namespace) -> int:
    """Run ``mpicellpose batch-script``; returns the exit code."""
    try:
        opts = options_from_args(args)
        _check_with_segment_parser(opts.segment)
        text = render(opts)
    except BatchScriptError as exc:
        sys.stderr.write(f"mpicellpose batch-script: error: {exc}\n")
        return 2
    if opts.remainder:
        sys.stderr.write(f"mpicellpose batch-script: note: {opts.gpus} GPUs on {opts.nodes} "
                         f"nodes of {opts.gpus_per_node}: the last node runs "
                         f"{opts.remainder} rank(s)\n")
    if not opts.script_path:
        sys.stdout.write(text)
        return 0
    path = Path(opts.script_path)
    if path.exists() and not args.force:
        sys.stderr.write(f"mpicellpose batch-script: error: {path} exists (use --force)\n")
        return 2
    path.write_text(text)
    path.chmod(0o755)
    submit = SUBMIT[opts.scheduler].format(script=shlex.quote(args.output))
    sys.stdout.write(f"wrote {args.output}\nsubmit with:  {submit}\n"
                     f"resume after a stop: submit it again (same command)\n")
    return 0


def _templates_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mpicellpose.batch --write-templates DIR`` (maintainers)."""
    parser = argparse.ArgumentParser(prog="python -m mpicellpose.batch")
    parser.add_argument("--write-templates", metavar="DIR", required=True,
                        help="rewrite the shipped templates under DIR (the repo's scripts/)")
    ns = parser.parse_args(argv)
    for path in write_templates(ns.write_templates):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_templates_main())
