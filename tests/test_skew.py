"""Blocks handed out at run time beat a static schedule when dense blocks cost 10x (issue 13),
and the labels do not depend on the schedule (benchmarks/skew.py, short)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import skew  # noqa: E402


def test_dynamic_beats_static_with_identical_labels(tmp_path):
    inp, mask = skew.make_volume(str(tmp_path))
    static = skew.launch(4, "static", False, inp, mask, str(tmp_path), unit=0.03, timeout=120)
    dynamic = skew.launch(4, "dynamic", True, inp, mask, str(tmp_path), unit=0.03, timeout=120)
    assert static["rc"] == 0, static.get("stderr")
    assert dynamic["rc"] == 0, dynamic.get("stderr")
    assert dynamic["labels_sha"] == static["labels_sha"]
    assert sum(dynamic["blocks"]) == sum(static["blocks"]) == 64
    assert static["idle_share"] > 0.25, static                 # one rank draws the dense slab
    assert dynamic["idle_share"] < 0.5 * static["idle_share"], (static, dynamic)
    assert dynamic["segment_wall_s"] < static["segment_wall_s"]
