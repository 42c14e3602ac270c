"""The run context: what every phase of a run shares, built once by the driver after the plan.

:class:`RunContext` holds the plan (with its :class:`~mpicellpose.runner.phases.plan.Settings`:
what changes the labels, resolved and the same on every rank), the MPI gateway (``box``), the
stop flag, the opened input volume, the work directory (one :class:`WorkDir` for the run) and
:class:`RunOptions` (what the phases read of the configuration beyond the settings).  A phase
takes the context instead of loose arguments, and reads no raw configuration field.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..options import OPTIONS
from .workdir import WorkDir


@dataclass(frozen=True)
class RunOptions:
    """What the phases read of the configuration beyond the plan's settings: the backend and the
    preprocessing steps as this rank was given them (objects: they do not travel with the plan,
    every rank has its own), what the backend is built from, and the options that do not change
    the labels (threads, read-ahead, the output's pyramid, clean-up)."""

    backend: Any = "cellpose"              # 'cellpose', 'threshold', 'labels' or a Segmenter object
    backend_kwargs: dict | None = None
    model_kwargs: dict | None = None
    preprocessing_steps: tuple = ()
    mask: Any = None                       # the foreground mask (path or array), for the normalisation's sample
    device: str | None = None
    threads: int | None = None
    read_ahead: str = "auto"
    masks_during_flows: str = "auto"
    overwrite: bool = False
    keep_work: bool = False
    pyramid: int | None = None
    pyramid_method: str = "mode"
    config: dict | None = None             # the configuration as given (RunConfig.to_dict), for the provenance
    # every other declared option that does not change the labels (mpicellpose.options), by name:
    # ``options.<name>`` reads it, so a new such option needs no field here
    declared: dict = field(default_factory=dict)

    @classmethod
    def of(cls, cfg) -> "RunOptions":
        """The options of configuration ``cfg`` (a :class:`mpicellpose.config.RunConfig`)."""
        own = {f.name for f in fields(cls)}
        declared = {o.name: getattr(cfg, o.name) for o in OPTIONS
                    if o.config and not o.labels and not o.into and o.name not in own}
        return cls(**{name: getattr(cfg, name) for name in own - {"config", "declared"}}, config=cfg.to_dict(),
                   declared=declared)

    def __getattr__(self, name):  # only for names that are not fields: the declared options
        declared = self.__dict__.get("declared") or {}
        if name in declared:
            return declared[name]
        raise AttributeError(f"{type(self).__name__} has no option {name!r}")

    @property
    def cellpose(self) -> bool:
        """The Cellpose backend (named, not an object)."""
        return isinstance(self.backend, str) and self.backend == "cellpose"


@dataclass(frozen=True)
class RunContext:
    """What every phase of a run shares (frozen: a phase that changes the plan gets a new context,
    :meth:`with_plan`)."""

    plan: Any                # mpicellpose.runner.phases.plan.Plan
    box: Any                 # the run's mpicellpose.comm.Mailbox
    stop: Any                # mpicellpose.runner.signals.StopFlag
    volume: Any              # the opened input, mpicellpose.volumes.volume.Volume
    work: WorkDir
    options: RunOptions

    @classmethod
    def build(cls, cfg, plan, box, stop, volume) -> "RunContext":
        return cls(plan, box, stop, volume, WorkDir(plan.work_dir), RunOptions.of(cfg))

    @property
    def settings(self):
        return self.plan.settings

    @property
    def src(self):
        """The input array (lazy)."""
        return self.volume.array

    def with_plan(self, plan) -> "RunContext":
        return replace(self, plan=plan)
