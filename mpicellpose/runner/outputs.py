"""Where a run writes, and the rules that keep it from harming anything else.

A user's only copy of a 10-TB volume may sit next to the output, and batch scripts make
mistakes (an unset ``$OUT``, a ``.`` for "here", an output folder that also holds the input).
So, before any work:

* the output path is refused when it is empty, ``/``, the home directory, the current
  directory or one of their parents, a directory that contains the input, the mask, the
  configuration file or the work directory, a path inside the input, or a path inside
  another zarr *array*;
* an existing output is replaced (``--overwrite``) only when it is a zarr array or group;
  a plain directory or file is never deleted, whatever the flags;
* side files (object table, Parquet table, boxes, lock, work directory) sit beside the
  output, in the directory the user named for it, and an existing one is replaced only when
  this project wrote it (its signature) and the output is this run's own or ``--overwrite``
  was given;
* one run per output at a time: :class:`mpicellpose.runner.lock.OutputLock`.

Everything here is pure path logic (the lock file is :mod:`mpicellpose.runner.lock`'s); nothing
MPI.  The rules for any path a command writes are :mod:`mpicellpose.volumes.safety`'s (also used
by ``mpicellpose convert``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputError, OutputExistsError, UnsafeOutputError
from ..volumes import ngff, storage
from ..volumes.safety import _inside, check_target, protected_paths, replaceable
from .lock import OutputLock

WORK_SUFFIX = ".mpicellpose-work"
LOCK_SUFFIX = ".mpicellpose-lock"
TABLE_SUFFIX = ".objects.csv"
PARQUET_SUFFIX = ".objects.parquet"
BOXES_SUFFIX = ".boxes.npy"
UNITS_SUFFIX = ".objects.units.json"


# --------------------------------------------------------------------------- names
def output_stem(output) -> str:
    s = str(output).rstrip("/")
    for suffix in (".ome.zarr", ".zarr"):
        if s.endswith(suffix):
            return s[: -len(suffix)]
    return s


def default_work_dir(stem) -> str:
    return stem + WORK_SUFFIX


def table_path(stem) -> str:
    return stem + TABLE_SUFFIX


def parquet_path(stem) -> str:
    return stem + PARQUET_SUFFIX


def boxes_path(stem) -> str:
    return stem + BOXES_SUFFIX


def table_units_path(stem) -> str:
    return stem + UNITS_SUFFIX


def lock_path(stem) -> str:
    return stem + LOCK_SUFFIX


@dataclass(frozen=True)
class OutputPlace:
    """Where the labels go: a plain zarr array, or level 0 of an NGFF label image."""

    array: str                   # the level-0 label array
    stem: str                    # prefix of the object table, boxes, lock and work directory
    group: str | None = None     # NGFF label image group (None: plain array)
    image_group: str | None = None  # the input image group when the labels go inside it
    name: str | None = None      # label image name inside the image group

    @property
    def root(self) -> str:
        """What ``--overwrite`` replaces: the label group, else the array."""
        return self.group or self.array

    def side_files(self) -> dict:
        """Every path beside the output that a run writes (except the work directory)."""
        return {"object table": table_path(self.stem), "Parquet table": parquet_path(self.stem),
                "boxes": boxes_path(self.stem), "table units": table_units_path(self.stem), "lock": lock_path(self.stem)}


# --------------------------------------------------------------------------- where
def resolve_output(cfg, vol) -> OutputPlace:
    """Decide where the labels are written (pure)."""
    if cfg.output is not None and not str(cfg.output).strip():
        raise UnsafeOutputError("OUTPUT is empty (an unset shell variable?): give the path of the label array to "
                                "write, e.g. labels.zarr")
    if vol is not None and vol.is_ome and (cfg.labels_name or cfg.output is None):
        name = cfg.labels_name or "mpicellpose"
        group, arr0 = ngff.label_paths(vol.group_path, name)
        return OutputPlace(os.path.abspath(arr0), output_stem(os.path.abspath(vol.group_path)) + "." + name,
                           os.path.abspath(group), os.path.abspath(vol.group_path), name)
    if cfg.output is None:
        raise ConfigError("no OUTPUT given: it can be left out only for an OME-Zarr input (the labels then go "
                          "inside the image group, under labels/)")
    out = os.path.abspath(str(cfg.output))
    if out.rstrip("/").endswith(".ome.zarr"):
        group, arr0 = ngff.standalone_label_paths(out)
        return OutputPlace(arr0, output_stem(out), group)
    return OutputPlace(out, output_stem(out))


def locate_output(cfg, vol, *, prepare: bool = True):
    """Rank 0: where the run writes, checked against everything it could harm (before any
    work), with the parent directory created when ``prepare``.  Returns (place, work dir)."""
    place = resolve_output(cfg, vol)
    work = str(cfg.work_dir or default_work_dir(place.stem))
    check_output_path(cfg, place, work)
    out = place.array
    if isinstance(cfg.input, (str, os.PathLike)) and os.path.abspath(cfg.input) in (out, place.group):
        raise ConfigError(f"output {cfg.output!r} is the same path as the input")
    parent = os.path.dirname(out) or "."
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"output location {parent!r} is not a directory ({existing!r} is a file)")
    if prepare:
        storage.check_writable(existing)
        os.makedirs(parent, exist_ok=True)
    return place, work


def lock_output(cfg, place, tick=None):
    """Rank 0: the exclusive lock on the output for this run (see :class:`mpicellpose.runner.lock.OutputLock`);
    ``tick`` is called while it waits for another run's lock (``--lock-wait``)."""
    return OutputLock(lock_path(place.stem), str(cfg.output or place.root), wait=getattr(cfg, "lock_wait", None),
                      tick=tick).acquire()


