"""The object table: one row per object, written in parallel.

Every rank owns a contiguous range of final IDs (:func:`id_range`), reduces the pieces of
its objects (sort based, see :func:`mpicellpose.grid.stitch.reduce_pieces`) and writes its rows:
its rows of the one CSV, in place at an offset from an exclusive scan of the ranks' byte
counts (rank 0 creates the file at its final size and writes the header), a Parquet part (a
multi-file dataset, when pyarrow is installed) and its rows of the (N, D, 2) boxes array.
Nothing is quadratic, no rank concatenates or holds the whole table.

Columns: ``id, voxels, [volume_phys], <axis>_min..., <axis>_max... (exclusive), centroid_<axis>...
(voxels), [centroid_<axis>_phys...], intensity_mean, intensity_max, intensity_sum, n_blocks,
stitched, blocks`` (``blocks``: linear indices of the blocks the object spans, ``;``-separated;
the intensities are of the input as read, per channel ``intensity_mean_c0, ...`` when the input
keeps a channel axis).  The bracketed columns, in physical units, are there when the voxel size is
known (from the input or ``--voxel-size``); a JSON file beside the table (:func:`units`) says the
unit of every column.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..grid.partition import contiguous_bounds, contiguous_owner


def id_range(rank: int, size: int, n: int):
    """Final IDs ``[lo, hi)`` owned by ``rank`` (pieces go to ``(id - 1) * size // n``).

    Examples
    --------
    >>> [id_range(r, 3, 10) for r in range(3)]
    [(1, 5), (5, 8), (8, 11)]
    """
    lo, hi = contiguous_bounds(n, size, rank)
    return lo + 1, hi + 1


def owner_of(ids: np.ndarray, size: int, n: int) -> np.ndarray:
    """Rank owning each final ID (consistent with :func:`id_range`)."""
    return contiguous_owner(np.asarray(ids, np.int64) - 1, n, size)


def axis_names(ndim: int):
    return list("zyx"[-ndim:]) if ndim <= 3 else [f"a{i}" for i in range(ndim)]


INTENSITY = ("mean", "max", "sum")


def intensity_names(channels) -> list:
    """The intensity columns for an input of ``channels`` channels (0 or None: no columns; 1: the
    one channel, unsuffixed).

    >>> intensity_names(1), intensity_names(2)[:2]
    (['intensity_mean', 'intensity_max', 'intensity_sum'], ['intensity_mean_c0', 'intensity_max_c0'])
    """
    if not channels:
        return []
    suffix = [""] if channels == 1 else [f"_c{k}" for k in range(channels)]
    return [f"intensity_{what}{s}" for s in suffix for what in INTENSITY]


def header(ndim: int, physical: bool = True, channels: int = 0) -> list:
    """The table's column names (``physical``: the voxel size is known; ``channels``: of the input,
    for the intensity columns)."""
    ax = axis_names(ndim)
    return (["id", "voxels"] + (["volume_phys"] if physical else []) + [f"{a}_min" for a in ax]
            + [f"{a}_max" for a in ax] + [f"centroid_{a}" for a in ax]
            + ([f"centroid_{a}_phys" for a in ax] if physical else []) + intensity_names(channels)
            + ["n_blocks", "stitched", "blocks"])


def units(ndim: int, voxel_size, voxel_unit, channels: int = 0, dtype=None) -> dict:
    """The unit of every column (written beside the table as JSON).

    >>> units(2, (0.5, 0.25), "micrometer")["volume_phys"], units(2, None, None)["centroid_y"]
    ('micrometer^2', 'voxel')
    >>> units(3, None, None, 1, "uint16")["intensity_sum"]
    'input intensity (uint16 values), summed over the voxels'
    """
    unit = voxel_unit or "unknown unit"
    out = {name: "voxel" for name in header(ndim, voxel_size is not None, channels)}
    value = f"input intensity ({np.dtype(dtype).name if dtype is not None else 'as read'} values)"
    for name in intensity_names(channels):
        out[name] = value + (", summed over the voxels" if "_sum" in name else "")
    out.update({"id": "label", "voxels": "voxel count", "n_blocks": "count", "stitched": "0 or 1",
                "blocks": "linear block indices, ;-separated"})
    if voxel_size is not None:
        out["volume_phys"] = f"{unit}^{ndim}"
        out.update({f"centroid_{a}_phys": unit for a in axis_names(ndim)})
    return out


def columns(part: dict, voxel_size) -> dict:
    """Named columns of a reduced partition (numpy arrays; ``blocks`` as strings)."""
    n, nd = part["bbox_min"].shape if part["bbox_min"].ndim == 2 else (0, 0)
    ax = axis_names(nd)
    cent = part["coord_sum"] / np.maximum(part["count"], 1)[:, None] if n else np.zeros((0, nd))
    cols = {"id": part["id"], "voxels": part["count"]}
    if voxel_size is not None:
        vs = np.asarray(voxel_size, np.float64)
        cols["volume_phys"] = np.asarray(part["count"], np.float64) * float(np.prod(vs))
    for k, a in enumerate(ax):
        cols[f"{a}_min"] = part["bbox_min"][:, k]
    for k, a in enumerate(ax):
        cols[f"{a}_max"] = part["bbox_max"][:, k]
    for k, a in enumerate(ax):
        cols[f"centroid_{a}"] = cent[:, k]
    for k, a in enumerate(ax):
        if voxel_size is not None:
            cols[f"centroid_{a}_phys"] = cent[:, k] * vs[k]
    cols.update(intensity_columns(part))
    cols["n_blocks"] = part["n_blocks"]
    cols["stitched"] = (part["n_blocks"] > 1).astype(np.int8)
    cols["blocks"] = blocks_strings(part)
    return cols


def intensity_columns(part: dict) -> dict:
    """Mean, max and sum of the input per object and channel (``part``'s ``intensity_sum`` and
    ``intensity_max``, ``(n, channels)``), named as :func:`intensity_names` says; none without them."""
    if "intensity_sum" not in part:
        return {}
    isum, imax = part["intensity_sum"], part["intensity_max"]
    names = intensity_names(isum.shape[1])
    cols = {}
    for c in range(isum.shape[1]):
        mean_, max_, sum_ = names[3 * c: 3 * c + 3]
        cols[mean_] = isum[:, c] / np.maximum(part["count"], 1)
        cols[max_] = imax[:, c]
        cols[sum_] = isum[:, c]
    return cols


def reduce_intensity(ids, block, isum, imax) -> dict:
    """Intensity sums and maxima of the pieces of each object (``ids`` final IDs, ``block`` the
    piece's block), in the order of ``np.unique(ids)``; the pieces are added in block order, so
    the sums (floats too) are the same whatever ranks held the blocks."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        return {"intensity_sum": isum[:0], "intensity_max": imax[:0]}
    order = np.lexsort((np.asarray(block, np.int64), ids))
    s = ids[order]
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return {"intensity_sum": np.add.reduceat(isum[order], start, axis=0),
            "intensity_max": np.maximum.reduceat(imax[order], start, axis=0)}


def blocks_strings(part: dict) -> np.ndarray:
    """``;``-joined block indices per object, ascending, each once (vectorised: one sort for all
    objects of more than one piece, then one join per such object)."""
    n = part["id"].size
    blk, start = part.get("block_sorted"), part.get("block_start")
    if blk is None or n == 0:
        return np.array([""] * n, dtype=object)
    out = blk[start[:-1]].astype(str).astype(object)
    pieces = np.diff(start)
    if not (pieces > 1).any():
        return out
    obj = np.repeat(np.arange(n), pieces)          # the object of each piece (pieces sorted by object)
    sel = pieces[obj] > 1
    o, b = obj[sel], np.asarray(blk)[sel]
    order = np.lexsort((b, o))
    o, b = o[order], b[order]
    keep = np.r_[True, (o[1:] != o[:-1]) | (b[1:] != b[:-1])]   # a block once per object
    o, text = o[keep], b[keep].astype(str).tolist()
    cut = np.flatnonzero(np.r_[True, o[1:] != o[:-1], True]).tolist()
    for i, j in zip(cut[:-1], cut[1:]):
        out[o[i]] = ";".join(text[i:j])
    return out


def format_csv(cols: dict) -> str:
    """CSV lines (no header) of a partition."""
    n = cols["id"].size
    if n == 0:
        return ""
    parts = []
    for name, v in cols.items():
        if name == "blocks":
            parts.append(np.asarray(v, dtype=str))
        elif np.asarray(v).dtype.kind == "f":
            parts.append(np.char.mod("%.3f", v))
        else:
            parts.append(np.asarray(v).astype(str))
    lines = parts[0].astype(object)
    for p in parts[1:]:
        lines = lines + "," + p.astype(object)
    return "\n".join(lines.tolist()) + "\n"


def csv_chunks(cols: dict, rows: int = 1 << 17) -> list:
    """A partition's rows (no header) as CSV text, in chunks of ``rows`` rows (bytes-like
    objects, the memory of formatting bounded by a chunk); through pyarrow's C++ writer when
    installed (about 20x faster than formatting in numpy), with the same text either way."""
    n = int(cols["id"].size)
    return [_csv_text({k: v[i:i + rows] for k, v in cols.items()}) for i in range(0, n, rows)]


def _csv_text(cols: dict):
    if have_parquet() and cols["id"].size:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        arrays = {}
        for k, v in cols.items():
            if k == "blocks":
                arrays[k] = pa.array(np.asarray(v, dtype=object), pa.string())
            elif np.asarray(v).dtype.kind == "f":
                arrays[k] = _fixed3(v)
            else:
                arrays[k] = pa.array(np.asarray(v))
        sink = pa.BufferOutputStream()
        pcsv.write_csv(pa.table(arrays), sink, write_options=pcsv.WriteOptions(include_header=False,
                                                                                quoting_style="none"))
        return sink.getvalue()   # a pyarrow Buffer: bytes-like, not copied
    return format_csv(cols).encode()


def header_bytes(ndim: int, physical: bool = True, channels: int = 0) -> bytes:
    return (",".join(header(ndim, physical, channels)) + "\n").encode()


def create_csv(path, ndim: int, rows_bytes: int, physical: bool = True, channels: int = 0) -> None:
    """Rank 0: the table file at its final size (header + every rank's rows), header written;
    each rank then writes its rows in place (:func:`write_at`)."""
    head = header_bytes(ndim, physical, channels)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + int(rows_bytes))


