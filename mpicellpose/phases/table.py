"""Phase 6, every rank: the object table and the boxes, each rank the rows of its ID range.

Every rank turns the statistics of its blocks' labels into pieces keyed by final ID, sends
each piece to the rank owning that ID's range, reduces the pieces of an object (sort-based),
and writes its rows: a CSV part (concatenated in rank order by rank 0), a Parquet part, and
its rows of the boxes file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import outputs, storage
from .. import stitch as st
from .. import table as tbl
from ..workdir import WorkDir


@dataclass(frozen=True)
class TableSummary:
    n_stitched_objects: int   # objects made of pieces from more than one block
    table: str                # the CSV
    table_parquet: str | None


def _pieces(plan, mine, merge):
    """(final ID, voxels, bbox min, bbox max, coordinate sums, block) of every label of my blocks."""
    work, nd, grid = WorkDir(plan.work_dir), len(plan.shape), plan.grid
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


def _prepare(plan, csv_final, pq_dir, bpath, n_objects, parts_dir):
    """Rank 0: empty part folders (ours: the work directory's, the Parquet table's) and the boxes file."""
    if parts_dir.exists():
        storage.remove_path(parts_dir)
    parts_dir.mkdir(parents=True)
    if pq_dir is not None:
        if pq_dir.exists():
            storage.remove_path(pq_dir)
        pq_dir.mkdir(parents=True)
    tbl.create_boxes_file(bpath, n_objects, len(plan.shape))


def table_phase(plan, box, mine, merge) -> TableSummary:
    rank, size, nd = box.rank, box.size, len(plan.shape)
    n_objects = merge.n_objects
    with box.step("reading block statistics"):
        cols = _pieces(plan, mine, merge)
    dest = tbl.owner_of(cols[0], size, n_objects)
    got = box.alltoall([tuple(c[dest == r] for c in cols) for r in range(size)], "routing object rows")
    part = st.reduce_pieces(*(np.concatenate([g[i] for g in got]) for i in range(6)))
    lo, hi = tbl.id_range(rank, size, n_objects)
    csv_final, bpath = outputs.table_path(plan.output.stem), outputs.boxes_path(plan.output.stem)
    pq_dir = tbl.parquet_dir(csv_final) if tbl.have_parquet() else None
    parts_dir = WorkDir(plan.work_dir).table
    box.on_root(lambda: _prepare(plan, csv_final, pq_dir, bpath, n_objects, parts_dir),
                "preparing the object table")
    with box.step("writing the object table"):
        if not np.array_equal(part["id"], np.arange(lo, hi)):
            raise RuntimeError(f"object table rows {part['id'][:5]}... do not cover IDs {lo}..{hi - 1}")
        c = tbl.columns(part, plan.voxel_size)
        tbl.write_csv_part(parts_dir / f"part-{rank:05d}.csv", c)
        if pq_dir is not None and part["id"].size:
            tbl.write_parquet_part(pq_dir / f"part-{rank:05d}.parquet", c)
        tbl.write_boxes_rows(bpath, lo, part)
    stitched = box.allreduce_sum(int(np.count_nonzero(part["n_blocks"] > 1)), "counting stitched objects")
    box.on_root(lambda: tbl.concat_csv(csv_final, [parts_dir / f"part-{r:05d}.csv" for r in range(size)], nd),
                "joining the object table")
    return TableSummary(stitched, str(csv_final), str(pq_dir) if pq_dir is not None else None)
