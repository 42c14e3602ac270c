"""Rank 0's progress display (issue 17, point 3): it moves during a block, its ETA falls, one
redrawn line on a terminal and plain lines in a log; Cellpose's chatter is kept out."""
import io
import logging
import time
import types
import warnings

import pytest

from mpicellpose.grid import geometry as geo
from mpicellpose.runner import progress
from mpicellpose.runner.runlog import quiet_libraries


class FakeBox:
    rank, size = 0, 2

    def __init__(self):
        self.progress = {}

    def poll(self):
        return False


def plan(assignment=((0, 1), (2, 3))):
    grid = geo.BlockGrid((16, 16, 64), (16, 16, 16), (0, 0, 0))
    return types.SimpleNamespace(grid=grid, segment_assignment=assignment)


def test_estimate_moves_during_a_block_and_the_eta_falls():
    box = FakeBox()
    p = progress.Progress.of_plan(box, plan(), stream=io.StringIO())
    t0 = p.t0
    first = p.estimate(t0 + 5)
    assert first["eta"] is None and first["fraction"] == 0 and first["running"] == 2
    # rank 0 finishes its first block after 10 s; rank 1 is still in its first one
    box.progress[0] = (1, 2)
    p._record()
    p.since[0] = t0 + 10
    etas, fractions = [], []
    for dt in (11, 13, 15, 17, 19):
        e = p.estimate(t0 + dt)
        etas.append(e["eta"])
        fractions.append(e["fraction"])
    assert all(a > b for a, b in zip(etas, etas[1:])), etas            # falls while nothing is reported
    assert all(a < b for a, b in zip(fractions, fractions[1:])), fractions  # moves during the blocks
    assert 0.25 < fractions[0] < 1.0
    # a block that takes longer than the rate says never counts as done
    late = p.estimate(t0 + 1000)
    assert late["fraction"] < 1.0 and late["eta"] >= 0
    box.progress[0], box.progress[1] = (2, 2), (2, 2)
    p._record()
    done = p.estimate(t0 + 40)
    assert done["fraction"] == 1.0 and done["eta"] == 0 and done["blocks"] == 4


def test_text_of_the_line():
    box = FakeBox()
    p = progress.Progress.of_plan(box, plan(), stream=io.StringIO())
    assert "ETA after the first block" in p.text(p.t0 + 3)
    box.progress[0] = (1, 2)
    p._record()
    p.since[0] = p.t0 + 10
    line = p.text(p.t0 + 12, bar=True)
    assert line.startswith("segment [#") and "1/4 blocks done, 2 in progress" in line and "ETA 0m" in line


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_one_redrawn_line_and_logs_get_plain_lines(monkeypatch, caplog):
    monkeypatch.setattr(progress, "REDRAW_EVERY", 0.02)
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.05)
    stream = Tty()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.INFO)
    lg = logging.getLogger("mpicellpose.run")
    lg.addHandler(handler)
    try:
        p = progress.Progress.of_plan(FakeBox(), plan(), stream=stream)
        assert p.tty
        p.start()
        time.sleep(0.3)
        p.close(finished=False)
    finally:
        lg.removeHandler(handler)
    text = stream.getvalue()
    assert text.count("\r") >= 3 and text.endswith("\n")
    assert "segment [" in text
    # in a log (no terminal): plain lines
    with caplog.at_level(logging.INFO, logger="mpicellpose.run"):
        p = progress.Progress.of_plan(FakeBox(), plan(), stream=io.StringIO())
        assert not p.tty
        p.start()
        time.sleep(0.3)
        p.close(finished=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("segment: ")]
    assert len(lines) >= 3 and "\r" not in "".join(lines)


def test_quiet_restores_the_hosts_filters_and_logger_levels():
    cp = logging.getLogger("cellpose")
    cp.setLevel(logging.DEBUG)
    before = list(warnings.filters)
    try:
        with quiet_libraries():
            assert cp.level == logging.WARNING  # Cellpose's stage messages and tqdm bars (INFO) are hidden
            with pytest.warns(UserWarning, match="our own"):
                warnings.warn("our own warning", UserWarning)
        assert cp.level == logging.DEBUG and warnings.filters == before
    finally:
        cp.setLevel(logging.NOTSET)


def test_quiet_hides_the_sparse_warning_without_help():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        with quiet_libraries():
            warnings.warn("Sparse invariant checks are implicitly disabled. Memory errors ...", UserWarning)
            warnings.warn("`torch.jit.script_method` is deprecated. Please switch to `torch.compile`.",
                          DeprecationWarning)
            warnings.warn("something a user should see", UserWarning)
    assert [str(w.message) for w in seen] == ["something a user should see"]


def test_a_share_of_a_block_reported_gives_an_estimate_before_any_block_ends():
    """A long unit (a flow box) reports the share of it done (``tick``): the display moves and the
    ETA comes within the first unit, not after it (issue 27, point 2)."""
    box = FakeBox()
    p = progress.Progress.of_plan(box, plan(((0,), (1,))), stream=io.StringIO())
    t0 = p.t0
    assert p.estimate(t0 + 5)["eta"] is None
    box.progress[0], box.progress[1] = (0.3, 1), (0.3, 1)  # both ranks 30% into their only block
    p._record()
    p.since[0] = p.since[1] = t0 + 30
    e = p.estimate(t0 + 30)
    assert e["blocks"] == 0 and e["fraction"] == pytest.approx(0.3) and e["eta"] == pytest.approx(70, rel=0.01)
    assert "0/2 blocks done, 2 in progress" in p.text(t0 + 30) and "ETA 1m10s" in p.text(t0 + 30)
