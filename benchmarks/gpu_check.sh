#!/usr/bin/env bash
# GPU check for a lent device machine (one call): install the carried wheels, print the
# binding (mpicellpose info), run the demo on the GPU with 1 and 2 ranks, record GPU
# utilisation.  Prepare on the CPU machine first (wheels for Python 3.12 in .whl/, see
# docs/gpu.md), then run it in the repository root with $OUT set:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
if ! python3 -c "import cellpose.models" >/dev/null 2>&1; then
  echo "cellpose 3.1.1.3 does not import with this numpy; using numpy 2.0.2"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/np/*.whl
  export PYTHONPATH=/tmp/site2:$PYTHONPATH
fi
python3 -c "import numpy, torch, cellpose; print('numpy', numpy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m mpicellpose info 2>&1 | tee "$OUT/info.txt"
nvidia-smi dmon -s um -d 1 > "$OUT/dmon.txt" 2>&1 &
DMON=$!
date +%T
for size in 160 256; do
  bs=$((size / 2))
  python3 -m mpicellpose demo --dir /tmp/demo$size --size $size --blocksize $bs,$size,$size \
      --device cuda --json "$OUT/demo_gpu_${size}_n1.json" > "$OUT/demo_gpu_${size}_n1.txt" 2>&1
  tail -7 "$OUT/demo_gpu_${size}_n1.txt"; date +%T
done
if python3 -c "from mpi4py import MPI" >/dev/null 2>&1 && command -v mpiexec >/dev/null; then
  mpiexec -n 2 python3 -m mpicellpose demo --dir /tmp/demo2r --size 256 --blocksize 128,256,256 --device cuda \
      --json "$OUT/demo_gpu_256_n2.json" > "$OUT/demo_gpu_256_n2.txt" 2>&1
  tail -8 "$OUT/demo_gpu_256_n2.txt"
  mpiexec -n 2 python3 -m mpicellpose info 2>&1 | tail -12
else
  echo "mpi4py/mpiexec not usable here: multi-rank GPU run skipped"
fi
kill $DMON 2>/dev/null
awk 'NR>2 && $2+0>0 {s+=$2; n++} END {if (n) printf "GPU utilisation while busy: mean %.0f%% over %d samples\n", s/n, n}' "$OUT/dmon.txt"
