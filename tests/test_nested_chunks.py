"""Chunk files nested per grid axis (issue 23): every zarr v2 array a run writes (scratch, flow
field, output) has ``dimension_separator`` "/", so no directory of the work directory or the output
holds more than max(one grid axis's chunks, 1000 records) entries."""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from mpicellpose.config import RunConfig
from mpicellpose.runner.driver import run
from mpicellpose.runner.phases import flows as flow_phase
from mpicellpose.synthetic.nuclei import make_nuclei
from mpicellpose.volumes import storage
from mpicellpose.volumes.storage import numpy_array_to_zarr


def _most_entries(path) -> int:
    return max(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def test_work_directory_and_output_nested_at_1728_blocks(tmp_path):
    img = np.zeros((48, 48, 48), np.uint16)
    img[1::4, 1::4, 1::4] = 500  # one object per block: every block writes a chunk and a record
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (24, 24, 24))
    run(RunConfig(input=str(tmp_path / "in.zarr"), output=str(tmp_path / "out.zarr"), blocksize=4,
                  backend="threshold", backend_kwargs={"threshold": 100}, keep_work=True))
    out = zarr.open(str(tmp_path / "out.zarr"), mode="r")
    assert int(out[...].max()) == 12 ** 3  # 12 x 12 x 12 blocks, all of them written (the '.' layout: 1728 files)
    work = tmp_path / "out.mpicellpose-work"
    for path in (work, tmp_path / "out.zarr"):
        assert _most_entries(path) <= max(12, 1000), path
    # the chunk files themselves: at most one grid axis's worth (12) plus metadata per directory
    assert _most_entries(tmp_path / "out.zarr") <= 12 + 3
    assert _most_entries(work / "scratch.zarr") <= 12 + 3
    assert storage.read_json(tmp_path / "out.zarr" / ".zarray")["dimension_separator"] == "/"


@pytest.mark.slow
def test_flow_field_nested_and_its_chunks_made_durable(tmp_path, monkeypatch):
    pytest.importorskip("cellpose")
    img, _ = make_nuclei((32, 32, 32), seed=1, mean_diameter=6.0, touching_fraction=0.0, min_gap=2.0,
                         intensity_jitter=0.0)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (32, 32, 32))
    synced = []
    real = flow_phase._fsync_chunk
    monkeypatch.setattr(flow_phase, "_fsync_chunk", lambda store, idx: synced.append(
        (store / flow_phase._separator(str(store)).join(map(str, idx))).is_file()) or real(store, idx))
    run(RunConfig(input=str(tmp_path / "in.zarr"), output=str(tmp_path / "out.zarr"), blocksize=8, overlap=4,
                  pipeline="flows", model_kwargs={"pretrained_model": "standin-flows"}, threads=1, device="cpu",
                  keep_work=True))
    store = tmp_path / "out.mpicellpose-work" / "flows.zarr"
    assert storage.read_json(store / ".zarray")["dimension_separator"] == "/"
    assert _most_entries(store) <= 4 + 3  # 3 orientations at the top, 4 chunks per grid axis below
    assert len(synced) >= 3 * 4 ** 3 and all(synced)  # every chunk found where it was written


def test_fsync_finds_chunks_of_an_earlier_dotted_flow_field(tmp_path):
    for sep in (".", "/"):
        store = tmp_path / f"f{sep == '/'}.zarr"
        storage.create_array(store, (3, 4, 4), (3, 2, 2), np.float16, dimension_separator=sep)[...] = 1
        assert flow_phase._separator(str(store)) == sep
        flow_phase._fsync_chunk(store, (0, 1, 1))  # found and synced, no error
        assert (store / sep.join("011")).is_file()
