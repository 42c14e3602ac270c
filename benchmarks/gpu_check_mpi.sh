#!/usr/bin/env bash
# Second GPU check: two MPI ranks sharing one GPU, with mpi4py + the mpich wheel carried in .whl
# (the image's own mpi4py does not match its mpiexec).  The benchmark's end-to-end case
# (160^3, 80^3 blocks, overlap 32) on 1 and 2 ranks, and the 256^3 demo on 2 ranks.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
# the image has Debian's Open MPI too: make mpi4py use the carried MPICH (the wheel's mpiexec)
export MPI4PY_MPIABI=mpich LD_LIBRARY_PATH=/tmp/site/lib:${LD_LIBRARY_PATH:-}
python3 -c "import cellpose.models" >/dev/null 2>&1 || { python3 -m pip install -q --no-index --no-deps \
    --no-compile --target /tmp/site2 .whl/np/*.whl; export PYTHONPATH=/tmp/site2:$PYTHONPATH; }
mpiexec -n 2 python3 -m mpicellpose info 2>&1 | tail -4
nvidia-smi dmon -s u -d 1 > "$OUT/dmon2.txt" 2>&1 &
DMON=$!
for n in ${E2E_RANKS:-1 2}; do
  date +%T
  mpiexec -n $n python3 -m mpicellpose demo --dir /tmp/e2e$n --size 160 --blocksize 80 --overlap 32 --device cuda \
      --json "$OUT/e2e160_n$n.json" > "$OUT/e2e160_n$n.txt" 2>&1
  grep -a "objects:\|cut by\|time per\|per megavoxel" "$OUT/e2e160_n$n.txt"
done
date +%T
mpiexec -n 2 python3 -m mpicellpose demo --dir /tmp/d256 --size 256 --device cuda --json "$OUT/demo256_n2.json" \
    > "$OUT/demo256_n2.txt" 2>&1
grep -a "demo:\|objects:\|cut by\|time per\|per megavoxel" "$OUT/demo256_n2.txt"
kill $DMON 2>/dev/null
awk 'NR>2 && $2+0>0 {s+=$2; n++} END {if (n) printf "GPU utilisation while busy: mean %.0f%% over %d samples\n", s/n, n}' "$OUT/dmon2.txt"
