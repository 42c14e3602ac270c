"""The API shows rank 0's lines (what it reads, progress, the summary) on stderr like the command
line, unless the program set up logging itself or passes progress=False; the command line's last
lines say how to open the labels as labels in napari."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import mpi_env, run_mpi
from mpicellpose.volumes.ngff_io import label_image_of, napari_hint

SCRIPT = """
import logging, sys, numpy as np
from mpicellpose import distributed_eval
if sys.argv[3] == "host-logging":
    logging.basicConfig(level=logging.WARNING)
progress = {"default": None, "off": False, "on": True, "host-logging": None}[sys.argv[2]]
img = np.zeros((24, 24, 24), np.uint8); img[3:9, 3:9, 3:20] = 200; img[14:20, 12:22, 2:6] = 200
lab, _ = distributed_eval(img, 12, sys.argv[1], backend="threshold", backend_kwargs={"threshold": 100},
                          progress=progress)
print("labels", int(lab[...].max()))
"""


def _run(tmp_path, name, progress, host="none"):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / name), progress, host], capture_output=True,
                          text=True, timeout=120, env=mpi_env())
    assert proc.returncode == 0, proc.stderr
    assert "labels 2" in proc.stdout
    return proc.stderr


def test_api_shows_rank0_lines_by_default(tmp_path):
    err = _run(tmp_path, "a.zarr", "default")
    assert "[rank 0] INFO mpicellpose.run: reading" in err
    assert "INFO mpicellpose.run: done: 2 objects" in err
    assert "INFO mpicellpose.run" not in _run(tmp_path, "b.zarr", "off")


def test_host_logging_is_respected(tmp_path):
    assert "INFO" not in _run(tmp_path, "c.zarr", "default", "host-logging")   # the host chose WARNING
    assert err_has_done(_run(tmp_path, "d.zarr", "on", "host-logging"))


def err_has_done(err: str) -> bool:
    return "mpicellpose.run: done: 2 objects" in err and err.count("done: 2 objects") == 1   # not twice


def test_api_progress_two_ranks_rank0_only(tmp_path):
    proc = run_mpi(2, ["-c", SCRIPT, tmp_path / "e.zarr", "default", "none"], timeout=180)
    assert proc.stderr.count("mpicellpose.run: done: 2 objects") == 1, proc.stderr
    assert "[rank 1] INFO" not in proc.stderr


def test_napari_hint_plain_and_ngff(tmp_path):
    zarr = pytest.importorskip("zarr")
    from mpicellpose.volumes.ngff_io import write_labels_metadata

    plain = tmp_path / "l.zarr"
    zarr.create_array(str(plain), shape=(4, 4), dtype=np.uint32, chunks=(4, 4))
    assert label_image_of(plain) is None
    assert napari_hint(plain).startswith(f"view in napari as labels: napari --layer-type labels {plain}")
    group = tmp_path / "seg.ome.zarr"
    group.mkdir()
    zarr.create_array(str(group / "0"), shape=(4, 4), dtype=np.uint32, chunks=(4, 4), zarr_format=2)
    write_labels_metadata(str(group), ("y", "x"), None, zarr_format=2)
    assert label_image_of(group / "0") == str(group)
    assert napari_hint(group / "0").startswith(f"view in napari: napari {group} ")


def test_segment_says_how_to_open_as_labels(tmp_path):
    zarr = pytest.importorskip("zarr")
    img = np.zeros((16, 16, 16), np.uint16)
    img[2:6, 2:6, 2:6] = 900
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=img.shape, dtype=img.dtype, chunks=(16, 16, 16))
    z[...] = img
    proc = subprocess.run([sys.executable, "-m", "mpicellpose", "segment", str(tmp_path / "in.zarr"),
                           str(tmp_path / "out.zarr"), "--backend", "threshold", "--threshold", "100"],
                          capture_output=True, text=True, timeout=120, env=mpi_env())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("1 objects written to")
    assert lines[1] == (f"view in napari as labels: napari --layer-type labels {tmp_path / 'out.zarr'} "
                        f"(Python: viewer.add_labels(zarr.open('{tmp_path / 'out.zarr'}')))")
