"""Plan-time checks of the cluster: does every rank see the same files, and has it its device?

The most common first-run mistake on a cluster is a path on node-local storage (``/tmp``,
``$TMPDIR``, a node's scratch disk): rank 0's node sees it, the others see nothing (or their
own, different folder) and fail much later with a bare "not found".  So, right after the plan:

* rank 0 writes a small check file (a random token) into the work directory and into the
  folder that holds OUTPUT's lock and tables; every rank reads both back and checks that the
  input exists with the same zarr metadata (or file size) as on rank 0; any rank that differs
  stops the job in seconds, with its rank, host and path named and the hint that the path
  looks node-local;
* every rank checks its device (:func:`mpicellpose.cellpose.gpu.check_devices`): a rank whose
  GPU is missing or unusable stops the job before any block is segmented, unless
  ``--allow-cpu-fallback``;
* the work directory then records which device segmented each block (:class:`DeviceLog`),
  which the output's provenance lists.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import replace
from pathlib import Path

from ... import comm as mpi
from ...errors import InputError, agreed
from ..faults import fault_flag
from ..runlog import log
from ..workdir import WorkDir

PROBE_PREFIX = ".mpicellpose-probe-"
DEVICES_DIR = "devices"   # in the work directory: one file per rank and run attempt


META_FILES = ("zarr.json", ".zarray", ".zgroup", ".zattrs")   # what of a zarr input is compared


def _listing(path) -> str | None:
    """A short digest of what ``path`` is (None: not there): a zarr node's metadata files, a file's size.
    Never a directory listing: a flat zarr array may hold millions of chunk files, and every rank reads."""
    try:
        if os.path.isdir(path):
            h = hashlib.sha1(b"dir")
            for name in META_FILES:
                p = os.path.join(path, name)
                if os.path.isfile(p):
                    with open(p, "rb") as f:
                        h.update(name.encode() + f.read())
            return h.hexdigest()
        return f"file {os.path.getsize(path)}"
    except OSError:
        return None


def _probe_dirs(plan) -> dict:
    """{what: folder} of the folders rank 0 writes a check file into."""
    return {"the work directory": str(plan.work_dir),
            "the folder of OUTPUT": os.path.dirname(plan.output.stem) or "."}   # where its lock and tables go


def _write_probes(plan, token) -> dict:
    """Rank 0: the check files, {what: path}."""
    out = {}
    for what, folder in _probe_dirs(plan).items():
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, PROBE_PREFIX + token)
        with open(path, "w") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
        out[what] = path
    return out


def _what_i_see(cfg, probes, token, input_digest) -> list:
    """This rank's problems: (what, path, why) for each path that it does not see as rank 0 does."""
    bad = []
    src = cfg.input if isinstance(cfg.input, (str, os.PathLike)) else None
    if src is not None and input_digest is not None and _listing(src) != input_digest:
        why = "it does not exist here" if _listing(src) is None else "it is another file or array here than on rank 0"
        bad.append(("the input", os.path.abspath(src), why))
    for what, path in probes.items():
        try:
            with open(path) as f:
                ok = f.read() == token
        except OSError:
            ok = False
        if not ok:
            bad.append((what, os.path.dirname(path), f"the check file rank 0 wrote there ({os.path.basename(path)}) "
                                                     f"is not visible here"))
    return bad


def check_shared_paths(box, cfg, plan) -> None:
    """Collective, right after the plan: every rank sees the input, the work directory and OUTPUT's
    folder as rank 0 does, or every rank raises :class:`InputError` naming who does not see what."""
    if box.size == 1:
        return
    token = uuid.uuid4().hex
    probes = box.on_root(lambda: _write_probes(plan, token), "writing the shared-path check files")
    src = cfg.input if isinstance(cfg.input, (str, os.PathLike)) else None
    digest = box.bcast(_listing(src) if box.rank == 0 and src is not None else None, "the input's listing")
    token = box.bcast(token if box.rank == 0 else None, "the shared-path token")
    mine = _what_i_see(cfg, probes, token, digest)
    seen = box.gather((mpi.processor_name(), mine), "checking the paths every rank sees")
    problem = None
    if box.rank == 0:
        for p in probes.values():
            try:
                os.unlink(p)
            except OSError:
                pass
        problem = _message([(r, host, bad) for r, (host, bad) in enumerate(seen) if bad], seen[0][0])
    problem = box.bcast(problem, "the shared-path verdict")
    if problem:
        raise agreed(InputError(problem))


