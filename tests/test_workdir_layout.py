"""The work directory a shared file system likes (issue 13): records fanned out in directories
of at most 1000, nested scratch chunks, at most 3 files per block, each block's chunk fsynced
before its record, the resume scan by directory listing, and an old flat-layout directory
refused with a clear message (never a silent wrong resume)."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
import cases  # noqa: E402
from mpicellpose import distributed_eval  # noqa: E402
from mpicellpose.config import RunConfig  # noqa: E402
from mpicellpose.errors import MpiCellposeError, ResumeMismatchError  # noqa: E402
from mpicellpose.runner.driver import run  # noqa: E402
from mpicellpose.volumes.storage import numpy_array_to_zarr  # noqa: E402
from mpicellpose.runner.workdir import FANOUT, LAYOUT, WorkDir  # noqa: E402
from segmenters import FailOnMarker  # noqa: E402

THR = {"backend": "threshold", "backend_kwargs": {"threshold": 100}}


def files_under(p):
    return [Path(d) / f for d, _, fs in os.walk(p) for f in fs]


def test_layout_files_per_block_and_chunk_synced_before_record(tmp_path, monkeypatch):
    img = cases.blobs((40, 50), 25)
    synced, order = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    import mpicellpose.volumes.storage as storage
    real_save = storage.save_npz
    monkeypatch.setattr(storage, "save_npz", lambda path, **a: (order.append((len(synced), str(path))),
                                                                 real_save(path, **a))[1])
    labels, _ = distributed_eval(img, (8, 10), tmp_path / "o.zarr", keep_work=True, **THR)
    assert np.array_equal(labels[...] > 0, img > 100)
    work = WorkDir(tmp_path / "o.mpicellpose-work")
    assert json.loads(work.run_json.read_text())["layout"] == LAYOUT
    n_blocks = 5 * 5
    assert sorted(p.name for p in (work.blocks / "0").iterdir()) == sorted(f"{i}.npz" for i in range(n_blocks))
    assert not [p for p in work.blocks.iterdir() if p.is_file()]                 # nothing flat
    per_block = len(files_under(work.blocks)) + len(files_under(work.relabel)) + \
        len([p for p in files_under(work.scratch) if not p.name.startswith(".")])
    assert per_block <= 3 * n_blocks
    assert work.chunk(7) == work.scratch / "1" / "2" and work.chunk(7).exists()  # nested: z/y(/x) per axis
    # every record was written after its block's chunk (file and directory) was fsynced
    for n_synced, path in order:
        if "/blocks/" in path:
            linear = int(Path(path).stem)
            chunk = work.chunk(linear)
            want = {str(chunk.parent.resolve())} | ({str(chunk.resolve())} if chunk.exists() else set())
            assert want <= {os.path.realpath(s) for s in synced[:n_synced]}, path   # a chunk of zeros: not written
    # the resume scan sees exactly the recorded blocks, by listing
    work.record(3).unlink()
    assert work.done_blocks(range(n_blocks)) == [b for b in range(n_blocks) if b != 3]
    assert FANOUT == 1000 and work.record(2345) == work.blocks / "2" / "2345.npz"


def test_flat_layout_of_an_older_version_is_refused_then_restart_works(tmp_path):
    img = cases.blobs((40, 50), 25)
    img[35:38, 45:48] = 77   # FailOnMarker fails on the last block: the others are recorded
    out = tmp_path / "o.zarr"
    with pytest.raises(MpiCellposeError):
        distributed_eval(img, (8, 10), out, backend=FailOnMarker())
    work = WorkDir(tmp_path / "o.mpicellpose-work")
    done = work.done_blocks(range(25))
    assert 0 < len(done) < 25
    # make it look like the old flat layout: records in blocks/, no "layout" in run.json
    for b in done:
        os.replace(work.record(b), work.blocks / f"{b}.npz")
    meta = json.loads(work.run_json.read_text())
    del meta["layout"]
    work.run_json.write_text(json.dumps(meta))
    img[35:38, 45:48] = 0
    with pytest.raises(ResumeMismatchError, match="flat layout.*--restart"):
        distributed_eval(img, (8, 10), out, backend=FailOnMarker())
    labels, _ = distributed_eval(img, (8, 10), out, backend=FailOnMarker(), restart=True)
    ref = ndimage.label(img > 100)[0]
    assert np.array_equal(labels[...] > 0, ref > 0) and labels[...].max() == ref.max()
    assert not work.path.exists()   # removed at the end (every rank its blocks' files, then rank 0)


def test_a_clean_up_cut_short_is_finished_by_the_next_run(tmp_path):
    """Killed while removing its work directory (after the completion marker): the same command finds
    the output complete and removes what is left; run.json goes last, so the leftover says whose it is."""
    assert WorkDir.OWN[-1] == "run.json"
    img = np.zeros((32, 32, 32), np.uint16)
    img[4:10, 4:10, 4:10] = img[20:26, 18:28, 3:9] = 500
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (16, 16, 16))
    cfg = dict(input=str(tmp_path / "in.zarr"), output=str(tmp_path / "out.zarr"), blocksize=16,
               backend="threshold", backend_kwargs={"threshold": 100})
    first = run(RunConfig(keep_work=True, **cfg))
    work = tmp_path / "out.mpicellpose-work"
    assert (work / "run.json").is_file()
    for name in ("scratch.zarr", "blocks"):  # the clean-up got this far
        shutil.rmtree(work / name)
    again = run(RunConfig(**cfg))
    assert again.stats.get("already_complete") and not work.exists()
    assert np.array_equal(np.asarray(first.labels[...]), np.asarray(again.labels[...]))
    # a work directory of another run there is refused as before, and not touched
    other = tmp_path / "out.mpicellpose-work"
    other.mkdir()
    (other / "run.json").write_text('{"run_id": "someone-else", "layout": 2}')
    with pytest.raises(ResumeMismatchError):
        run(RunConfig(**cfg))
    assert (other / "run.json").is_file()
