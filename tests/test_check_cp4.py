"""``mpicellpose check --both-pipelines`` under Cellpose 4 with the shipped stand-in model: the
report puts ``--pipeline flows`` and ``--pipeline blocks`` side by side on the user's region (how a
``cpsam`` user decides between them on their own data).  Skipped under Cellpose 3; CI runs it in
``.venv-cp4`` (.ci/cellpose4-venv.sh).  Measured on this image (2026-12, CPU): F1 1.0 under both,
mean IoU 0.998 (flows) and 0.951 (blocks), 8 objects cut by faces, no seam error."""
import json

import pytest

from mpicellpose.cellpose import models as md

MAJOR, FULL = md.cellpose_version()
if MAJOR is None or MAJOR < 4:
    pytest.skip(f"needs Cellpose 4 (installed: {FULL or 'none'}); CI runs this file in .venv-cp4",
                allow_module_level=True)

from conftest import run_mpi  # noqa: E402

pytestmark = [pytest.mark.cellpose, pytest.mark.timeout(600)]


def test_flows_and_blocks_side_by_side_with_the_standin(tmp_path):
    from mpicellpose.synthetic.nuclei import make_nuclei
    from mpicellpose.volumes.storage import numpy_array_to_zarr

    img, _ = make_nuclei((128, 128), seed=5, density=0.35)
    numpy_array_to_zarr(str(tmp_path / "image.zarr"), img, (64, 64))
    proc = run_mpi(1, ["-m", "mpicellpose", "check", tmp_path / "image.zarr", "--model", "demo", "--blocksize", "64",
                       "--both-pipelines", "--no-png", "--report", tmp_path / "r.json", "--threads", "2",
                       "--log-level", "WARNING"], timeout=500, check=False)
    assert proc.returncode in (0, 4), proc.stderr[-3000:]
    assert "--pipeline flows" in proc.stdout and "--pipeline blocks" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    runs = {r["label"]: r for r in report["runs"]}
    assert set(runs) == {"--pipeline flows", "--pipeline blocks"}
    assert runs["--pipeline flows"]["network_per_voxel"] < runs["--pipeline blocks"]["network_per_voxel"]
    for r in runs.values():
        assert r["f1"] >= 0.9 and r["cut"] > 0, r
