"""Phase 6, every rank: the object table and the boxes, each rank the rows of its ID range.

Every rank turns the statistics of its blocks' labels into pieces keyed by final ID, sends
each piece to the rank owning that ID's range (in bounded rounds), reduces the pieces of an
object (sort-based), and writes its rows: in place into the one CSV (at the offset an
exclusive scan of the ranks' byte counts gives; rank 0 creates the file at its final size
with the header, and renames it into place once every rank has written), a Parquet part,
and its rows of the boxes file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def _pieces(plan, work, mine, merge):
    """(final ID, voxels, bbox min, bbox max, coordinate sums, block) of every label of my blocks."""
    nd, grid = len(plan.shape), plan.grid
    pieces = []
    for b in mine:
        n = int(merge.counts[b])
        if not n:
            continue
        rec = work.load_stats(b, name=grid.index_of(b))
        pieces.append((merge.lut(b)[1:].astype(np.int64), rec["count"], rec["bbox_min"], rec["bbox_max"],
                       rec["coord_sum"], np.full(n, b, np.int64)))
    if pieces:
        return [np.concatenate([p[i] for p in pieces]) for i in range(6)]
    return [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, nd), np.int64), np.zeros((0, nd), np.int64),
            np.zeros((0, nd), np.float64), np.zeros(0, np.int64)]


def _prepare(plan, csv_tmp, rows_bytes, pq_dir, bpath, n_objects):
    """Rank 0: the CSV at its final size with its header, an empty Parquet folder, the boxes file."""
    if pq_dir is not None:
        if pq_dir.exists():
            storage.remove_path(pq_dir)
        pq_dir.mkdir(parents=True)
    tbl.create_csv(csv_tmp, len(plan.shape), rows_bytes, physical=plan.voxel_size is not None)
    storage.write_json(outputs.table_units_path(plan.output.stem),
                              {"voxel_size": None if plan.voxel_size is None else list(plan.voxel_size),
                               "voxel_unit": plan.voxel_unit,
                               "columns": [[k, u] for k, u in tbl.units(len(plan.shape), plan.voxel_size,
                                                                        plan.voxel_unit).items()]})
    tbl.create_boxes_file(bpath, n_objects, len(plan.shape))


def table_phase(ctx, mine, merge) -> TableSummary:
    """Every rank: the object table's rows of its ID range, written in place; boxes; counts."""
    plan, box = ctx.plan, ctx.box
    rank, size, nd = box.rank, box.size, len(plan.shape)
    n_objects = merge.n_objects
    with box.step("reading block statistics"):
        cols = _pieces(plan, ctx.work, mine, merge)
    dest = tbl.owner_of(cols[0], size, n_objects)
    got = box.alltoall_arrays(st.split_rows(dest, size, *cols), "routing object rows")
    part = st.reduce_pieces(*(np.concatenate([g[i] for g in got]) for i in range(6)))
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
    box.on_root(lambda: _prepare(plan, csv_tmp, total, pq_dir, bpath, n_objects), "preparing the object table")
    with box.step("writing the object table"):
        tbl.write_at(csv_tmp, len(tbl.header_bytes(nd, plan.voxel_size is not None)) + before, text)
        del text
        if pq_dir is not None and part["id"].size:
            tbl.write_parquet_part(pq_dir / f"part-{rank:05d}.parquet", c)
        tbl.write_boxes_rows(bpath, lo, part)
    mine_counts = np.concatenate([[np.count_nonzero(part["n_blocks"] > 1)], size_classes(part["count"])])
    counted = box.allreduce_sum(mine_counts.astype(np.int64), "counting stitched objects")
    box.on_root(lambda: os.replace(csv_tmp, csv_final), "publishing the object table")
    return TableSummary(int(counted[0]), str(csv_final), str(pq_dir) if pq_dir is not None else None,
                        tuple(int(x) for x in counted[1:]))
