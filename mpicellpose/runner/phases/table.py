"""Phase 6, every rank: the object table and the boxes, each rank the rows of its ID range.

Every rank turns the statistics of its blocks' labels into pieces keyed by final ID, sends
each piece to the rank owning that ID's range (in bounded rounds), reduces the pieces of an
object (sort-based), and writes its rows: in place into the one CSV (at the offset an
exclusive scan of the ranks' byte counts gives; rank 0 creates the file at its final size
with the header, and renames it into place once every rank has written), a Parquet part,
and its rows of the boxes file.

The intensity columns (mean, max, sum of the input per object) come from one more read of
each block's core, of the input and of the scratch labels, by the rank that owns the block
(the input is read once more in all: its bytes, spread over the ranks, plus a bincount and a
maximum per label); the pieces' sums and maxima travel with the other statistics and are
reduced in block order, so the table is the same at any rank count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scipy import ndimage

from ...grid import stitch as st
from ...volumes import storage
from .. import outputs
from .. import table as tbl


@dataclass(frozen=True)
class TableSummary:
    n_stitched_objects: int   # objects made of pieces from more than one block
    table: str                # the CSV
    table_parquet: str | None
    size_hist: tuple = ()     # objects per voxel-count class [2^k, 2^(k+1)), k = 0..SIZE_CLASSES-1


SIZE_CLASSES = 48


def size_classes(counts) -> np.ndarray:
    """Objects per voxel-count class ``[2^k, 2^(k+1))``.

    >>> size_classes(np.array([1, 2, 3, 4, 100]))[:8].tolist()
    [1, 2, 1, 0, 0, 0, 1, 0]
    """
    k = np.floor(np.log2(np.maximum(np.asarray(counts, np.float64), 1))).astype(np.int64)
    return np.bincount(np.minimum(k, SIZE_CLASSES - 1), minlength=SIZE_CLASSES).astype(np.int64)


def median_diameter(size_hist, ndim: int, anisotropy: float = 1.0) -> float | None:
    """The median object's equivalent diameter (in-plane voxels) from :func:`size_classes` (the class's
    geometric middle: within a factor 2^(1/2/ndim) of the truth); None without objects.

    >>> round(median_diameter(size_classes([2000] * 5), 3), 1)  # a ball of 2000 voxels is 15.6 across
    14.0
    """
    h = np.asarray(size_hist, np.int64)
    if h.sum() == 0:
        return None
    k = int(np.searchsorted(np.cumsum(h), (h.sum() + 1) / 2))
    voxels = 2.0 ** (k + 0.5)
    if ndim == 2:
        return float(np.sqrt(4 * voxels / np.pi))
    return float((6 * voxels * anisotropy / np.pi) ** (1 / 3))


def n_channels(plan, src) -> int:
    """Channels of the input as the run reads it (1 without a channel axis)."""
    return 1 if plan.channel_axis is None else int(src.shape[plan.channel_axis])


def _acc_dtype(src):
    """Integer inputs add up exactly in int64, the others in float64."""
    return np.int64 if np.dtype(src.dtype).kind in "biu" else np.float64


def block_intensity(src, channel_axis, labels, n: int, core_slices):
    """(sums, maxima), each ``(n, channels)``, of the input over labels 1..n of a block's core
    (``labels``: the block-local labels of the core)."""
    sl = list(core_slices)
    if channel_axis is not None:
        sl.insert(channel_axis, slice(None))
    img = np.asarray(src[tuple(sl)])
    img = img[..., None] if channel_axis is None else np.moveaxis(img, channel_axis, -1)
    lab = np.asarray(labels).ravel()
    acc = _acc_dtype(src)
    index = np.arange(1, n + 1)
    isum = np.zeros((n, img.shape[-1]), acc)
    imax = np.zeros((n, img.shape[-1]), acc)
    for c in range(img.shape[-1]):
        v = img[..., c].ravel()
        if acc is np.int64:   # exact: a bincount's float64 weights hold integers up to 2^53
            isum[:, c] = np.bincount(lab, weights=v, minlength=n + 1)[1:n + 1].astype(np.int64)
        else:
            isum[:, c] = np.bincount(lab, weights=v.astype(np.float64), minlength=n + 1)[1:n + 1]
        imax[:, c] = ndimage.maximum(v, lab, index) if n else []
    return isum, imax


def _pieces(ctx, mine, merge):
    """(final ID, voxels, bbox min, bbox max, coordinate sums, block, intensity sums, intensity
    maxima) of every label of my blocks."""
    plan, work, src = ctx.plan, ctx.work, ctx.src
    nd, grid, nch, acc = len(plan.shape), plan.grid, n_channels(plan, src), _acc_dtype(src)
    pieces = []
    scratch = storage.open_array(work.scratch, mode="r") if any(merge.counts[b] for b in mine) else None
    for b in mine:
        n = int(merge.counts[b])
        if not n:
            continue
        rec = work.load_stats(b, name=grid.index_of(b))
        core = grid.block(b).core_slices
        isum, imax = block_intensity(src, plan.channel_axis, scratch[core], n, core)
        pieces.append((merge.lut(b)[1:].astype(np.int64), rec["count"], rec["bbox_min"], rec["bbox_max"],
                       rec["coord_sum"], np.full(n, b, np.int64), isum, imax))
    if pieces:
        return [np.concatenate([p[i] for p in pieces]) for i in range(8)]
    return [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, nd), np.int64), np.zeros((0, nd), np.int64),
            np.zeros((0, nd), np.float64), np.zeros(0, np.int64), np.zeros((0, nch), acc), np.zeros((0, nch), acc)]


def _prepare(ctx, csv_tmp, rows_bytes, pq_dir, bpath, n_objects):
    """Rank 0: the CSV at its final size with its header, an empty Parquet folder, the boxes file."""
    plan, nch = ctx.plan, n_channels(ctx.plan, ctx.src)
    if pq_dir is not None:
        if pq_dir.exists():
            storage.remove_path(pq_dir)
        pq_dir.mkdir(parents=True)
    tbl.create_csv(csv_tmp, len(plan.shape), rows_bytes, physical=plan.voxel_size is not None, channels=nch)
    unit_of = tbl.units(len(plan.shape), plan.voxel_size, plan.voxel_unit, nch, ctx.src.dtype)
    storage.write_json(outputs.table_units_path(plan.output.stem),
                       {"voxel_size": None if plan.voxel_size is None else list(plan.voxel_size),
                        "voxel_unit": plan.voxel_unit, "columns": [[k, u] for k, u in unit_of.items()]})
    tbl.create_boxes_file(bpath, n_objects, len(plan.shape))


def table_phase(ctx, mine, merge) -> TableSummary:
    """Every rank: the object table's rows of its ID range, written in place; boxes; counts."""
    plan, box = ctx.plan, ctx.box
    rank, size, nd = box.rank, box.size, len(plan.shape)
    n_objects = merge.n_objects
    with box.step("reading block statistics and intensities"):
        cols = _pieces(ctx, mine, merge)
    dest = tbl.owner_of(cols[0], size, n_objects)
    got = box.alltoall_arrays(st.split_rows(dest, size, *cols), "routing object rows")
    got = [np.concatenate([g[i] for g in got]) for i in range(8)]
    part = st.reduce_pieces(*got[:6])
    part.update(tbl.reduce_intensity(got[0], got[5], got[6], got[7]))
    del got, cols
    lo, hi = tbl.id_range(rank, size, n_objects)
    csv_final, bpath = outputs.table_path(plan.output.stem), outputs.boxes_path(plan.output.stem)
    csv_tmp = Path(str(csv_final) + ".tmp")
    pq_dir = tbl.parquet_dir(csv_final) if tbl.have_parquet() else None
    c, text = None, []
    with box.step("formatting the object table"):
        if not np.array_equal(part["id"], np.arange(lo, hi)):
            raise RuntimeError(f"object table rows {part['id'][:5]}... do not cover IDs {lo}..{hi - 1}")
        c = tbl.columns(part, plan.voxel_size)
        text = tbl.csv_chunks(c)
    before, total = box.exscan_sum(sum(len(t) for t in text), "placing the object table's rows")
    box.on_root(lambda: _prepare(ctx, csv_tmp, total, pq_dir, bpath, n_objects), "preparing the object table")
    with box.step("writing the object table"):
        head = tbl.header_bytes(nd, plan.voxel_size is not None, n_channels(plan, ctx.src))
        tbl.write_at(csv_tmp, len(head) + before, text)
        del text
        if pq_dir is not None and part["id"].size:
            tbl.write_parquet_part(pq_dir / f"part-{rank:05d}.parquet", c)
        tbl.write_boxes_rows(bpath, lo, part)
    mine_counts = np.concatenate([[np.count_nonzero(part["n_blocks"] > 1)], size_classes(part["count"])])
    counted = box.allreduce_sum(mine_counts.astype(np.int64), "counting stitched objects")
    box.on_root(lambda: os.replace(csv_tmp, csv_final), "publishing the object table")
    return TableSummary(int(counted[0]), str(csv_final), str(pq_dir) if pq_dir is not None else None,
                        tuple(int(x) for x in counted[1:]))