def check_output_path(cfg, place: OutputPlace, work_dir: str) -> None:
    """Refuse, before any work, an output or work directory that could harm the user's files."""
    typed = cfg.output
    if typed is not None and not str(typed).strip():
        raise UnsafeOutputError("OUTPUT is empty (an unset shell variable?): give the path of the label array to "
                                "write, e.g. labels.zarr")
    shown = repr(str(typed)) if typed is not None else repr(place.root)
    protected = protected_paths(cfg)
    inside_ok = ("the input",) if place.image_group is not None else ()
    real_out = check_target("OUTPUT", shown, place.root, protected, may_be_inside=inside_ok)
    real_work = check_target("the work directory", repr(str(work_dir)), work_dir, protected)
    if _inside(real_out, real_work) or _inside(real_work, real_out):
        raise UnsafeOutputError(f"OUTPUT {shown} and the work directory {str(work_dir)!r} must not contain "
                                f"each other")


def check_existing_output(cfg, place: OutputPlace, ours: bool) -> str | None:
    """:func:`mpicellpose.volumes.safety.replaceable` for a run's output (the label group of an NGFF output)."""
    shown = repr(str(cfg.output)) if cfg.output is not None else repr(place.root)
    return replaceable(place.root, shown, cfg.overwrite, ours=ours, marker=output_marker(place.array))


def output_marker(path):
    """The 'mpicellpose' attributes of a label array, or None."""
    try:
        arr = storage.open_array(path, mode="r")
        return dict(arr.attrs.get("mpicellpose", {}) or {}) or None
    except Exception:
        return None


def finished_marker(place, restart: bool = False, run_id: str | None = None):
    """OUTPUT's 'mpicellpose' attributes when it is a finished output (marked complete with its
    object count, its object table and boxes beside it) of run ``run_id`` (of any run when None),
    else None; with ``restart`` (``--restart``: compute it again) always None.  Only reads: the one
    answer to "is it already complete?" of ``segment`` and ``plan``."""
    if restart:
        return None
    marker = output_marker(place.array)
    if not marker or marker.get("complete") is not True or marker.get("n_objects") is None:
        return None
    if run_id is not None and marker.get("run_id") != run_id:
        return None
    if not (os.path.isfile(table_path(place.stem)) and os.path.isfile(boxes_path(place.stem))):
        return None
    return marker


