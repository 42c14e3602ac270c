"""The rules that keep a write from harming the user's files (pure path logic and zarr nodes).

A user's only copy of a 10-TB volume may sit next to the output, and batch scripts make
mistakes (an unset ``$OUT``, a ``.`` for "here", an output folder that also holds the input).
So a path a command writes (and may later delete) is refused when it is empty, ``/``, the home
directory, the current directory or one of their parents, a directory that contains a protected
path (the input, the mask, the configuration file), a path inside one, or a path inside another
zarr *array* (:func:`check_target`); what already lies there is replaced only when it is a zarr
array or group and the caller says so (:func:`replaceable`, :func:`remove_zarr`): a plain
directory or file is never deleted, whatever the flags.  Used by a run's outputs
(:mod:`mpicellpose.run.outputs`) and by ``mpicellpose convert``.
"""
from __future__ import annotations

import logging
import os

from ..errors import OutputExistsError, UnsafeOutputError
from . import storage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- safety checks
def _real(p) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(p))))


def _inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies below it (both real paths)."""
    try:
        return os.path.commonpath([child, parent]) == parent
    except ValueError:  # different drives
        return False


def _describe_dir(path: str, limit: int = 4) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return "a directory"
    if not names:
        return "an empty directory"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"a directory with {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def protected_paths(cfg) -> dict:
    """{what: real path} of the user's files a run must never delete or write into."""
    out = {}
    if isinstance(cfg.input, (str, os.PathLike)) and str(cfg.input):
        src = str(cfg.input)
        if ":" in src and not os.path.exists(src):  # file.h5:/dataset
            src = src.split(":", 1)[0]
        if any(c in src for c in "*?["):  # a glob of tiles: protect the folder they are in
            src = os.path.dirname(src) or "."
        out["the input"] = _real(src)
    if isinstance(cfg.mask, (str, os.PathLike)) and str(cfg.mask):
        out["the mask"] = _real(cfg.mask)
    config_file = getattr(cfg, "config_file", None)
    if config_file:
        out["the configuration file"] = _real(config_file)
    return out


def _dangerous_dirs() -> dict:
    return {"the current directory": _real(os.getcwd()), "your home directory": _real("~"),
            "the root directory": "/"}


def check_target(what: str, name: str, path, protected: dict, *, may_be_inside=()) -> str:
    """Refuse a path a command would write (and may later delete) when that could harm the
    user's files; return its real path.  ``protected``: {what: real path} never to be
    touched; ``may_be_inside``: those of them the target may lie inside (labels inside an
    OME-Zarr input)."""
    real = _real(path)
    why = ("mpicellpose never writes its results there, because --overwrite and the clean-up would delete what "
           "is there. Name a new path, e.g. 'labels.zarr'")
    dangers = _dangerous_dirs()
    for danger, d in dangers.items():
        if real == d:
            raise UnsafeOutputError(f"{what} {name} is {danger} ({real}): {why}")
    for danger, d in dangers.items():
        if _inside(d, real):
            raise UnsafeOutputError(f"{what} {name} is {real!r}, which contains {danger}: {why}")
    for pw, p in protected.items():
        if p == real:
            raise UnsafeOutputError(f"{what} {name} is the same path as {pw}: choose another path, e.g. a new "
                                    f"'labels.zarr' beside it")
        if _inside(p, real):
            raise UnsafeOutputError(f"{what} {name} contains {pw} ({p}): choose a path outside it, e.g. "
                                    f"a new 'labels.zarr' beside it")
        if _inside(real, p) and pw not in may_be_inside:
            raise UnsafeOutputError(f"{what} {name} lies inside {pw} ({p}): choose a path outside it")
    # never inside a zarr array (its chunks would be overwritten); inside a group is zarr's hierarchy
    parent = os.path.dirname(real)
    while parent and parent != os.path.dirname(parent):
        if storage.node_kind(parent) == "array":
            raise UnsafeOutputError(f"{what} {name} lies inside the zarr array {parent!r}: choose a path outside it")
        parent = os.path.dirname(parent)
    return real


def replaceable(path, shown: str, overwrite: bool, *, ours: bool = False, marker=None,
                runs: bool = True) -> str | None:
    """What to do with what already lies at ``path``: None (nothing there, an empty
    directory, or ours to reuse), or the description of the zarr node ``overwrite`` will
    replace.  Raises for a plain file or directory (never deleted) and for a zarr node
    without ``overwrite`` (``runs``: the message speaks of segmentation runs)."""
    root = str(path)
    if not os.path.lexists(root):
        return None
    if os.path.islink(root):
        raise UnsafeOutputError(f"OUTPUT {shown} is a symbolic link; mpicellpose does not write through it: give the "
                                f"real path")
    if not os.path.isdir(root):
        raise OutputExistsError(f"OUTPUT {shown} is an existing file ({os.path.getsize(root)} bytes) that was not "
                                f"made by mpicellpose: it is never deleted, even with --overwrite; choose another "
                                f"OUTPUT")
    kind = storage.node_kind(root)
    if kind is None:
        if not os.listdir(root):
            return None  # an empty directory: used as it is
        raise OutputExistsError(f"OUTPUT {shown} is {_describe_dir(root)}, not a zarr array, and was not made by "
                                f"mpicellpose: it is never deleted, even with --overwrite; choose a new path, e.g. "
                                f"{os.path.join(shown.strip(chr(39)), 'labels.zarr')!r}")
    if ours:
        return None
    if not overwrite:
        if not runs:  # a converted array: no run made it
            raise OutputExistsError(f"output {shown} exists; pass --overwrite to replace it "
                                    f"(a zarr {kind})")
        if marker is None:
            what = "was not made by mpicellpose"
        elif marker.get("converted_from"):
            what = f"holds the data `mpicellpose convert` copied from {marker['converted_from']!r}, not labels"
        else:
            what = "was made by an mpicellpose run with another configuration"
        raise OutputExistsError(f"output {shown} exists and {what}; pass --overwrite to replace it (a zarr {kind})")
    return f"the zarr {kind} {root}"


def remove_zarr(path: str, what: str) -> None:
    """Remove a zarr array or group (and nothing else), saying so."""
    if storage.node_kind(path) is None or os.path.islink(path):
        raise UnsafeOutputError(f"refusing to remove {path!r}: it is not a zarr array or group")
    n_files, n_bytes = 0, 0
    for root, _, files in os.walk(path):
        for f in files:
            n_files += 1
            try:
                n_bytes += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    log.warning("--overwrite: removing %s (%d files, %.1f MB)", what, n_files, n_bytes / 1e6)
    storage.remove_path(path)
