"""Run configuration: one frozen dataclass, validated at the edge, ``from_dict``/``to_dict``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .options import landing_keys

BACKENDS = ("cellpose", "threshold", "labels")
STITCH_RULES = ("touch", "iou")
NORMALIZE = ("global", "block", "none")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs.  Arrays (input, mask) may be given as objects or paths.

    Defaults follow the reference where it has one: overlap = 2 x diameter per side for
    Cellpose (z divided by anisotropy), 0 for the threshold backend; stitching ``iou`` for
    Cellpose and ``touch`` for the threshold backend.
    """

    input: Any
    output: str | None = None
    blocksize: Any = 128
    overlap: Any = None
    dataset: str | None = None
    channel_axis: int | None = None
    mask: Any = None
    preprocessing_steps: tuple = ()
    backend: str = "cellpose"
    model_kwargs: dict = field(default_factory=dict)
    eval_kwargs: dict = field(default_factory=dict)
    backend_kwargs: dict = field(default_factory=dict)
    stitch: str | None = None
    iou_threshold: float = 0.3
    iou_depth: int = 8
    normalize: str = "global"
    work_dir: str | None = None
    keep_work: bool = False
    overwrite: bool = False
    restart: bool = False
    zarr_format: int | None = None
    device: str | None = None
    threads: int | None = None
    log_dir: str | None = None
    voxel_size: tuple | None = None
    level: Any = 0
    channel: Any = None
    timepoint: int | None = None
    tile_pattern: str | None = None
    labels_name: str | None = None
    pyramid: int | None = None
    pyramid_method: str = "mode"
    watchdog: float | None = None
    lock_wait: float | None = None  # seconds to wait for another run's lock (None: mpicellpose.runner.lock.default_wait)
    allow_cpu_fallback: bool = False  # a rank without a usable GPU runs on the CPU instead of stopping the job
    schedule: str = "dynamic"  # how blocks are handed out: 'dynamic' (at run time, costliest first) or 'static'
    pipeline: str | None = None  # 'flows' (network once per voxel, then masks) or 'blocks' (eval per block); None: flows under Cellpose 3, blocks under 4
    flow_halo: int | None = None  # in-plane context of the flow step (voxels); None: 16 x diameter / 30, at least 16
    flow_box: int | None = None  # blocks per side of a flow box; None: mpicellpose.grid.boxes.auto_flow_box
    masks_during_flows: str = "auto"  # 'flows': build masks in a CPU thread while the GPU computes flows (auto: on a GPU)
    read_ahead: str = "auto"  # read the next block in a thread while the network works on this one (auto: on a GPU)
    precision: str | None = None  # the network's arithmetic: 'float32', 'bfloat16', 'float16'; None: the model's own
    config_file: str | None = None  # the --config file (never overwritten by an output)

    def __post_init__(self):
        self._check_choices()
        self._check_numbers()
        self._check_run_options()
        self._own_copies()
        self._check_backend_arguments()

    def _check_choices(self):
        """The backend, stitching, normalisation, pyramid and output format."""
        if isinstance(self.backend, str):
            if self.backend not in BACKENDS:
                raise ConfigError(f"backend must be one of {BACKENDS} or a Segmenter object, got {self.backend!r}")
        elif not callable(getattr(self.backend, "segment", None)):
            raise ConfigError(f"backend must be one of {BACKENDS} or an object with a segment(image, ndim) method, "
                              f"got {type(self.backend).__name__}")
        if self.stitch is not None and self.stitch not in STITCH_RULES:
            raise ConfigError(f"stitch must be one of {STITCH_RULES}, got {self.stitch!r}")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if not 0.0 < float(self.iou_threshold) <= 1.0:
            raise ConfigError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if int(self.iou_depth) < 1:
            raise ConfigError(f"iou_depth must be >= 1, got {self.iou_depth}")
        if self.pyramid is not None and (isinstance(self.pyramid, bool) or int(self.pyramid) < 0):
            raise ConfigError(f"pyramid must be a number of levels >= 0, got {self.pyramid!r}")
        if self.pyramid_method not in ("mode", "nearest"):
            raise ConfigError(f"pyramid_method must be 'mode' or 'nearest', got {self.pyramid_method!r}")
        if self.zarr_format not in (None, 2, 3):
            raise ConfigError(f"zarr_format must be 2 or 3, got {self.zarr_format}")

    def _check_numbers(self):
        """Voxel size and watchdog, as floats."""
        if self.voxel_size is not None:
            try:
                vs = tuple(float(v) for v in self.voxel_size)
            except (TypeError, ValueError):
                raise ConfigError(f"voxel_size must be numbers, got {self.voxel_size!r}") from None
            if not all(v > 0 and math.isfinite(v) for v in vs):
                raise ConfigError(f"voxel_size must be positive, got {vs}")
            object.__setattr__(self, "voxel_size", vs)
        if self.watchdog is not None:
            try:
                wd = float(self.watchdog)
            except (TypeError, ValueError):
                raise ConfigError(f"watchdog must be a number of seconds, got {self.watchdog!r}") from None
            if not (wd >= 0 and math.isfinite(wd)):
                raise ConfigError(f"watchdog must be >= 0 seconds (0 turns it off), got {self.watchdog!r}")
            object.__setattr__(self, "watchdog", wd)

    def _check_run_options(self):
        """Schedule, pipeline, read-ahead and masks during flows, flow halo and box, precision, threads."""
        if self.schedule not in ("dynamic", "static"):
            raise ConfigError(f"schedule must be 'dynamic' or 'static', got {self.schedule!r}")
        if self.pipeline not in (None, "flows", "blocks"):
            raise ConfigError(f"pipeline must be 'flows' or 'blocks', got {self.pipeline!r}")
        if self.read_ahead not in ("auto", "on", "off"):
            raise ConfigError(f"read_ahead must be 'auto', 'on' or 'off', got {self.read_ahead!r}")
        if self.masks_during_flows not in ("auto", "on", "off"):
            raise ConfigError(f"masks_during_flows must be 'auto', 'on' or 'off', got {self.masks_during_flows!r}")
        if self.flow_halo is not None and (isinstance(self.flow_halo, bool) or int(self.flow_halo) < 0):
            raise ConfigError(f"flow_halo must be a number of voxels >= 0, got {self.flow_halo!r}")
        if self.flow_box is not None and (isinstance(self.flow_box, bool) or int(self.flow_box) < 1):
            raise ConfigError(f"flow_box must be a number of blocks >= 1, got {self.flow_box!r}")
        if self.precision is not None and self.precision not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"precision must be 'float32', 'bfloat16' or 'float16', got {self.precision!r}")
        if self.threads is not None and int(self.threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    def _own_copies(self):
        """Our own copies of the argument dicts and the preprocessing steps (the caller's are never touched)."""
        for name in ("model_kwargs", "eval_kwargs", "backend_kwargs"):
            v = getattr(self, name)
            if v is None:
                object.__setattr__(self, name, {})
            elif not isinstance(v, dict):
                raise ConfigError(f"{name} must be a dict, got {type(v).__name__}")
            else:  # our own copy: the caller's dict is never touched
                object.__setattr__(self, name, dict(v))
        steps = tuple(self.preprocessing_steps or ())
        for i, step in enumerate(steps):
            if not (isinstance(step, (tuple, list)) and len(step) == 2 and callable(step[0])
                    and isinstance(step[1], dict)):
                raise ConfigError(
                    f"preprocessing_steps[{i}] must be a (function, kwargs dict) pair, got {step!r}"
                )
        object.__setattr__(self, "preprocessing_steps", tuple((f, dict(k)) for f, k in steps))

    def _check_backend_arguments(self):
        """Batch size, channels, connectivity and threshold."""
        batch = self.eval_kwargs.get("batch_size")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ConfigError(f"batch_size must be a whole number of tiles >= 1, got {batch!r}")
        object.__setattr__(self, "channel", channel_selection(self.channel, self.channel_axis, self.eval_kwargs))
        conn = self.backend_kwargs.get("connectivity", 1)
        if conn != "full" and (isinstance(conn, bool) or not isinstance(conn, int) or conn < 1):
            raise ConfigError(f"connectivity must be 1..ndim or 'full', got {conn!r}")
        if self.backend == "threshold" and "threshold" in self.backend_kwargs:
            t = self.backend_kwargs["threshold"]
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(float(t)):
                raise ConfigError(f"threshold must be a finite number, got {t!r}")

    @property
    def stitch_rule(self) -> str:
        if self.stitch:
            return self.stitch
        return "iou" if self.backend == "cellpose" else "touch"

    @property
    def diameter(self) -> float | None:
        d = self.eval_kwargs.get("diameter")
        if d is None:
            return None
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0 or not math.isfinite(d):
            raise ConfigError(f"diameter must be a positive number, got {d!r}")
        return float(d)

    def to_dict(self) -> dict:
        """JSON-friendly dict (functions by qualified name, arrays by type)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "preprocessing_steps":
                v = [[_qualname(fn), kw] for fn, kw in v]
            elif f.name == "backend" and not isinstance(v, str):
                v = _qualname(type(v))
            elif f.name in ("input", "mask") and v is not None and not isinstance(v, str):
                v = f"<{type(v).__name__} {getattr(v, 'shape', '')}>"
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown configuration key(s) {unknown}{_nearest_keys(unknown, names)}; valid keys: "
                              f"{sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


class Channels(tuple):
    """Channels to segment, in this order (for Cellpose: the channel to segment, e.g. the
    cytoplasm, then the optional nuclear channel), kept as a channel axis of the input.

    A tuple in every respect (equality, JSON, TOML); ``axis`` carries ``channel_axis``
    (the axis of an input whose axes have no names) to the reader, None for the input's own
    ``c`` axis.

    >>> c = Channels((1, 0), axis=0)
    >>> c == (1, 0), c.axis, list(c)
    (True, 0, [1, 0])
    """

    def __new__(cls, items, axis=None):
        self = super().__new__(cls, items)
        self.axis = axis
        return self

    def __reduce__(self):
        return (Channels, (tuple(self), self.axis))

    def __repr__(self):  # as written in the fingerprint and the messages that compare runs
        return repr(list(self))


def _one_channel(v, given):
    if isinstance(v, bool) or not (isinstance(v, (int, str)) or hasattr(v, "__index__")):
        raise ConfigError(f"channel must be an index, an OME-Zarr channel name or a list of them (e.g. 1,0 for "
                          f"cytoplasm 1 and nucleus 0), got {given!r}")
    if isinstance(v, str):
        v = v.strip()
        if not v:
            raise ConfigError(f"channel {given!r} has an empty entry; write e.g. 1,0 (cytoplasm, nucleus)")
        return int(v) if v.lstrip("-").isdigit() else v
    return int(v)


def channel_selection(channel, channel_axis=None, eval_kwargs=None):
    """The ``channel`` option as given (``1``, ``"DAPI"``, ``"1,0"``, ``[1, 0]``), checked.

    One channel without a channel axis given stays a plain index or name (the reader then
    drops the channel axis); a list, or any channel with ``channel_axis``, becomes
    :class:`Channels` (the reader keeps a channel axis holding the chosen channels in order).

    >>> channel_selection("1,0"), channel_selection(2), channel_selection("GFP")
    ([1, 0], 2, 'GFP')
    >>> c = channel_selection(1, channel_axis=3)
    >>> type(c).__name__, c, c.axis
    ('Channels', [1], 3)
    """
    if channel is None:
        return None
    if isinstance(channel, str) and "," in channel:
        items = channel.split(",")
    elif isinstance(channel, (list, tuple)):
        items = list(channel)
        if not items:
            raise ConfigError("channel is an empty list; give one channel or e.g. 1,0 (cytoplasm, nucleus)")
    else:
        items = None
    axis = channel_axis
    if axis is None and isinstance(eval_kwargs, dict):
        axis = eval_kwargs.get("channel_axis")
    if items is None:
        one = _one_channel(channel, channel)
        return one if axis is None else Channels((one,), axis)
    chosen = tuple(_one_channel(v, channel) for v in items)
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"channel {channel!r} names a channel twice; give each channel once (e.g. 1,0)")
    return Channels(chosen, axis)


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# --------------------------------------------------------------------------- config files
# convenience keys (as on the command line: --model, --diameter, ...) that land inside the kwargs
# dicts, declared with the options (mpicellpose.options: Option.into)
_LANDING = landing_keys()


def field_names() -> list:
    return [f.name for f in dataclasses.fields(RunConfig)]


def from_mapping(d: dict) -> "RunConfig":
    """Build a RunConfig from a flat mapping of RunConfig fields and command-line style
    convenience keys (``model``, ``diameter``, ``anisotropy``, ``threshold``,
    ``connectivity``).  ``channel`` (one channel, or e.g. ``"1,0"``: cytoplasm, nucleus) is the
    input's channel selection for every backend.  The mapping is not modified.

    Examples
    --------
    >>> cfg = from_mapping({"input": "in.zarr", "output": "out.zarr", "model": "demo", "diameter": 16})
    >>> cfg.model_kwargs, cfg.eval_kwargs
    ({'pretrained_model': 'demo'}, {'diameter': 16})
    """
    d = dict(d)
    names = set(field_names())
    unknown = sorted(set(d) - names - set(_LANDING))
    if unknown:
        valid = sorted(names | set(_LANDING))
        raise ConfigError(f"unknown configuration key(s) {unknown}{_nearest_keys(unknown, valid)}; valid keys: {valid}")
    kwargs = {name: dict(d.pop(name, None) or {}) for name in ("model_kwargs", "eval_kwargs", "backend_kwargs")}
    for key, (target, inner) in _LANDING.items():
        v = d.pop(key, None)
        if v is not None:
            kwargs[target][inner] = v
    for name in ("blocksize", "overlap", "voxel_size"):
        if isinstance(d.get(name), list):
            d[name] = tuple(d[name])
    if "input" not in d:
        raise ConfigError("configuration lacks ['input']: give it on the command line or in the file")
    return RunConfig(**kwargs, **d)


def load_file(path) -> dict:
    """Read a run configuration from TOML (``.toml``) or YAML (``.yaml``/``.yml``)."""
    import os

    path = str(path)
    if not os.path.exists(path):
        raise ConfigError(f"configuration file {path!r} does not exist")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML configuration files need PyYAML (pip install pyyaml); or use TOML") from None
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    else:
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError("TOML configuration files need Python 3.11+ or 'pip install tomli'") from None
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path!r} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {path!r} must hold a table of options")
    return data


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} to TOML")


def to_toml(cfg: "RunConfig") -> str:
    """The resolved configuration as TOML that :func:`load_file` reads back.

    Values TOML cannot hold (None, in-memory arrays, functions) are left out or commented.
    """
    d = cfg.to_dict()
    lines, tables = ["# mpicellpose run configuration"], []
    for k, v in d.items():
        if isinstance(v, dict):
            if v:
                tables.append((k, v))
            continue
        if v is None or (k == "preprocessing_steps" and not v):
            continue
        if k == "preprocessing_steps" or (k in ("input", "mask") and str(v).startswith("<")):
            lines.append(f"# {k} = {v!r}  (not expressible in a file)")
            continue
        lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        for k, v in table.items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _nearest_keys(unknown, valid) -> str:
    """' (did you mean blocksize?)' for mistyped keys, '' when none is near a valid one."""
    import difflib

    near = [m[0] for k in unknown for m in [difflib.get_close_matches(k, sorted(valid), n=1, cutoff=0.6)] if m]
    return f" (did you mean {', '.join(near)}?)" if near else ""
