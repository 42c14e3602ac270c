"""The run options, declared once: one :class:`Option` per option, in the order ``--help`` shows them.

From :data:`OPTIONS` come the command line's arguments (:func:`add_options`, used by
``cli/common.add_run_arguments``), the flags the command line's messages name (:func:`flags`),
the configuration-file keys that land inside the argument dicts (:func:`landing_keys`) and
the options that change the labels (:func:`labels_options`, checked against the run's
fingerprint in ``runner/phases/plan.fingerprint_of``).  An option's name is the same from the
command line down: ``--flow-box`` is ``flow_box`` in a configuration file, ``RunConfig.flow_box``
and ``Settings.flow_box``.

>>> OPTIONS_BY_NAME["flow_box"].flag, OPTIONS_BY_NAME["diameter"].into
('--flow-box', ('eval_kwargs', 'diameter'))
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable


# --------------------------------------------------------------------------- argument types
def json_dict(text):
    """``--eval-kwargs '{"flow_threshold": 0.5}'``: a JSON object."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"flow_threshold\": 0.5}'")
    return v


def connectivity(text):
    """``--connectivity 1|2|full``."""
    if text == "full":
        return "full"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be 1, 2, 3 or 'full'") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def box_count(text):
    """``--flow-box N|auto`` (auto: None)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a number of blocks >= 1 or 'auto', got {text!r}")
    return n


# --------------------------------------------------------------------------- the declaration
AUTO_ON_OFF = ("auto", "on", "off")

#: The help headings, in the order ``--help`` shows them: key -> (title, description).
GROUPS = {
    "input": ("input", None),
    "output": ("output", None),
    "blocks": ("blocks", "The volume is cut into blocks: each is one output chunk and one unit of work."),
    "model": ("model (Cellpose, or the threshold and labels backends)", None),
    "stitching": ("stitching", "How objects cut by block faces are joined."),
    "run": ("run control and restart", "Finished blocks are recorded in the work directory: the same command resumes."),
    "performance": ("performance and devices", None),
    "logging": ("logging", None),
    "config": ("configuration file", None),
    "check": ("seam check", "Block-wise vs whole-region Cellpose on a sample region (mpicellpose check)."),
}


@dataclass(frozen=True)
class Option:
    """One run option.

    ``name`` is the configuration key (``RunConfig`` field, file key); the flag is ``--`` and the
    name with dashes.  ``default`` is RunConfig's (``tests/test_options.py`` checks they agree);
    on the command line a configuration option has no default (``argparse.SUPPRESS``: only what the
    user typed reaches the configuration, over a ``--config`` file), a command-line-only option
    (``config=False``) has this one.  ``into`` = (dict, key): a convenience key whose value lands
    in ``RunConfig.<dict>[key]`` (``--diameter`` in ``eval_kwargs``).  ``labels``: the value changes
    the labels, so the run's fingerprint holds it.  ``where``: "run" (:func:`add_options`), "io"
    (added with INPUT/OUTPUT by ``cli/common.add_input_output``).  ``in_messages``: the command
    line's messages name its flag (``--blocksize must be ...``).
    """

    name: str
    group: str
    help: str
    type: Callable | None = None
    choices: tuple | None = None
    metavar: str | None = None
    default: Any = None
    switch: bool = False          # a flag without a value (store_true)
    into: tuple | None = None
    labels: bool = False
    config: bool = True
    where: str = "run"
    in_messages: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_to(self, g) -> None:
        """Add this option to the argparse group (or parser) ``g``."""
        kw = {"default": argparse.SUPPRESS if self.config else self.default}
        if self.switch:
            kw["action"] = "store_true"
        for key in ("type", "choices", "metavar"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        g.add_argument(self.flag, help=self.help, **kw)


_O = Option
OPTIONS = (
    # input (INPUT and --dataset come first: cli/common.add_input_output)
    _O("dataset", "input", "array inside a zarr group or HDF5 file (for HDF5 also written file.h5:/NAME)",
       metavar="NAME", labels=True, where="io"),
    _O("level", "input", "OME-Zarr resolution level to segment (index or path; default 0, the full resolution)",
       metavar="N|PATH", default=0, labels=True),
    _O("channel", "input",
       "channel(s) of an input with a channel axis (index, or OME-Zarr omero label): one channel, "
       "or the channel to segment then the nuclear channel, e.g. 1,0 = cytoplasm 1, nucleus 0 "
       "(Cellpose 3 channels=[cyto, nuc]; Cellpose 4 takes them in this order); default: all "
       "channels, in file order", metavar="C[,N]", labels=True),
    _O("timepoint", "input", "time point of an input with a time axis", type=int, metavar="T", labels=True),
    _O("channel_axis", "input",
       "axis of a plain array that holds channels, e.g. 0 for C,Z,Y,X or C,Y,X, -1 for Z,Y,X,C "
       "(not treated as spatial; OME-Zarr/OME-TIFF/ImageJ inputs name their own)", type=int, metavar="AXIS",
       labels=True),
    _O("tile_pattern", "input",
       r"regular expression giving the grid position of TIFF tiles (default _(Z)(\d+)(Y)(\d+)(X)(\d+))",
       metavar="REGEX", labels=True),
    _O("voxel_size", "input",
       "physical voxel size per axis when the file does not say it (sets Cellpose's anisotropy "
       "in 3D and the physical centroids of the object table)", metavar="Z,Y,X", labels=True),
    # output
    _O("labels_name", "output",
       "write the labels inside the OME-Zarr input as labels/NAME (the default when OUTPUT is "
       "left out); an OUTPUT ending in .ome.zarr becomes a standalone NGFF label image", metavar="NAME"),
    _O("pyramid", "output",
       "label pyramid levels to add (default: as many as the image for in-group labels, none otherwise)",
       type=int, metavar="N"),
    _O("pyramid_method", "output", "downsampling of labels: most frequent label (default) or nearest",
       choices=("mode", "nearest"), default="mode"),
    _O("zarr_format", "output", "on-disk format of OUTPUT (default: the input's, else 2)", type=int,
       choices=(2, 3), labels=True),
    _O("overwrite", "output", "replace an existing OUTPUT that this run did not create", switch=True,
       default=False, in_messages=False),
    # blocks
    _O("blocksize", "blocks", "block (= output chunk) size per spatial axis (default 128)", metavar="N|Z,Y,X",
       default=128, labels=True),
    _O("overlap", "blocks",
       "voxels added on each side of a block for context (default: 2 x diameter for cellpose, "
       "z divided by anisotropy; 0 for threshold)", metavar="N|Z,Y,X", labels=True),
    _O("mask", "blocks",
       "foreground mask (zarr) at the same or a lower resolution; blocks without foreground are skipped",
       metavar="PATH", labels=True),
    # model
    _O("backend", "model",
       "cellpose network (default), connected components of image > threshold, or labels "
       "(the input already holds per-block labels: stitch and renumber them)",
       choices=("cellpose", "threshold", "labels"), default="cellpose", labels=True),
    _O("model", "model",
       "Cellpose model: 'demo' (shipped), a built-in name (cyto3, nuclei, cpsam, ...) or a weights file",
       metavar="NAME|PATH", into=("model_kwargs", "pretrained_model"), labels=True, in_messages=False),
    _O("diameter", "model", "object diameter in voxels (default: the model's, 30 for built-ins)", type=float,
       into=("eval_kwargs", "diameter"), labels=True),
    _O("anisotropy", "model", "z voxel size / xy voxel size (3D; default from the input's voxel size, else 1)",
       type=float, into=("eval_kwargs", "anisotropy"), labels=True),
    _O("normalize", "model",
       "intensity normalisation: percentiles over the whole volume (default), per block "
       "(the reference's behaviour) or none", choices=("global", "block", "none"), default="global", labels=True),
    _O("eval_kwargs", "model", "extra CellposeModel.eval arguments as JSON, e.g. '{\"flow_threshold\": 0.5}'",
       type=json_dict, metavar="JSON", default={}, labels=True),
    _O("model_kwargs", "model", "extra CellposeModel arguments as JSON", type=json_dict, metavar="JSON",
       default={}, labels=True),
    _O("threshold", "model", "threshold backend: foreground is image > T (required with --backend threshold)",
       type=float, metavar="T", into=("backend_kwargs", "threshold"), labels=True),
    # stitching
    _O("stitch", "stitching",
       "touch: labels touching across a face merge (exact for threshold, its default); iou: "
       "labels matched in the shared overlap (default for cellpose)", choices=("touch", "iou"), labels=True),
    _O("connectivity", "stitching",
       "touch stitching and the threshold backend: 1 = faces (scipy.ndimage.label's default), "
       "2 = also edges, full = all neighbours (default 1)", type=connectivity, metavar="1|2|full",
       into=("backend_kwargs", "connectivity"), labels=True),
    _O("iou_threshold", "stitching", "iou stitching: minimum IoU (default 0.3)", type=float, default=0.3,
       labels=True),
    _O("iou_depth", "stitching", "iou stitching: voxels compared on each side of a face (default 8, at most "
       "the overlap)", type=int, default=8, labels=True),
    # run control
    _O("work_dir", "run", "scratch and resume state (default OUTPUT stem + .mpicellpose-work)", metavar="DIR"),
    _O("keep_work", "run", "keep the work directory after success", switch=True, default=False,
       in_messages=False),
    _O("restart", "run", "discard the state of an earlier run and start over", switch=True, default=False,
       in_messages=False),
    _O("watchdog", "run",
       "end the job when a rank has waited this long for another rank that sent no word "
       "(stuck I/O, a dead GPU, a silent rank 0); default 10x the slowest block so far, at least 300; "
       "when given: this, or 4x the slowest block if longer; 0 turns it off (also MPICELLPOSE_WATCHDOG)", type=float, metavar="SECONDS"),
    _O("lock_wait", "run",
       "when another run holds OUTPUT's lock, wait this long for it to end or for its lease to run out "
       "before failing (default: a lease plus two refreshes, ~12 min, inside a scheduler job, where a "
       "requeued job may start before the old one's lease ends; 0 outside one)", type=float, metavar="SECONDS"),
    # performance
    _O("schedule", "performance",
       "how blocks go to ranks: dynamic (default) hands them out at run time, costliest first, "
       "so a fast rank takes more; static gives each rank a fixed contiguous run (for debugging)",
       choices=("dynamic", "static"), default="dynamic"),
    _O("pipeline", "performance",
       "Cellpose: 'flows' (default under Cellpose 3) runs the network once per voxel (per orientation, "
       "on the planes through boxes of --flow-box blocks plus --flow-halo in plane) and builds the masks "
       "of each box with the full overlap, exchanging only the boxes' shells through the work directory; 'blocks' runs Cellpose's eval on each block with its overlap "
       "(the network sees overlapping voxels several times; the default under Cellpose 4)",
       choices=("flows", "blocks"), labels=True),
    _O("flow_halo", "performance",
       "--pipeline flows: in-plane context around a block's core for the network, in voxels "
       "(default 16 x diameter / 30, at least 16)", type=int, metavar="N", labels=True),
    _O("flow_box", "performance",
       "--pipeline flows: blocks per side of a flow box, the unit of the flow and mask steps; larger "
       "boxes need less --flow-halo and shell traffic per voxel but more memory (default auto: as many as "
       "keep a box with its overlap within 2^27 voxels, e.g. 3 for 128^3 blocks with a 60-voxel overlap)",
       type=box_count, metavar="N|auto", labels=True),
    _O("masks_during_flows", "performance",
       "--pipeline flows: build masks in a CPU thread while the GPU computes the next boxes' flows "
       "(default auto: on for ranks with a GPU; off: between boxes, as on CPU-only ranks, where both "
       "would share the same cores); the labels are the same either way", choices=AUTO_ON_OFF, default="auto"),
    _O("read_ahead", "performance",
       "read the next block's image in a thread while the network works on this one (default auto: "
       "on for ranks with a GPU); one more block in memory, the labels are the same either way",
       choices=AUTO_ON_OFF, default="auto"),
    _O("precision", "performance",
       "the network's arithmetic (default: the model's own, float32 under Cellpose 3, bfloat16 under "
       "Cellpose 4): bfloat16/float16 run it under autocast, 2-4x faster on GPUs and on CPUs with "
       "AMX or AVX-512 BF16, with labels that differ slightly from float32's (docs/pipeline.md)",
       choices=("float32", "bfloat16", "float16"), labels=True),
    _O("batch_size", "performance",
       "Cellpose: tiles per forward pass of the network (default 8); halved automatically after a "
       "GPU out-of-memory error", type=int, metavar="N", into=("eval_kwargs", "batch_size"), labels=True),
    _O("device", "performance",
       "where each rank runs the model (default auto: one GPU per rank, round-robin, else CPU)",
       metavar="auto|cpu|cuda|cuda:K"),
    _O("allow_cpu_fallback", "performance",
       "let a rank whose GPU is missing or unusable run on the CPU (~100x slower, and its blocks' labels "
       "can differ slightly); by default the job stops before segmenting, naming the host and rank",
       switch=True, default=False),
    _O("threads", "performance", "CPU threads per rank (default cores / ranks per node)", type=int, metavar="N"),
    # logging
    _O("log_level", "logging",
       "messages rank 0 prints on stderr (default INFO; the other ranks print only warnings and errors)",
       choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO", config=False, in_messages=False),
    _O("log_dir", "logging", "also write one log file per rank here (rank-00000.log, ...), with every message",
       metavar="DIR", in_messages=False),
    # configuration file
    _O("config", "config",
       "TOML (or YAML) file with any of these options (keys as the long option names with "
       "underscores, plus input/output, model_kwargs, eval_kwargs tables); flags override it",
       metavar="FILE", config=False, in_messages=False),
    _O("print_config", "config", "print the resolved configuration as TOML and exit without running",
       switch=True, default=False, config=False, in_messages=False),
)
#: The seam check's options (``segment --check``; the thresholds also in ``mpicellpose check``): of the
#: command line only, never a run's configuration, so apart from :data:`OPTIONS`.
CHECK_OPTIONS = (
    _O("check", "check", "first compare block-wise with whole-region Cellpose on a sample region "
       "(mpicellpose check, the same options) and stop before segmenting when it fails --min-f1 or "
       "--max-seam-errors", switch=True, default=False, config=False, where="check", in_messages=False),
    _O("min_f1", "check", "seam check: least object F1 (IoU 0.5) of the block-wise run against whole-region "
       "Cellpose (default 0.99)", type=float, metavar="F1", default=0.99, config=False, where="check",
       in_messages=False),
    _O("max_seam_errors", "check", "seam check: most objects split, merged or left in fragments at block faces, "
       "per 100 objects the faces cut (default 1)", type=float, metavar="N", default=1.0, config=False,
       where="check", in_messages=False),
)
del _O
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}
CHECK_OPTIONS_BY_NAME = {o.name: o for o in CHECK_OPTIONS}


def add_options(parser, group, where: str = "run") -> None:
    """Add the options declared ``where`` to ``parser``, each under its heading; ``group(parser,
    title, description)`` gives the argparse group of a heading (created if new)."""
    for key, (title, description) in GROUPS.items():
        mine = [o for o in (CHECK_OPTIONS if where == "check" else OPTIONS) if o.group == key and o.where == where]
        if mine:
            g = group(parser, title, description)
            for o in mine:
                o.add_to(g)


def flags() -> dict:
    """{configuration key: its flag} of the options the command line's messages name."""
    return {o.name: o.flag for o in OPTIONS if o.in_messages}


def cli_only() -> set:
    """The command line's options that are not configuration keys (``--config``, ``--log-level``)."""
    return {o.name for o in OPTIONS + CHECK_OPTIONS if not o.config}


def landing_keys() -> dict:
    """{convenience key: (dict, key)}: the configuration keys whose value lands inside an argument dict."""
    return {o.name: o.into for o in OPTIONS if o.into}


def labels_options() -> tuple:
    """The names of the options that change the labels (the run's fingerprint holds them)."""
    return tuple(o.name for o in OPTIONS if o.labels)
