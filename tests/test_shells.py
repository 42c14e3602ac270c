"""The flow boxes' shells (issue 23): the flow field's only trip through the file system under
``--pipeline flows`` is a window that moves with the sweep, not the volume.

* a volume of 16 layers of blocks, one box per block: the shells on disk never exceed a few
  layers' worth (measured after every write: at most 4.5 bytes per voxel of the volume, a quarter
  of the 18 that the earlier whole flow field took), every shell is gone at the end, each piece is
  on disk before its box's marker, and no directory holds more than 1000 entries;
* a shell's pieces hold exactly the box's field over them, and a neighbour reads back what it needs.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from mpicellpose.config import RunConfig
from mpicellpose.grid import geometry as geo
from mpicellpose.grid.boxes import BoxGrid
from mpicellpose.runner.driver import run
from mpicellpose.runner.phases import boxmasks as shells
from mpicellpose.synthetic.metrics import match_objects
from mpicellpose.synthetic.nuclei import make_nuclei
from mpicellpose.volumes.storage import numpy_array_to_zarr


def test_pieces_written_and_read_back(tmp_path):
    grid = geo.BlockGrid((20, 30), (10, 10), (3, 3))
    boxes = BoxGrid(grid, range(len(grid)), 1, 2)
    store = shells.ShellStore(tmp_path / "shells")
    field = np.arange(3 * 10 * 10, dtype=np.float16).reshape(3, 10, 10)
    centre = grid.linear_of((0, 1))
    store.write(centre, field, boxes.core(centre), boxes.needed_pieces(centre))
    # all but the 4x4 centre and the low band's middle (no box above reads it)
    assert store.done(centre) and store.bytes_written == 3 * (100 - 4 * 4 - 3 * 4) * 2
    region = boxes.mask_region(grid.linear_of((1, 1)))  # the box below reads the low rows of its core
    out = np.full((3, *geo.box_shape(region)), -1, np.float16)
    store.read_into(out, region, centre, boxes.needed_pieces(centre))
    assert np.array_equal(out[:, :3, 3:13], field[:, 7:10, :]) and (out[:, 3:] == -1).all()
    assert store.remove(centre) and not store.dir(centre).exists() and not store.done(centre)


@pytest.mark.slow
def test_shells_stay_a_window_and_are_removed(tmp_path, monkeypatch):
    pytest.importorskip("cellpose")
    shape = (128, 16, 8)  # 16 layers of 2 x 1 blocks of 8^3, one box each
    img, gt = make_nuclei(shape, seed=2, mean_diameter=6.0, touching_fraction=0.0, min_gap=2.0, intensity_jitter=0.0)
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (32, 32, 32))
    peak, order = [0], []
    real_write = shells.ShellStore.write

    def write(self, box, field, core, pieces):
        real_write(self, box, field, core, pieces)
        peak[0] = max(peak[0], self.disk_bytes())
        order.append(all((self.dir(box) / shells._name(d)).is_file() for d in pieces))

    monkeypatch.setattr(shells.ShellStore, "write", write)
    run(RunConfig(input=str(tmp_path / "in.zarr"), output=str(tmp_path / "out.zarr"), blocksize=8, overlap=4,
                  flow_box=1, pipeline="flows", model_kwargs={"pretrained_model": "standin-flows"}, threads=1,
                  device="cpu", keep_work=True))
    work = tmp_path / "out.mpicellpose-work"
    voxels = int(np.prod(shape))
    assert len(order) == 32 and all(order)
    # one box per block of 8^3 with a 4-voxel overlap: every voxel of a box is shell (8 bytes); a
    # sweep keeps about two layers of 2 boxes, of 16 layers
    assert peak[0] <= 4.5 * voxels, peak[0] / voxels
    assert peak[0] >= 8 * 8 ** 3 * 2  # at least a layer was on disk at once: the test measures something
    left = [p for p in (work / "shells").rglob("*.npy")]
    assert not left  # every shell deleted once its readers recorded their blocks
    assert max(len(d) + len(f) for _, d, f in os.walk(work)) <= 1000
    labels = zarr.open(str(tmp_path / "out.zarr"), mode="r")[...]
    assert match_objects(labels, gt)["f1"] >= 0.7  # objects of 4-8 voxels in a thin volume
