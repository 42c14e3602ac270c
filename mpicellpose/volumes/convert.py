"""``mpicellpose convert``: copy any supported input into a (OME-)zarr array, block by block.

Reads TIFF files and stacks, globs of TIFF tiles, HDF5 datasets, zarr arrays and
OME-Zarr images (anything :func:`mpicellpose.volumes.readers.open_volume_spec` opens) and writes a
chunked zarr array (``--ome``: an OME-Zarr image group with the array as level ``0``).
The volume is never loaded whole: the output is cut into work units made of whole
output chunks (grown to cover the input's own chunks where that saves re-reading, within
a memory budget); under ``mpiexec`` the units are split into contiguous runs, one per
rank, so each output chunk is written by exactly one rank.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ..errors import ConfigError, InputError, UnsafeOutputError
from ..grid import geometry as geo
from ..grid.partition import contiguous_bounds
from . import ngff, ngff_io, readers, safety, storage
from .volume import SPATIAL, VoxelSize, normalize_unit

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 128
DEFAULT_BUDGET = 256 * 2**20  # bytes read per work unit at most (when input chunks are huge)


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote (the same on every rank).

    Attributes
    ----------
    path : str
        The written array (``OUTPUT`` or ``OUTPUT/0`` for ``ome=True``).
    shape, chunks : tuple
    dtype : str
    axes : tuple of str
    n_units : int
        Work units (groups of whole output chunks) copied, over all ranks.
    seconds : float
    """

    path: str
    shape: tuple
    chunks: tuple
    dtype: str
    axes: tuple
    n_units: int
    seconds: float


def parse_triple(text, name: str, kind=float):
    """``"2"`` or ``"2,0.5,0.5"`` -> tuple (one value per axis or a single value).

    Examples
    --------
    >>> parse_triple("64,128,128", "chunks", int), parse_triple("2.5", "voxel size")
    ((64, 128, 128), (2.5,))
    """
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return (kind(text),)
    if isinstance(text, (tuple, list)):
        vals = tuple(text)
    else:
        vals = tuple(p for p in str(text).replace("x", ",").split(",") if p.strip())
    try:
        out = tuple(kind(v) for v in vals)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number or comma-separated numbers, got {text!r}") from None
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise ConfigError(f"{name} must be positive, got {text!r}")
    return out


def output_chunks(shape, axes, chunks) -> tuple:
    """Chunk shape of the output: ``chunks`` on spatial axes, whole channel axis, 1 elsewhere.

    Examples
    --------
    >>> output_chunks((3, 100, 300, 300), ("c", "z", "y", "x"), (64,))
    (3, 64, 64, 64)
    >>> output_chunks((100, 300, 300), ("z", "y", "x"), (16, 128, 128))
    (16, 128, 128)
    """
    spatial = [i for i, a in enumerate(axes) if a in SPATIAL]
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) == 1:
        chunks = chunks * len(spatial)
    if len(chunks) != len(spatial):
        raise ConfigError(f"chunks {chunks} must be one number or one per spatial axis "
                          f"{tuple(axes[i] for i in spatial)}")
    out = []
    it = iter(chunks)
    for s, a in zip(shape, axes):
        if a in SPATIAL:
            out.append(min(next(it), int(s)))
        elif a == "c":
            out.append(int(s))
        else:
            out.append(1)
    return tuple(max(1, c) for c in out)


