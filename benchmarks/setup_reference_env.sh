#!/usr/bin/env bash
# Create a separate virtual environment in which the *reference* implementation
# (cellpose.contrib.distributed_segmentation from the cellpose 3.1.1.3 wheel) runs.
#
# Usage:  bash benchmarks/setup_reference_env.sh [VENV_DIR]
#         (default VENV_DIR: benchmarks/.venv-reference; also $REFERENCE_VENV)
#
# Idempotent: if the venv exists and already imports the reference with the pinned
# versions, nothing is installed.  Re-create from scratch with FORCE=1.
#
# Pins (measured working together on Python 3.11, CPU only):
#   torch==2.13.0 (local CPU wheel; installed FIRST so cellpose does not pull a CUDA build)
#   cellpose==3.1.1.3
#   zarr==2.18.7  numcodecs==0.15.1   (zarr-python 3 breaks the reference: TypeError at open)
#   dask==2026.8.0 distributed==2026.8.0 dask-image==2026.5.0 dask-jobqueue==0.9.0
#   tifffile, psutil (any)
# resolved alongside (2026-11): numpy 2.0.2, scipy 1.17.1, fastremap 1.21.0, tifffile 2026.3.3,
# psutil 7.2.2.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-${REFERENCE_VENV:-$HERE/.venv-reference}}"
PY="${PYTHON:-python3.11}"

TORCH_PIN="torch==2.13.0"
CELLPOSE_PIN="cellpose==3.1.1.3"
ZARR_PIN="zarr==2.18.7"
NUMCODECS_PIN="numcodecs==0.15.1"
OTHER="dask==2026.8.0 distributed==2026.8.0 dask-image==2026.5.0 dask-jobqueue==0.9.0 tifffile psutil"

check() {
    "$VENV/bin/python" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.13.0", "cellpose": "3.1.1.3", "zarr": "2.18.7", "numcodecs": "0.15.1"}
for name, v in want.items():
    got = md.version(name)
    if not got.startswith(v):
        sys.exit(f"{name} {got} != {v}")
for name in ("dask", "distributed", "dask-image", "dask-jobqueue", "tifffile", "psutil"):
    md.version(name)
import cellpose.contrib.distributed_segmentation  # noqa: F401
PYEOF
}

if [[ "${FORCE:-0}" != "1" && -x "$VENV/bin/python" ]] && check; then
    echo "reference venv OK: $VENV"
    exit 0
fi

if [[ "${FORCE:-0}" == "1" ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
pipi() {  # quiet pip install; drop the noise about configured local indexes that are absent
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" \
        2> >(grep -v "neither a file nor a directory" >&2)
}
pipi --upgrade pip
pipi "$TORCH_PIN"      # first: the local CPU wheel, so nothing pulls a CUDA build
pipi "$CELLPOSE_PIN" "$ZARR_PIN" "$NUMCODECS_PIN" $OTHER

if ! check; then
    echo "reference venv at $VENV does not import the reference" >&2
    exit 1
fi
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md
for n in ("python", "torch", "cellpose", "numpy", "zarr", "numcodecs", "dask", "distributed",
          "dask-image", "dask-jobqueue", "tifffile", "psutil", "scipy", "fastremap"):
    if n == "python":
        import sys; print("python", sys.version.split()[0]); continue
    print(n, md.version(n))
PYEOF
echo "reference venv ready: $VENV"
