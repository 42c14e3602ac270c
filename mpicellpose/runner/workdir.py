"""The work directory of a run: every path, record, done-marker and the clean-up.

Layout 2 (``<output stem>.mpicellpose-work`` unless ``--work-dir`` names another), for block
``i`` (linear index in the grid, ``k = i // 1000``) at grid index ``(z, y, x)``::

    run.json               fingerprint of the configuration (refuses a changed one), "layout": 2
    scratch.zarr/z/y/x     block-local labels (uint32), one chunk per block, nested per grid axis
                           (a chunk of zeros only is not written)
    blocks/<k>/<i>.npz     per-block record = done marker: label count, per-label stats, the
                           views of its faces that stitching needs
    relabel/<k>/<i>.done   output chunk i written with final IDs
    table/                 the object table's parts, one per rank

    shells/                --pipeline flows: the flow boxes' shells while the sweep needs them
                           (mpicellpose.runner.phases.boxmasks; ``flows.zarr`` and ``flows/`` of
                           earlier versions are removed with the rest)

So a block has at most 3 files here (record, scratch chunk, relabel marker; a flow box adds at
most 28 while its neighbours need them), and no directory holds more than 1000 records,
markers or boxes, nor more scratch chunks than the grid has blocks along its last axis.  The scratch
chunk is fsynced (with its directory) before the record is written, and the record is
written atomically (fsync, rename): a record on disk means the block's data is on disk, also
after a node crash.  The resume scan lists the ``blocks/<k>`` directories (one read per
1000 blocks, no ``stat`` per block); at the end every rank removes its own blocks' files,
then rank 0 the rest.  A work directory of the older flat layout (``blocks/<i>.npz``, no
"layout" in run.json) is refused with a message (``--restart`` starts over), never resumed.

Only these entries are ever removed: a user's file put into the folder survives.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError, ResumeMismatchError
from ..grid.cost import flow_scratch_bytes
from ..volumes import storage

log = logging.getLogger(__name__)

VIEW_PREFIX = "v_"  # record entries holding face views (the rest are per-label statistics)
FANOUT = 1000       # records (and relabel markers) per directory: blocks/<i // FANOUT>/<i>.npz
LAYOUT = 2          # run.json's "layout"; older versions wrote none (flat blocks/<i>.npz)


_UNSET = object()  # a setting one of the two runs did not give


def fingerprint_diff(old: dict, new: dict, prefix="") -> list:
    """Readable differences between two configuration fingerprints."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _UNSET), new.get(k, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {_shown(a)} -> {_shown(b)}")
    return out


def _shown(v) -> str:
    return "(not given)" if v is _UNSET else repr(v)