def unit_shape(shape, out_chunks, in_chunks, itemsize: int, budget: int = DEFAULT_BUDGET) -> tuple:
    """Work-unit shape: whole output chunks, grown to span the input's chunks (pure).

    Reading an input chunk (a TIFF strip of a whole plane, say) costs the same whether
    one output chunk or many use it, so along each axis a unit spans as many output
    chunks as one input chunk covers, then shrinks (largest multiple first) until one
    unit holds at most ``budget`` bytes.

    Examples
    --------
    >>> unit_shape((64, 1000, 1000), (16, 100, 100), (1, 1000, 1000), 2)
    (16, 1000, 1000)
    >>> unit_shape((64, 1000, 1000), (16, 100, 100), None, 2)
    (16, 100, 100)
    >>> unit_shape((64, 1000, 1000), (16, 100, 100), (1, 1000, 1000), 2, budget=16 * 200 * 1000 * 2)
    (16, 200, 1000)
    """
    mult = []
    for s, o, i in zip(shape, out_chunks, in_chunks or out_chunks):
        n_out = -(-int(s) // int(o))
        m = -(-int(i) // int(o)) if i and int(i) > int(o) else 1
        mult.append(max(1, min(m, n_out)))

    def nbytes():
        return int(np.prod([o * m for o, m in zip(out_chunks, mult)])) * int(itemsize)

    for j in range(len(mult)):  # shrink outer axes first: units stay runs of whole rows
        if nbytes() <= budget:
            break
        per_step = nbytes() // mult[j]
        mult[j] = max(1, min(mult[j], int(budget // max(per_step, 1))))
    return tuple(min(int(o) * m, int(s)) if m > 1 else int(o) for o, m, s in zip(out_chunks, mult, shape))


def _same_path(a, b) -> bool:
    return os.path.abspath(str(a)).rstrip("/") == os.path.abspath(str(b)).rstrip("/")


def _prepare(vol, source, output, *, chunks, zarr_format, as_ome, voxel_size, unit, overwrite):
    """Rank 0: check the output location, create the array (and OME metadata)."""
    if isinstance(source, (str, os.PathLike)) and _same_path(str(source).split(":")[0], output):
        raise ConfigError(f"output {str(output)!r} is the same path as the input")
    if not str(output).strip():
        raise UnsafeOutputError("OUTPUT is empty (an unset shell variable?): give the path of the zarr to write")
    protected = safety.protected_paths(SimpleNamespace(input=source, mask=None, config_file=None))
    safety.check_target("OUTPUT", repr(str(output)), output, protected)
    replaces = safety.replaceable(output, repr(str(output)), overwrite, runs=False)
    if replaces:
        safety.remove_zarr(output, replaces)
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    storage.check_writable(parent)
    vs = voxel_size
    spatial = [a for a in vol.axes if a in SPATIAL]
    if vs is not None:
        vs = tuple(float(v) for v in vs)
        if len(vs) == 1:
            vs = vs * len(spatial)
        if len(vs) != len(spatial):
            raise ConfigError(f"voxel size {vs} needs one value per spatial axis {tuple(spatial)}")
        units = (normalize_unit(unit),) * len(spatial) if unit else \
            (vol.voxel_size.units if vol.voxel_size is not None and vol.voxel_size.axes == tuple(spatial)
             else (None,) * len(spatial))
        vs = VoxelSize(tuple(spatial), vs, units)
    elif vol.voxel_size is not None:
        vs = vol.voxel_size
        if unit:
            vs = VoxelSize(vs.axes, vs.size, (normalize_unit(unit),) * len(vs.axes), vs.origin)
    attrs = {"mpicellpose": {"converted_from": str(source) if isinstance(source, (str, os.PathLike)) else
                             type(source).__name__, "axes": list(vol.axes),
                             "voxel_size": None if vs is None else list(vs.size),
                             "units": None if vs is None else list(vs.units)}}
    if as_ome:
        group, path = ngff.standalone_label_paths(output)
        arr = storage.create_array(path, vol.shape, chunks, vol.dtype, zarr_format=zarr_format, attrs=attrs,
                                   **ngff.array_options(zarr_format, vol.axes))
        ngff_io.write_multiscales_metadata(group, vol.axes, vs, zarr_format=zarr_format,
                                           name=os.path.basename(str(output).rstrip("/")))
    else:
        path = str(output)
        arr = storage.create_array(path, vol.shape, chunks, vol.dtype, zarr_format=zarr_format, attrs=attrs)
    return path, tuple(int(c) for c in arr.chunks)


def convert(source, output, *, chunks=DEFAULT_CHUNK, zarr_format: int = 2, as_ome: bool = False,
            voxel_size=None, unit=None, dataset=None, level=0, channel=None, timepoint=None, axes=None,
            tile_pattern=None, overwrite: bool = False, comm=None, budget: int = DEFAULT_BUDGET) -> ConvertResult:
    """Copy ``source`` into a new zarr array (or OME-Zarr image) at ``output``; collective.

    Every rank of ``comm`` (COMM_WORLD by default) calls it with the same arguments;
    each opens the input itself and writes whole output chunks of its own.

    Parameters
    ----------
    source : str or array-like
        Anything :func:`mpicellpose.volumes.readers.open_volume_spec` opens.
    output : str
        Zarr array to create (``as_ome``: OME-Zarr group with level ``0``).
    chunks : int or tuple
        Chunk size per spatial axis (channels are kept whole in a chunk).
    zarr_format : {2, 3}
        On-disk format; with ``as_ome`` 2 writes NGFF 0.4 and 3 writes NGFF 0.5.
    as_ome : bool
        Write an OME-Zarr image (axes reordered to t, c, z, y, x).
    voxel_size : sequence of float, optional
        Physical size per spatial axis (default: what the input says, else 1).
    unit : str, optional
        Unit of the voxel size (``micrometer``; ``um`` is understood).
    dataset, level, channel, timepoint, axes, tile_pattern
        Passed to :func:`mpicellpose.volumes.readers.open_volume_spec`.
    overwrite : bool
        Replace an existing ``output`` (otherwise :class:`OutputExistsError`).
    budget : int
        Bytes one work unit may read at most.

    Returns
    -------
    ConvertResult

    Examples
    --------
    >>> import tempfile, os, tifffile
    >>> d = tempfile.mkdtemp()
    >>> data = np.arange(6 * 20 * 30, dtype=np.uint16).reshape(6, 20, 30)
    >>> tifffile.imwrite(os.path.join(d, "stack.tif"), data)
    >>> r = convert(os.path.join(d, "stack.tif"), os.path.join(d, "out.zarr"), chunks=8)
    >>> r.shape, r.chunks
    ((6, 20, 30), (6, 8, 8))
    >>> bool((storage.open_array(r.path)[...] == data).all())
    True
    """
    from .. import comm as mpi

    t0 = time.perf_counter()
    if zarr_format not in (2, 3):
        raise ConfigError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
    chunk_vals = parse_triple(chunks, "chunks", int)
    comm = mpi.dup(comm)
    vol = None
    try:
        rank, size = comm.Get_rank(), comm.Get_size()
        box = mpi.Mailbox(comm)
        with box.step("opening the input"):
            vol = readers.open_volume_spec(source, dataset, level=level, channel=channel, timepoint=timepoint,
                                           axes=axes, tile_pattern=tile_pattern)
            if as_ome:
                vol = vol.to_ngff_order()
            if any(s == 0 for s in vol.shape):
                raise InputError(f"input shape {vol.shape} has a zero-sized axis")
            out_chunks = output_chunks(vol.shape, vol.axes, chunk_vals)
        path, out_chunks = box.on_root(
            lambda: _prepare(vol, source, str(output), chunks=out_chunks, zarr_format=zarr_format, as_ome=as_ome,
                             voxel_size=voxel_size, unit=unit, overwrite=overwrite), "creating the output")
        ushape = unit_shape(vol.shape, out_chunks, getattr(vol.array, "chunks", None), vol.dtype.itemsize, budget)
        boxes = [geo.box_slices(b) for b in geo.chunk_boxes(vol.shape, ushape)]
        mine = range(*contiguous_bounds(len(boxes), size, rank))
        if rank == 0:
            log.info("convert %s -> %s: %s %s, chunks %s, %d work unit(s) of %s on %d rank(s)", source, path,
                     vol.shape, vol.dtype, out_chunks, len(boxes), ushape, size)
        with box.step("copying the data"):
            out = storage.open_array(path, mode="r+")
            last = time.perf_counter()
            for n, i in enumerate(mine, 1):
                sl = boxes[i]
                out[sl] = np.asarray(vol.array[sl])
                if rank == 0 and time.perf_counter() - last > 10:
                    last = time.perf_counter()
                    log.info("rank 0: %d / %d of its work units copied", n, len(mine))
                if box.poll():
                    break
        seconds = time.perf_counter() - t0
        if rank == 0:
            log.info("convert done: %s %s %s written in %.2f s", path, vol.shape, vol.dtype, seconds)
        return ConvertResult(path, vol.shape, out_chunks, str(vol.dtype), vol.axes, len(boxes), seconds)
    finally:
        if vol is not None:
            vol.close()
        mpi.free(comm)
