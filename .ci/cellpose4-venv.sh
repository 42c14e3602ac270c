#!/usr/bin/env bash
# CI: a second venv with Cellpose 4 (Cellpose-SAM) on the CPU torch wheel, for tests/test_cellpose4.py.
#
#   .ci/cellpose4-venv.sh            # creates/updates $VENV_CP4 (default .venv-cp4) in the repo root
#
# Order matters: torch first (the local CPU wheel), then torchvision 0.28.0 (the release built for
# torch 2.13, whose 'torch==2.13.0' requirement the CPU wheel satisfies, so torch is left alone),
# then cellpose. Installing cellpose or torchvision into a venv without torch pulls the newest
# allowed torch, a multi-GB CUDA build. See docs/cellpose4.md.
#
# PyPI's torchvision is a CUDA build whose compiled ops do not load beside the CPU torch, and then
# 'import torchvision' (which 'import cellpose' does) fails. .ci/cp4_tvshim.py works around that
# by defining the two op schemas torchvision needs before it is imported; Cellpose uses none of
# torchvision's compiled ops. The shim is installed into this venv only (a .pth hook); it is test
# infrastructure for this machine, not part of mpicellpose.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_CP4=${VENV_CP4:-.venv-cp4}
[ -x "$VENV_CP4/bin/python" ] || python3 -m venv "$VENV_CP4"
# keep the 1.4 GB venv out of 'git status' (Python >= 3.13's venv writes this file itself)
[ -e "$VENV_CP4/.gitignore" ] || echo '*' > "$VENV_CP4/.gitignore"
PY="$VENV_CP4/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q "torchvision==0.28.0"
"$PY" -m pip install -q "cellpose==4.2.1.1"
"$PY" -m pip install -q mpi4py mpich pytest pytest-timeout zarr tifffile scipy
"$PY" -m pip install -q --no-deps -e .
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp .ci/cp4_tvshim.py "$SITE/_cp4_tvshim.py"
echo "import _cp4_tvshim" > "$SITE/_cp4_tvshim.pth"
# fail here, not in the tests, if the stack does not import
"$PY" -c 'import cellpose, cellpose.models, torch, torchvision; from importlib.metadata import version as v; print("cellpose", v("cellpose"), "torch", torch.__version__, "torchvision", torchvision.__version__)'
