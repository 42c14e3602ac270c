"""Blocks handed out at run time (issue 13): the ordering policy (pure) and the MPI-3 atomic
counter under mpiexec: a rank busy in a long call (no MPI) never holds up the others' hand-outs,
more ranks than blocks, an abort stops every rank's taking."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import mpi_env, run_mpi
from mpicellpose.grid import geometry as geo
from mpicellpose.grid import schedule as sc

SCRIPT = Path(__file__).parent / "mpi_queue.py"


def test_costliest_first_ties_in_grid_order_and_round_robin_inverts():
    grid = geo.BlockGrid((40, 40), (16, 16), (2, 2))   # edge blocks have smaller read regions
    todo = list(range(len(grid)))
    order = sc.costliest_first(todo, sc.block_costs(grid, todo))
    assert order[0] == 4 and sorted(order) == todo               # the one interior block first
    costs = sc.block_costs(grid, order)
    assert np.all(np.diff(costs) <= 0)
    same = [b for b, c in zip(order, costs) if c == costs[-1]]
    assert same == sorted(same)                                   # ties keep grid order
    fr = np.zeros(len(grid))
    fr[[7, 2]] = [1.0, 0.25]
    assert sc.costliest_first(todo, sc.block_costs(grid, todo, fr))[:2] == [7, 2]
    for n in (1, 2, 3, 7, 12):
        shares = sc.round_robin_shares(order, n)
        assert len(shares) == n and sc.interleave(shares) == order
    static = sc.make_shares("static", grid, todo, 3)
    assert [b for s in static for b in s] == todo                # contiguous runs in grid order


def test_mask_fractions_give_the_kept_blocks():
    grid = geo.BlockGrid((8, 8), (4, 4), (0, 0))
    mask = np.zeros((4, 4), bool)   # half resolution
    mask[0, 0] = True
    mask[2:, 2:] = True
    fr = geo.mask_fractions(grid, mask)
    assert fr.tolist() == [0.25, 0.0, 0.0, 1.0]
    assert geo.blocks_in_mask(grid, mask).tolist() == [True, False, False, True]


def _result(proc):
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("window", ["allocate", "create"])
def test_busy_host_does_not_stall_the_others(window):
    """Rank 0 hosts the counter and sleeps 3 s in its first item; 'create' is a window over user
    memory, where MPICH needs the host to make progress (the progress thread does)."""
    env = mpi_env()
    env["MPICELLPOSE_QUEUE_WINDOW"] = window
    res = _result(run_mpi(4, [SCRIPT, "busy-host"], env=env, timeout=60))
    items = sorted(i for _, got, _ in res for i in got)
    assert items == list(range(120))                              # each exactly once
    by_rank = {r: (got, st) for r, got, st in res}
    assert by_rank[0][0] == [0]                                   # the busy rank took nothing more
    others = [t for r in (1, 2, 3) for t in by_rank[r][1]]
    assert len(others) == 119 and max(others) < 2.5, max(others)  # all handed out during its sleep


def test_more_ranks_than_items_and_abort():
    res = _result(run_mpi(5, [SCRIPT, "few"], timeout=60))
    assert sorted(i for _, got, _ in res for i in got) == [0, 1, 2]
    assert [len(got) for _, got, _ in res] == [1, 1, 1, 0, 0]
    res = _result(run_mpi(3, [SCRIPT, "abort"], timeout=60))
    taken = sum(len(got) for _, got, _ in res)
    assert taken < 30, taken                                      # nobody went on taking the 200 items


def test_progress_with_blocks_handed_out_at_run_time():
    """Rank 0's display when blocks go to whoever asks: total voxels of all blocks, what is
    left shared by the working ranks, the block in progress counted as it runs."""
    import io
    import types

    from mpicellpose.runner import progress

    class Box:
        rank, size = 0, 3

        def __init__(self):
            self.progress, self.work = {}, {}

        def poll(self):
            return False

    grid = geo.BlockGrid((16, 16, 128), (16, 16, 16), (0, 0, 0))   # 8 blocks of 4096 voxels
    plan = types.SimpleNamespace(grid=grid, handout="dynamic", segment_assignment=sc.round_robin_shares(range(8), 3))
    box = Box()
    p = progress.Progress.of_plan(box, plan, stream=io.StringIO())
    t0 = p.t0
    assert p.total == 8 and p.total_vox == 8 * 4096 and p.estimate(t0 + 1)["running"] == 3
    # rank 1 finished 2 blocks in 10 s and is on its third; nobody else reported yet
    box.progress[1], box.work[1] = (2, -1), (2 * 4096, 4096)
    p._record()
    p.since[1] = t0 + 10
    e = [p.estimate(t0 + dt) for dt in (10, 12, 14)]
    assert all(a["eta"] > b["eta"] for a, b in zip(e, e[1:]))
    assert all(a["fraction"] < b["fraction"] for a, b in zip(e, e[1:]))
    assert e[0]["rate"] == 4096 * 2 / 10 and e[0]["blocks"] == 2
    # 6 blocks not finished, two of them nearly (10 s at 819 voxels/s): about 4 blocks for 3 ranks
    assert 4096 / e[0]["rate"] < e[0]["eta"] < 2 * 4096 / e[0]["rate"]
    for r in range(3):
        box.progress[r], box.work[r] = ((3, -1), (3 * 4096, 0)) if r < 2 else ((2, -1), (2 * 4096, 0))
    p._record()
    done = p.estimate(t0 + 30)
    assert done["blocks"] == 8 and done["fraction"] == 1.0 and done["eta"] == 0 and done["running"] == 0
