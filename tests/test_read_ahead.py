"""--read-ahead: the next block's image is read in a thread while the current block is worked on.

The generator behind it (``runner.phases.blockloop.read_ahead``) pairs every block with its own input,
reads in another thread, reports a read's error with the block it belongs to and stops reading
when the loop ends early; end to end the labels do not change.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from mpicellpose.grid import geometry as geo
from mpicellpose.runner.phases.blockloop import read_ahead
from mpicellpose.volumes.storage import numpy_array_to_zarr

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_each_block_gets_its_own_input_read_in_another_thread():
    grid = geo.BlockGrid((40, 40), (10, 10), (2, 2))
    order = [5, 0, 9, 3]
    threads, started = set(), []

    def load(blk):
        threads.add(threading.get_ident())
        started.append(blk.linear)
        return blk.linear * 10

    got = [(blk.linear, get()) for blk, get in read_ahead(iter(order), grid, load)]
    assert got == [(b, b * 10) for b in order]
    assert started == order and threading.get_ident() not in threads
    # without load: the blocks, nothing read
    assert [(b.linear, g) for b, g in read_ahead(iter(order), grid, None)] == [(b, None) for b in order]


def test_a_read_error_belongs_to_its_block_and_an_early_stop_reads_no_further():
    grid = geo.BlockGrid((40,), (10,), (0,))
    taken = []

    def blocks():
        for b in range(4):
            taken.append(b)
            yield b

    def load(blk):
        if blk.linear == 1:
            raise OSError("disk gone")
        return blk.linear

    gen = read_ahead(blocks(), grid, load)
    blk, get = next(gen)
    assert blk.linear == 0 and get() == 0
    blk, get = next(gen)
    with pytest.raises(OSError, match="disk gone"):
        get()
    gen.close()
    assert taken == [0, 1, 2]  # one block ahead at most


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["dynamic", "static"])
def test_labels_do_not_change_with_read_ahead(tmp_path, schedule):
    rng = np.random.default_rng(3)
    img = (rng.random((40, 48, 48)) > 0.7).astype(np.uint8) * 200
    numpy_array_to_zarr(tmp_path / "in.zarr", img, (16, 16, 16))
    outs = []
    for mode in ("off", "on"):
        out = tmp_path / f"{mode}.zarr"
        cmd = [str(BIN / "mpiexec"), "-n", "3", str(BIN / "mpicellpose"), "segment", str(tmp_path / "in.zarr"),
               str(out), "--backend", "threshold", "--threshold", "100", "--blocksize", "16",
               "--schedule", schedule, "--read-ahead", mode]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(zarr.open(str(out), mode="r")[...])
    assert outs[0].max() > 50 and np.array_equal(outs[0], outs[1])
