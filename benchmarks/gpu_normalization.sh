#!/usr/bin/env bash
# Global vs per-block normalisation on a volume with a 1:4 brightness gradient across the block
# faces (z), 4 blocks along z, on a lent GPU (see docs/gpu.md for the carried wheels).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import cellpose.models" >/dev/null 2>&1 || { python3 -m pip install -q --no-index --no-deps \
    --no-compile --target /tmp/site2 .whl/np/*.whl; export PYTHONPATH=/tmp/site2:$PYTHONPATH; }
for seed in 1 2; do
  for norm in global block; do
    python3 -m mpicellpose demo --dir /tmp/g$norm$seed --size 160 --blocksize 40,160,160 --gradient --seed $seed \
        --normalize $norm --device cuda --json "$OUT/gradient_${norm}_s$seed.json" > "$OUT/gradient_${norm}_s$seed.txt" 2>&1
    echo "seed $seed normalize $norm:"; grep -a "objects:\|cut by" "$OUT/gradient_${norm}_s$seed.txt"
  done
done
