"""The reference's merge path alone (no inference), timed and measured step by step.

Input: a folder written by ``make_blocks.py`` (``local.zarr`` block-local labels,
``packed.zarr`` with the reference's ``block_index*100000 + local`` IDs, ``truth.npz``).
Run with the reference venv::

    benchmarks/.venv-reference/bin/python benchmarks/reference_merge.py \
        --blocks benchmarks/work/blocks_g4 [--relabel-workers 1] [--json RESULT.json]

Steps, each with wall time and peak RSS of this process (sampled by a thread every
``--sample-interval`` s; ``--tracemalloc`` adds exact peak numpy/Python allocations at a
cost in speed).  Every step calls the reference module's own functions
(``cellpose.contrib.distributed_segmentation``, "ref" below) unchanged:

``prepare``  per block, what ``ref.process_block`` does after inference, on the block's
    core: ``ref.bounding_boxes_in_global_coordinates(local, crop)``,
    ``ref.global_segment_ids(local, block_index, nblocks)`` (checked against packed.zarr)
    and ``ref.block_faces(packed)``.  In the reference this runs on the workers; the faces,
    boxes and box IDs are then gathered on the client, as here.
``merge``    ``ref.determine_merge_relabeling(block_indices, faces, box_ids)`` - the client's
    serial merge, with its internals timed by wrapping the module functions it calls:
    ``adjacent``   ``ref.adjacent_faces(block_indices, faces)``
    ``graph``      ``ref.block_face_adjacency_graph(face_pairs, label_range)`` (shrink
                   labels + dask-image face grouping + sparse matrix of the whole ID range)
    ``components`` ``scipy.sparse.csgraph.connected_components`` over the ID range
    ``table``      the rest: the dense lookup table (rest = merge - the three above)
``save``     ``np.save`` of the table (the reference writes it to its temporary folder).
``relabel``  what the reference does next: ``dask.array.from_zarr(packed)``,
    ``map_blocks(lambda b: np.load(table)[b])``, ``to_zarr`` (each chunk loads the whole
    table); with dask's synchronous scheduler, or threads with ``--relabel-workers N``.
    ``--relabel-sample N`` instead runs that per-chunk task on N chunks spread over the grid
    (step ``relabel_sample``) and extrapolates to every chunk (``relabel_extrapolated_s``).
``boxes``    ``ref.merge_all_boxes(boxes, table[box_ids])`` (quadratic in the label count).

The result is compared with ``truth.npz``: objects split into several final labels (the
reference does not merge thin caps) and final labels spanning several objects.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class StepMeter:
    """Per-step wall time and peak RSS (sampling thread), optionally tracemalloc peaks."""

    def __init__(self, interval=0.01, use_tracemalloc=False):
        self.proc = psutil.Process()
        self.interval = interval
        self.use_tracemalloc = use_tracemalloc
        self.steps = {}
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        if use_tracemalloc:
            tracemalloc.start()

    def _run(self):
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            with self._lock:
                self._peak = max(self._peak, rss)
            self._stop.wait(self.interval)

    def close(self):
        self._stop.set()
        self._t.join()
        if self.use_tracemalloc:
            tracemalloc.stop()

    def step(self, name):
        meter = self

        class _Ctx:
            def __enter__(self):
                self.rss0 = meter.proc.memory_info().rss
                with meter._lock:
                    meter._peak = self.rss0
                if meter.use_tracemalloc:
                    tracemalloc.reset_peak()
                    self.tm0 = tracemalloc.get_traced_memory()[0]
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t0
                rss1 = meter.proc.memory_info().rss
                with meter._lock:
                    peak = max(meter._peak, rss1)
                rec = {"s": round(dt, 4), "rss_start_bytes": self.rss0, "rss_end_bytes": rss1,
                       "peak_rss_bytes": peak, "peak_rss_delta_bytes": peak - self.rss0}
                if meter.use_tracemalloc:
                    cur, pk = tracemalloc.get_traced_memory()
                    rec["traced_peak_delta_bytes"] = pk - self.tm0
                meter.steps[name] = rec
                return False

        return _Ctx()


def _timed(store, name, fn):
    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            store[name] = store.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def compare_with_truth(final_of_piece, piece_object):
    """Split objects / false merges of a labelling of pieces against the true objects."""
    pairs = np.unique(np.stack([piece_object, final_of_piece], 1), axis=0)
    labels_per_object = np.bincount(pairs[:, 0])
    objects_per_label = np.bincount(pairs[:, 1])
    return {
        "n_objects_truth": int(np.unique(piece_object).size),
        "n_final_labels": int(np.unique(final_of_piece).size),
        "objects_split": int(np.sum(labels_per_object > 1)),
        "extra_labels_from_splits": int(np.sum(np.maximum(labels_per_object - 1, 0))),
        "labels_merging_objects": int(np.sum(objects_per_label > 1)),
        "exact": bool(np.all(labels_per_object[labels_per_object > 0] == 1)
                      and np.all(objects_per_label[objects_per_label > 0] == 1)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Time the reference's merge path on precomputed blocks.")
    p.add_argument("--blocks", required=True, help="folder written by make_blocks.py")
    p.add_argument("--relabel-workers", type=int, default=1,
                   help="1: dask synchronous scheduler; N>1: dask threads")
    p.add_argument("--skip-relabel", action="store_true")
    p.add_argument("--relabel-sample", type=int, default=0,
                   help="relabel only N chunks spread over the grid, as the reference does each "
                        "(load the whole table, index, write), and extrapolate the time to all "
                        "chunks (for grids where the full relabel takes too long); 0 = all")
    p.add_argument("--skip-boxes", action="store_true", help="skip merge_all_boxes (quadratic)")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--sample-interval", type=float, default=0.01)
    p.add_argument("--scratch", default=None, help="folder for the table and relabel output "
                   "(default: a temp dir, removed)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    res = {"tool": "reference-merge", "blocks": os.path.abspath(a.blocks), "ok": False, "error": None}
    scratch = a.scratch or tempfile.mkdtemp(prefix="refmerge_")
    os.makedirs(scratch, exist_ok=True)
    meter = None
    sub = {}
    try:
        t0 = time.perf_counter()
        import importlib.metadata as md
        import dask
        import dask.array
        import scipy.sparse.csgraph
        import zarr
        import cellpose.contrib.distributed_segmentation as ref
        res["import_s"] = round(time.perf_counter() - t0, 3)
        res["versions"] = {n: md.version(n) for n in ("cellpose", "zarr", "dask", "dask-image",
                                                        "numpy", "scipy")}
        res["rss_after_import_bytes"] = psutil.Process().memory_info().rss
        meter = StepMeter(a.sample_interval, a.tracemalloc)

        truth = np.load(os.path.join(a.blocks, "truth.npz"))
        grid, block = tuple(int(x) for x in truth["grid"]), tuple(int(x) for x in truth["block"])
        local_z = zarr.open(os.path.join(a.blocks, "local.zarr"), mode="r")
        packed_path = os.path.join(a.blocks, "packed.zarr")
        packed_z = zarr.open(packed_path, mode="r")
        nblocks = ref.get_nblocks(local_z.shape, block)
        assert tuple(nblocks) == grid, (nblocks, grid)
        res.update(grid=list(grid), block=list(block), shape=list(local_z.shape),
                   n_blocks=int(np.prod(grid)), n_pieces=int(truth["counts"].sum()))

        # ------------------------------------------------ prepare (worker side in the reference)
        block_indices, faces, boxes, box_ids_ = [], [], [], []
        with meter.step("prepare"):
            for bidx in np.ndindex(*grid):
                crop = tuple(slice(i * b, (i + 1) * b) for i, b in zip(bidx, block))
                local = np.asarray(local_z[crop]).astype(np.uint32)
                bx = ref.bounding_boxes_in_global_coordinates(local, crop)
                seg, remap = ref.global_segment_ids(local, bidx, nblocks)
                if remap[0] == 0:
                    remap = remap[1:]
                if not np.array_equal(seg, packed_z[crop]):
                    raise AssertionError(f"packed.zarr differs from global_segment_ids at {bidx}")
                block_indices.append(bidx)
                faces.append(ref.block_faces(seg))
                boxes.extend(bx)
                box_ids_.append(np.asarray(remap))
        box_ids = np.concatenate(box_ids_).astype(int)   # as distributed_eval does
        res["n_boxes"] = len(boxes)
        res["max_packed_id"] = int(box_ids.max()) if box_ids.size else 0
        res["faces_bytes"] = int(sum(f.nbytes for fs in faces for f in fs))

        # ------------------------------------------------ merge (client side, serial)
        orig = (ref.adjacent_faces, ref.block_face_adjacency_graph,
                scipy.sparse.csgraph.connected_components)
        graph_info = {}

        def graph_spy(face_pairs, nlabels):
            graph_info["n_face_pairs"] = len(face_pairs)
            g = orig[1](face_pairs, nlabels)
            graph_info["matrix_shape"] = list(g.shape)
            graph_info["matrix_nnz"] = int(g.nnz)
            return g

        ref.adjacent_faces = _timed(sub, "adjacent", orig[0])
        ref.block_face_adjacency_graph = _timed(sub, "graph", graph_spy)
        scipy.sparse.csgraph.connected_components = _timed(sub, "components", orig[2])
        try:
            with meter.step("merge"):
                new_labeling = ref.determine_merge_relabeling(block_indices, faces, box_ids)
        finally:
            (ref.adjacent_faces, ref.block_face_adjacency_graph,
             scipy.sparse.csgraph.connected_components) = orig
        sub["table"] = meter.steps["merge"]["s"] - sum(sub.values())
        res["merge_substeps_s"] = {k: round(v, 4) for k, v in sub.items()}
        res.update(graph_info)
        res["label_range"] = int(len(new_labeling) - 1)
        res["table_dtype"] = str(new_labeling.dtype)
        res["table_bytes"] = int(new_labeling.nbytes)

        table_path = os.path.join(scratch, "new_labeling.npy")
        with meter.step("save"):
            np.save(table_path, new_labeling)
        res["table_npy_bytes"] = os.path.getsize(table_path)

        # ------------------------------------------------ relabel (as distributed_eval does)
        if not a.skip_relabel and a.relabel_sample > 0:
            # the reference's per-chunk relabel task, on a sample of chunks
            n_all = int(np.prod(grid))
            pick = np.unique(np.linspace(0, n_all - 1, min(a.relabel_sample, n_all)).astype(int))
            out_path = os.path.join(scratch, "relabeled_sample.zarr")
            import numcodecs
            outz = zarr.open(out_path, mode="w", shape=packed_z.shape, chunks=packed_z.chunks,
                             dtype=np.uint32, compressor=numcodecs.Zstd(level=3))
            with meter.step("relabel_sample"):
                for lin in pick:
                    bidx = np.unravel_index(lin, grid)
                    crop = tuple(slice(i * b, (i + 1) * b) for i, b in zip(bidx, block))
                    outz[crop] = np.load(table_path)[packed_z[crop]]
            per_chunk = meter.steps["relabel_sample"]["s"] / len(pick)
            res["relabel_sampled_chunks"] = int(len(pick))
            res["relabel_s_per_chunk"] = round(per_chunk, 4)
            res["relabel_extrapolated_s"] = round(per_chunk * n_all, 2)
            a.skip_relabel = True        # no full relabel, no spot check of a full output
        if not a.skip_relabel:
            out_path = os.path.join(scratch, "relabeled.zarr")
            seg_da = dask.array.from_zarr(packed_z)
            relabeled = dask.array.map_blocks(lambda b: np.load(table_path)[b], seg_da,
                                              dtype=np.uint32, chunks=seg_da.chunks)
            sched = ({"scheduler": "synchronous"} if a.relabel_workers <= 1 else
                     {"scheduler": "threads", "num_workers": a.relabel_workers})
            with meter.step("relabel"):
                with dask.config.set(**sched):
                    dask.array.to_zarr(relabeled, out_path, overwrite=True)
            res["relabel_scheduler"] = sched

        # ------------------------------------------------ boxes
        final_of_piece = new_labeling[box_ids]
        if not a.skip_boxes:
            with meter.step("boxes"):
                merged = ref.merge_all_boxes(boxes, final_of_piece)
            res["n_merged_boxes"] = len(merged)

        res["truth"] = compare_with_truth(final_of_piece.astype(np.int64), truth["piece_object"])
        if not a.skip_relabel:
            out = zarr.open(out_path, mode="r")
            # spot check: relabeled volume == table[packed] on the first and last chunk
            for crop in (tuple(slice(0, b) for b in block),
                         tuple(slice((g - 1) * b, g * b) for g, b in zip(grid, block))):
                assert np.array_equal(out[crop], new_labeling[packed_z[crop]])
        res["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - record, don't crash
        res["error"] = {"type": type(exc).__name__, "message": str(exc)[:2000],
                        "traceback_tail": traceback.format_exc()[-4000:]}
    finally:
        if meter is not None:
            meter.close()
            res["steps"] = meter.steps
        if not a.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["client_merge_s"] = round(sum(res.get("steps", {}).get(k, {}).get("s", 0)
                                      for k in ("merge", "save", "boxes")), 4)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