def _is_our_table(path: str) -> bool:
    try:
        with open(path) as f:
            first = f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith("id,voxels,") and first.endswith(",n_blocks,stitched,blocks")


def _is_our_boxes(path: str) -> bool:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return False
    return arr.dtype == np.int64 and arr.ndim == 3 and arr.shape[2] == 2 and arr.shape[1] in (2, 3)


def _is_our_parquet(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return all(n.startswith("part-") and n.endswith(".parquet") for n in names)


def _is_our_units(path: str) -> bool:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and set(doc) == {"voxel_size", "voxel_unit", "columns"}


_SIGNATURES = {"object table": _is_our_table, "Parquet table": _is_our_parquet, "boxes": _is_our_boxes,
               "table units": _is_our_units}


def check_side_files(cfg, place: OutputPlace, output_is_ours: bool) -> None:
    """Refuse to replace a side file that this project did not write, or one of ours that
    belongs to another output, without --overwrite."""
    for what, path in place.side_files().items():
        if what == "lock" or not os.path.lexists(path):
            continue
        ours = _SIGNATURES[what](path) and not os.path.islink(path)
        if not ours:
            raise UnsafeOutputError(f"{path!r} ({what} of OUTPUT) already exists and was not written by mpicellpose: "
                                    f"it is never replaced, even with --overwrite; move it away or choose another "
                                    f"OUTPUT")
        if not (output_is_ours or cfg.overwrite):
            raise OutputExistsError(f"{path!r} ({what}) is left from an earlier mpicellpose run; add --overwrite to "
                                    f"replace it, or choose another OUTPUT")


def written_paths(place: OutputPlace, work_dir: str, parquet: bool) -> list:
    """(what, path) of everything a run writes, for the plan and the first log lines."""
    out = [("labels", place.array)]
    if place.group is not None:
        out.append(("label image group", place.group))
    out += [("object table", table_path(place.stem)), ("its units", table_units_path(place.stem))]
    if parquet:
        out.append(("Parquet table", parquet_path(place.stem)))
    out += [("boxes", boxes_path(place.stem)), ("lock (while running)", lock_path(place.stem)),
            ("work directory (removed at the end)", str(work_dir))]
    return out


# --------------------------------------------------------------------------- durability and checks
def fsync_path(path) -> None:
    """Flush a file (or a directory's entries) to stable storage; a file system that cannot fsync a
    directory, or a path that is not there, is passed over."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _array_meta(array_path) -> tuple:
    """(zarr format, metadata dict) of a zarr array on disk."""
    v3 = os.path.join(str(array_path), "zarr.json")
    if os.path.isfile(v3):
        return 3, storage.read_json(v3)
    return 2, storage.read_json(os.path.join(str(array_path), ".zarray"))


def chunk_grid(array_path) -> tuple:
    """Chunks per axis of a zarr array on disk."""
    fmt, meta = _array_meta(array_path)
    chunks = meta["chunks"] if fmt == 2 else meta["chunk_grid"]["configuration"]["chunk_shape"]
    return tuple(-(-int(s) // int(c)) for s, c in zip(meta["shape"], chunks))


def chunk_files(array_path):
    """A function: grid index -> the file of that chunk of a zarr array on disk (v2 or v3, unsharded);
    the metadata is read once."""
    fmt, meta = _array_meta(array_path)
    if fmt == 2:
        sep, prefix = meta.get("dimension_separator") or ".", ""
    else:
        enc = meta.get("chunk_key_encoding") or {"name": "default"}
        default = enc.get("name", "default") == "default"
        sep = (enc.get("configuration") or {}).get("separator", "/" if default else ".")
        prefix = "c" + sep if default else ""
    root = str(array_path)
    return lambda index: os.path.join(root, *(prefix + sep.join(str(int(i)) for i in index)).split("/"))


def chunk_file(array_path, index) -> str:
    """The file of chunk ``index`` (its grid index) of a zarr array on disk."""
    return chunk_files(array_path)(index)


def sync_chunk_file(path) -> bool:
    """fsync a chunk file and its folder (before its done-marker); False when the chunk is not on disk
    (a chunk of zeros only is not written)."""
    there = os.path.exists(path)
    if there:
        fsync_path(path)
    fsync_path(os.path.dirname(path))
    return there


def sync_metadata(array_path) -> None:
    """fsync a zarr array's metadata (attributes included) and the folder holding it."""
    for name in ("zarr.json", ".zarray", ".zattrs"):
        p = os.path.join(str(array_path), name)
        if os.path.exists(p):
            fsync_path(p)
    fsync_path(str(array_path))


def _label_array(path) -> str:
    """The level-0 label array of OUTPUT as a user names it (a plain array, or an NGFF label image group)."""
    path = os.path.abspath(str(path)).rstrip("/")
    if storage.node_kind(path) == "group":
        return os.path.join(path, "0")
    return path


def _table_of(array, marker) -> str | None:
    """The object table beside a label array: the stem of a plain array, of a standalone NGFF label
    image, or of a label image inside its image group (``image.ome.zarr/labels/NAME``)."""
    name = (marker or {}).get("object_table")
    group = os.path.dirname(array)
    stems = [output_stem(array), output_stem(group)]
    if os.path.basename(os.path.dirname(group)) == "labels":
        stems.append(output_stem(os.path.dirname(os.path.dirname(group))) + "." + os.path.basename(group))
    for stem in stems:
        path = table_path(stem)
        if os.path.isfile(path) and (name is None or os.path.basename(path) == name):
            return path
    return None


def _blocks_with_labels(table) -> set:
    """The blocks (linear indices) that hold a piece of some object, from the table's ``blocks`` column."""
    import csv

    found = set()
    with open(table, newline="") as f:
        rows = csv.reader(f)
        col = next(rows).index("blocks")
        for row in rows:
            found.update(int(b) for b in row[col].split(";") if b)
    return found


def verify_output(path) -> dict:
    """Check a finished output: every chunk that must hold labels (a block with a piece of an object,
    from the object table) is on disk.  Returns {array, complete, table, expected, missing (grid
    indices), problems (sentences)}; only reads."""
    array = _label_array(path)
    marker = output_marker(array)
    report = {"array": array, "complete": bool(marker and marker.get("complete") is True), "table": None,
              "expected": 0, "missing": [], "problems": [], "marker": marker or {}}
    if marker is None:
        report["problems"].append(f"{array} is not an mpicellpose output (no 'mpicellpose' attributes)")
        return report
    if not report["complete"]:
        report["problems"].append("the run that writes it has not finished (not marked complete): re-run the "
                                  "same command to finish it")
        return report
    table = report["table"] = _table_of(array, marker)
    if table is None:
        report["problems"].append(f"its object table ({marker.get('object_table')}) is missing beside it")
        return report
    grid = chunk_grid(array)
    chunk = chunk_files(array)
    blocks = sorted(_blocks_with_labels(table))
    report["expected"] = len(blocks)
    for b in blocks:
        index = tuple(int(i) for i in np.unravel_index(b, grid))
        p = chunk(index)
        if not os.path.isfile(p) or os.path.getsize(p) == 0:
            report["missing"].append(index)
    if report["missing"]:
        shown = ", ".join(str(i) for i in report["missing"][:10]) + (" ..." if len(report["missing"]) > 10 else "")
        report["problems"].append(
            f"{len(report['missing'])} of {len(blocks)} chunk(s) that must hold labels are missing (they read as "
            f"zeros): {shown}. Re-run the command that made it with --restart to compute it again")
    return report