def input_error(err, cfg, box):
    """``err`` (this rank's error opening the input, or None), made clear when the input is simply not
    there on this rank although rank 0 opened it: the input looks node-local."""
    src = cfg.input if isinstance(cfg.input, (str, os.PathLike)) else None
    if err is None or box.rank == 0 or src is None or os.path.exists(src):
        return err
    exc = InputError(f"rank {box.rank} on host {mpi.processor_name()} does not see the input "
                     f"{os.path.abspath(src)} (rank 0 opened it): the path looks node-local (a node's /tmp, "
                     f"$TMPDIR or local scratch disk); put the input on a file system that all nodes share")
    exc.__cause__ = err
    return exc


def _message(bad, root_host) -> str | None:
    if not bad:
        return None
    lines = []
    for r, host, items in bad[:8]:
        for what, path, why in items:
            lines.append(f"rank {r} on host {host} does not see {what} {path} as rank 0 on {root_host} does ({why})")
    more = f"; and {len(bad) - 8} more rank(s)" if len(bad) > 8 else ""
    return ("; ".join(lines) + more + ". The path looks node-local (a node's /tmp, $TMPDIR or local scratch disk): "
            "every rank must see the same input, work directory (--work-dir) and OUTPUT, so put them on a file "
            "system that all nodes share")


# --------------------------------------------------------------------------- devices
class DeviceLog(WorkDir):
    """The run's work directory, also noting which device segmented each block: one line per block
    in ``devices/<host>-<pid>.txt`` (its first line names the rank, host and device)."""

    def __init__(self, path, device: str, host: str, rank: int):
        super().__init__(path)
        self.device_line = f"{rank} {host} {device}"
        self.device_file = self.path / DEVICES_DIR / f"{host}-{os.getpid()}.txt"

    def save_record(self, linear, **arrays) -> None:
        super().save_record(linear, **arrays)
        new = not self.device_file.exists()
        if new:
            self.device_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.device_file, "a") as f:
            f.write((self.device_line + "\n" if new else "") + f"{int(linear)}\n")


def _ranges(ids) -> str:
    """``0-3,7,9-10`` from sorted ints."""
    ids = sorted(set(ids))
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def block_devices(work_path) -> list:
    """Rank 0, at the end: [{rank, host, device, blocks (count), block_ids (ranges)}] from the device files
    of every attempt of the run (blocks segmented by an earlier attempt included)."""
    folder = Path(work_path) / DEVICES_DIR
    found = {}
    for p in sorted(folder.glob("*.txt")) if folder.is_dir() else ():
        lines = p.read_text().split("\n")
        if not lines or len(lines[0].split(" ", 2)) < 3:
            continue
        rank, host, device = lines[0].split(" ", 2)
        found.setdefault((int(rank), host, device), []).extend(int(x) for x in lines[1:] if x.strip().isdigit())
    return [{"rank": r, "host": h, "device": d, "blocks": len(set(ids)), "block_ids": _ranges(ids)}
            for (r, h, d), ids in sorted(found.items())]


def remove_device_log(work_path) -> None:
    """Rank 0: the device files, before the work directory goes."""
    folder = Path(work_path) / DEVICES_DIR
    for p in folder.glob("*.txt") if folder.is_dir() else ():
        p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def plan_time_checks(ctx, cfg):
    """Every rank, right after the plan: the shared-path check, the device check, and the context
    whose work directory notes each block's device (with ``--allow-cpu-fallback``, the device of a
    rank without a usable GPU set to the CPU)."""
    box, opts = ctx.box, ctx.options
    check_shared_paths(box, cfg, ctx.plan)
    device = f"cpu ({opts.backend if isinstance(opts.backend, str) else type(opts.backend).__name__} backend)"
    if opts.cellpose:
        from ...cellpose.gpu import check_devices

        device, fell_back = check_devices(box, opts.device, allow_cpu_fallback=bool(cfg.allow_cpu_fallback),
                                          injected=fault_flag("device", box.rank))
        if fell_back:   # --allow-cpu-fallback: this rank's GPU is missing or unusable, so the CPU
            ctx = replace(ctx, options=replace(opts, device="cpu"))
            device = "cpu (its GPU is missing or unusable: --allow-cpu-fallback)"
    log.debug("rank %d: device %s", box.rank, device)
    return replace(ctx, work=DeviceLog(ctx.plan.work_dir, device, mpi.processor_name(), box.rank))
