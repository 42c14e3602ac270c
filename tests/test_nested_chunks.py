"""Chunk files nested per grid axis (issue 23): every zarr v2 array a run writes (scratch, output)
has ``dimension_separator`` "/" (the flow boxes' shells: tests/test_shells.py), so no directory of the work directory or the output
holds more than max(one grid axis's chunks, 1000 records) entries."""
from __future__ import annotations

import os

import numpy as np
import zarr

from mpicellpose.config import RunConfig
from mpicellpose.runner.driver import run
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
