#!/usr/bin/env bash
# Issue 12's GPU rows in one short call on a lent device machine: Mvox/s per GPU for the whole run
# and GPU busy share, --pipeline flows (with and without --masks-during-flows) against --pipeline
# blocks, float16 against float32 (--precision), the shipped model, a 512^3 synthetic volume, 256^3 blocks, 1 rank.  Prepare the carried
# wheels as for gpu_check.sh (docs/gpu.md), then in the repository root:  bash benchmarks/gpu_pipeline.sh
# Prints one line per run: pipeline, wall of the run, Mvox/s, phase timings, mean GPU utilisation.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
SIZE=${SIZE:-512}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
python3 - "$SIZE" <<'EOF'
import sys, time
from mpicellpose.synthetic import make_nuclei
from mpicellpose.volumes.storage import numpy_array_to_zarr
n = int(sys.argv[1]); t = time.time()
img, gt = make_nuclei((n, n, n), seed=1)
numpy_array_to_zarr("/tmp/gpu_in.zarr", img, (256, 256, 256))
print(f"volume {img.shape} with {int(gt.max())} objects in {time.time() - t:.0f} s")
EOF
for run in "flows on float32" "flows on float16" "flows off float32" "blocks off float32"; do
  set -- $run
  tag="$1_$2_$3"
  nvidia-smi dmon -s u -d 1 > "$OUT/dmon_$tag.txt" 2>&1 &
  DMON=$!
  t0=$(date +%s.%N)
  python3 -m mpicellpose segment /tmp/gpu_in.zarr "/tmp/gpu_$tag.zarr" --model demo --blocksize 256 --device cuda \
      --pipeline "$1" --masks-during-flows "$2" --precision "$3" > "$OUT/run_$tag.txt" 2>&1
  t1=$(date +%s.%N)
  kill $DMON 2>/dev/null
  python3 - "$1" "$2" "$t0" "$t1" "$SIZE" "$OUT/dmon_$tag.txt" "$3" <<'EOF'
import sys, zarr
pipe, ahead, t0, t1, n, dmon = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
prec = sys.argv[7]
meta = zarr.open(f"/tmp/gpu_{pipe}_{ahead}_{prec}.zarr", mode="r").attrs["mpicellpose"]
util = [float(l.split()[1]) for l in open(dmon) if l.strip() and not l.startswith("#") and l.split()[1].replace(".", "").isdigit()]
wall = t1 - t0
print(f"{pipe} (masks during flows {ahead}, {prec}): wall {wall:.1f} s, {n ** 3 / wall / 1e6:.2f} Mvox/s, "
      f"{n ** 3 / meta['timings']['total'] / 1e6:.2f} Mvox/s in the call; timings {meta['timings']}; "
      f"network/voxel {meta.get('cost', {}).get('network_per_voxel')}; GPU utilisation mean "
      f"{sum(util) / max(len(util), 1):.0f}% over {len(util)} s, busy (>0) {sum(u > 0 for u in util)} s")
EOF
done
# network throughput per batch size and precision, and labels against float32 (benchmarks/precision.py)
python3 benchmarks/precision.py --device cuda --plane 224 --batches 8,16,32,64 --shape 128,128,128 \
    --json "$OUT/precision.json" | tail -1
