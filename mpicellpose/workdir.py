"""The work directory of a run: every path, record, done-marker and the clean-up.

Layout (``<output stem>.mpicellpose-work`` unless ``--work-dir`` names another)::

    run.json            fingerprint of the configuration (refuses a changed one)
    scratch.zarr        block-local labels (uint32), one chunk per block
    blocks/<i>.npz      per-block record = done marker: label count, per-label stats,
                        the views of its faces that stitching needs
    relabel/<i>.done    output chunk i written with final IDs
    table/              the object table's parts, one per rank

Only these entries are ever removed: a user's file put into the folder survives.
"""
from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import numpy as np

from . import storage
from .errors import InputError, ResumeMismatchError

log = logging.getLogger(__name__)

VIEW_PREFIX = "v_"  # record entries holding face views (the rest are per-label statistics)


def fingerprint_diff(old: dict, new: dict, prefix="") -> list:
    """Readable differences between two configuration fingerprints."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class WorkDir:
    """Owns one run's work directory (all ranks build one from the same path)."""

    OWN = ("run.json", "scratch.zarr", "blocks", "relabel", "table", "stitch.npz")

    def __init__(self, path):
        self.path = Path(path)
        self.run_json = self.path / "run.json"
        self.scratch = self.path / "scratch.zarr"
        self.blocks = self.path / "blocks"
        self.relabel = self.path / "relabel"
        self.table = self.path / "table"

    def __repr__(self):
        return f"WorkDir({str(self.path)!r})"

    # -- per block ---------------------------------------------------------------
    def record(self, linear) -> Path:
        return self.blocks / f"{int(linear)}.npz"

    def relabel_done(self, linear) -> Path:
        return self.relabel / f"{int(linear)}.done"

    def save_record(self, linear, **arrays) -> None:
        """Write a block's record atomically: from then on the block counts as done."""
        storage.save_npz(self.record(linear), **arrays)

    def load_stats(self, linear, name=None) -> dict:
        """A block's label count and per-label statistics (not its face views); ``name``
        is how the block is shown in an error (its grid index)."""
        path = self.record(linear)
        try:
            return storage.load_npz(path, skip_prefix=VIEW_PREFIX)
        except Exception as exc:
            raise InputError(f"cannot read the record of block {name if name is not None else int(linear)} "
                             f"({path}): {exc}") from exc

    def load_views(self, linear) -> dict:
        """A block's face views (one file open)."""
        path = self.record(linear)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files if k.startswith(VIEW_PREFIX)}
        except Exception as exc:  # unreadable or damaged record
            raise InputError(f"cannot read the face views of block {int(linear)} from {path}: "
                             f"{type(exc).__name__}: {exc}; re-run with --restart") from exc

    def done_blocks(self, kept) -> list:
        return [b for b in kept if self.record(b).exists()]

    def clear_relabel_markers(self) -> None:
        for p in self.relabel.glob("*.done"):
            p.unlink()

    # -- the whole directory -------------------------------------------------------
    def read_run(self) -> dict | None:
        return storage.read_json(self.run_json) if self.run_json.exists() else None

    def check(self, run_id: str, fingerprint: dict, restart: bool) -> bool:
        """True when the directory holds this very run (resume); raise when it holds another
        one (without ``restart``) or something that is not a run at all."""
        old = self.read_run()
        if old is not None:
            if old.get("run_id") == run_id:
                return True
            if not restart:
                diff = fingerprint_diff(old.get("fingerprint", {}), fingerprint)
                raise ResumeMismatchError(
                    f"work directory {str(self.path)!r} holds a run with another configuration ("
                    + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
                    + "); re-run with the original settings to resume, or pass --restart to start over")
            return False
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            # never delete what we did not make, whatever the flags
            raise InputError(f"work directory {str(self.path)!r} exists but holds no mpicellpose run; remove it or "
                             f"choose --work-dir")
        return False

    def prepare(self, run_id: str, fingerprint: dict, shape, blocksize, reuse: bool) -> None:
        """Create the directory for this run (after :meth:`check`); ``reuse``: keep the
        state of the same run (resume), else start over."""
        if self.run_json.exists() and not reuse:
            self.remove()
        self.path.mkdir(parents=True, exist_ok=True)
        self.blocks.mkdir(exist_ok=True)
        self.relabel.mkdir(exist_ok=True)
        if not self.run_json.exists():
            storage.write_json(self.run_json, {"run_id": run_id, "fingerprint": fingerprint,
                                               "created": datetime.datetime.now().isoformat(timespec="seconds")})
        if not self.scratch.exists():
            storage.create_array(self.scratch, shape, blocksize, np.uint32, zarr_format=2)

    def remove(self) -> None:
        """Remove what a run made here, then the directory if that left it empty (a user's
        file put there survives, with a warning)."""
        if not self.path.is_dir():
            return
        for name in self.OWN:
            p = self.path / name
            if p.exists() or p.is_symlink():
                storage.remove_path(p)
        try:
            self.path.rmdir()
        except OSError:
            log.warning("kept the work directory %s: it holds files mpicellpose did not make (%s)", self.path,
                        ", ".join(sorted(os.listdir(self.path))[:5]))