def write_at(path, offset: int, chunks, step: int = 1 << 26) -> None:
    """Positioned writes (``os.pwrite``: no append, no file position shared with anyone) of
    the bytes-like ``chunks`` one after the other from ``offset``; synced."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:done + step], offset + done)
            offset += len(view)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fixed3(values):
    """Floats as decimals with 3 digits after the point (``round(v * 1000)`` thousandths), written
    by pyarrow's CSV writer as text like ``-12.340``; built from the int64 thousandths in numpy
    (``pyarrow.compute`` is not imported: its import alone costs ~0.1 s of CPU on every rank)."""
    import pyarrow as pa

    q = np.round(np.asarray(values, np.float64) * 1000.0).astype(np.int64)
    words = np.empty((q.size, 2), np.int64)   # a decimal128: little-endian, two's complement
    words[:, 0] = q
    words[:, 1] = q >> 63
    return pa.Array.from_buffers(pa.decimal128(38, 3), q.size, [None, pa.py_buffer(words)])


def have_parquet() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def write_parquet_part(path, cols: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: (pa.array(np.asarray(v, dtype=object), pa.string()) if k == "blocks"
                          else pa.array(np.asarray(v))) for k, v in cols.items()})
    pq.write_table(table, path)


def create_boxes_file(path, n: int, ndim: int):
    """Rank 0: an (n, ndim, 2) int64 .npy every rank then fills at its rows."""
    arr = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.int64, shape=(n, ndim, 2))
    del arr


def write_boxes_rows(path, lo: int, part: dict) -> None:
    n = part["id"].size
    if n == 0:
        return
    arr = np.load(str(path), mmap_mode="r+")
    arr[lo - 1: lo - 1 + n, :, 0] = part["bbox_min"]
    arr[lo - 1: lo - 1 + n, :, 1] = part["bbox_max"]
    arr.flush()
    del arr


def parquet_dir(csv_path) -> Path:
    return Path(str(csv_path)[: -len(".csv")] + ".parquet")