class WorkDir:
    """Owns one run's work directory (all ranks build one from the same path)."""

    # run.json last: a clean-up cut short leaves a directory that still says whose it is
    OWN = ("shells", "flows.zarr", "flows", "scratch.zarr", "blocks", "relabel", "table", "stitch.npz", "devices",
           "run.json")

    def __init__(self, path):
        self.path = Path(path)
        self.run_json = self.path / "run.json"
        self.scratch = self.path / "scratch.zarr"
        self.blocks = self.path / "blocks"
        self.relabel = self.path / "relabel"
        self.table = self.path / "table"
        self.shells = self.path / "shells"    # --pipeline flows: the flow boxes' shells (phases/boxmasks.py)
        self._chunks = None   # (grid shape, dimension separator) of the scratch array, read once
        self.layout_mismatch = False  # set by check(): this run's directory has an older layout

    def __repr__(self):
        return f"WorkDir({str(self.path)!r})"

    # -- per block ---------------------------------------------------------------
    def record(self, linear) -> Path:
        return self.blocks / str(int(linear) // FANOUT) / f"{int(linear)}.npz"

    def relabel_done(self, linear) -> Path:
        return self.relabel / str(int(linear) // FANOUT) / f"{int(linear)}.done"

    def chunk(self, linear) -> Path:
        """The scratch array's chunk file of block ``linear`` (one chunk per block)."""
        if self._chunks is None:
            meta = storage.read_json(self.scratch / ".zarray")
            grid = tuple(-(-int(s) // int(c)) for s, c in zip(meta["shape"], meta["chunks"]))
            self._chunks = (grid, meta.get("dimension_separator") or ".")
        grid, sep = self._chunks
        return self.scratch.joinpath(sep.join(str(int(i)) for i in np.unravel_index(int(linear), grid)))

    def save_record(self, linear, **arrays) -> None:
        """Make the block's scratch chunk durable, then write its record atomically: from then on
        the block counts as done."""
        self.sync_chunk(linear)
        storage.save_npz(self.record(linear), **arrays)

    def sync_chunk(self, linear) -> None:
        """fsync the block's scratch chunk (when written: a chunk of zeros is not) and its directory."""
        path = self.chunk(linear)
        for p in ((path, path.parent) if path.exists() else (path.parent,)):
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            except OSError:   # a file system that cannot fsync a directory
                pass
            finally:
                os.close(fd)

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
        """The blocks of ``kept`` that have a record: one directory listing per 1000 blocks."""
        if self.layout_mismatch:
            return []   # never trusted (see check); a dry run reports nothing done
        found = set()
        for k in ({int(b) // FANOUT for b in kept} if self.blocks.is_dir() else ()):
            try:
                names = os.listdir(self.blocks / str(k))
            except FileNotFoundError:
                continue
            found.update(int(n[:-4]) for n in names if n.endswith(".npz") and n[:-4].isdigit())
        return [b for b in kept if int(b) in found]

    def clear_relabel_markers(self) -> None:
        for p in self.relabel.glob("**/*.done"):
            p.unlink()

    def remove_blocks(self, blocks) -> None:
        """Remove the files of ``blocks`` (record, relabel marker, scratch chunk): every rank its own."""
        for b in blocks:
            for p in (self.record(b), self.relabel_done(b), self.chunk(b)):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    # -- the whole directory -------------------------------------------------------
    def read_run(self) -> dict | None:
        return storage.read_json(self.run_json) if self.run_json.exists() else None

    def check(self, run_id: str, fingerprint: dict, restart: bool) -> bool:
        """True when the directory holds this very run (resume); raise when it holds another
        one (without ``restart``) or something that is not a run at all."""
        old = self.read_run()
        if old is not None:
            if old.get("run_id") == run_id and old.get("layout") != LAYOUT:
                self.layout_mismatch = True   # prepare() refuses to resume it
                return not restart
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
        if reuse and self.layout_mismatch:
            raise ResumeMismatchError(
                f"work directory {str(self.path)!r} was written by an older mpicellpose in the flat layout "
                f"(blocks/<i>.npz); this version keeps its records in blocks/<i // {FANOUT}>/ and makes every "
                f"block's data durable before its record, so it does not resume that directory: re-run with "
                f"--restart to start over, or finish the run with the version that started it")
        if self.run_json.exists() and not reuse:
            self.remove()
        self.path.mkdir(parents=True, exist_ok=True)
        n_blocks = int(np.prod([-(-int(s) // int(b)) for s, b in zip(shape, blocksize)], dtype=np.int64))
        for k in range(-(-n_blocks // FANOUT)):
            (self.blocks / str(k)).mkdir(parents=True, exist_ok=True)
            (self.relabel / str(k)).mkdir(parents=True, exist_ok=True)
        if not self.run_json.exists():
            storage.write_json(self.run_json, {"run_id": run_id, "fingerprint": fingerprint, "layout": LAYOUT,
                                               "created": datetime.datetime.now().isoformat(timespec="seconds")})
        if not self.scratch.exists():
            storage.create_array(self.scratch, shape, blocksize, np.uint32, zarr_format=2,
                                 dimension_separator=storage.NESTED)

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


# --------------------------------------------------------------------------- its file system
def free_bytes(path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = os.path.abspath(str(path))
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def check_flow_space(settings, blocks, work_dir) -> None:
    """Refuse, before any work, flow-box shells that the work directory's file system cannot hold."""
    need = flow_scratch_bytes(settings, blocks)
    free = free_bytes(work_dir)
    if free is not None and need > free:
        raise InputError(f"the flow boxes' shells of --pipeline flows need up to {_size(need)} in the work directory "
                         f"{work_dir} but its file system has {_size(free)} free; give a --work-dir on "
                         f"a larger scratch file system, a larger --flow-box, or use --pipeline blocks (no flow field)")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
