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
``python -m mpicellpose.tools.batch --write-templates scripts``.

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

import logging
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import batch_templates as tpl

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
    common = _fill(tpl.HEADER_COMMON, COMMAND=opts.command_line(), SUBMIT=submit,
                   SCHEDNAME=sched_name)
    header_template = {"slurm": tpl.SLURM_HEADER, "lsf": tpl.LSF_HEADER,
                       "lsf-jsrun": tpl.JSRUN_HEADER}[opts.scheduler]
    time_text = _slurm_time(seconds) if opts.scheduler == "slurm" else _lsf_time(seconds)
    header = _fill(header_template, LAYOUT=layout, COMMON=common, JOBNAME=opts.job_name,
                   NODES=str(opts.nodes), NTASKS=str(opts.gpus), RPN=str(opts.ranks_per_node),
                   TIME=time_text, SIGSEC=str(opts.signal_minutes * 60),
                   SIGMIN=str(opts.signal_minutes), OPTIONAL=_optional_lines(opts))
    placement = {"slurm": tpl.SLURM_PLACEMENT, "lsf": tpl.LSF_PLACEMENT,
                 "lsf-jsrun": tpl.JSRUN_PLACEMENT}[opts.scheduler]
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
    env_setup = "\n".join(opts.env_setup) if opts.env_setup else tpl.ENV_PLACEHOLDER
    variables = _fill(tpl.VARIABLES, INPUT=_q(seg.input), OUTPUT=_q(seg.output),
                      MODEL=_q(seg.model), DIAMETER=_q(seg.diameter),
                      BLOCKSIZE=_q(seg.blocksize), OVERLAP=_q(seg.overlap),
                      BACKEND=_q(seg.backend),
                      EXTRA=" ".join(shlex.quote(a) for a in seg.extra),
                      SCRIPT=_q(opts.script_path), RESUBMIT_NOTE=resubmit_note,
                      PLACEMENT=placement, ENV_SETUP=env_setup)
    runner = _fill(tpl.RUNNER, SUBMIT_RESUME=submit_resume, SUBMIT_AUTO=submit_auto,
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


if __name__ == "__main__":  # pragma: no cover
    from mpicellpose.cli.batch import templates_main

    sys.exit(templates_main())
