"""bfloat16 vs float32 on CPUs with and without native bfloat16 (AVX-512 BF16 / AMX).

Times the shipped Cellpose 4 stand-in (``--model demo`` under Cellpose 4) in both precisions, whole
``eval`` of a 2D image and a 3D volume, plus one 3x3 convolution, each in a child process:

* ``native``: the machine as it is;
* ``emulated``: the same machine with oneDNN and ATen limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
  ``ATEN_CPU_CAPABILITY=avx2``), which is what a CPU without AVX-512 BF16 or AMX (most AMD EPYC
  generations, older Intel Xeons) runs: torch emulates bfloat16 there.

    .venv-cp4/bin/python benchmarks/precision_cpu.py [--threads 1] [--repeats 2] [--json OUT]

Needs Cellpose 4 (``.ci/cellpose4-venv.sh``).  Each time is the fastest of ``--repeats`` calls after a
warm-up (other processes only add time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EMULATE = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def child(threads: int, repeats: int) -> dict:
    """Runs in the child process: every timing under this process's environment."""
    import numpy as np
    import torch

    from mpicellpose.cellpose.precision import cpu_bf16_support, measured_bf16_slowdown
    from mpicellpose.cellpose.shipped import demo_cp4_model_path, load_standin
    from mpicellpose.synthetic.nuclei import make_nuclei
    from mpicellpose.training.cp4 import segment

    torch.set_num_threads(threads)
    native, why = cpu_bf16_support()
    out = {"bf16_native": native, "why": why, "aten": torch.backends.cpu.get_cpu_capability(),
           "conv_bf16_over_fp32": round(measured_bf16_slowdown(threads), 1)}
    images = {"2d_256x256": make_nuclei((256, 256), seed=21)[0], "3d_32x64x64": make_nuclei((32, 64, 64), seed=7)[0]}
    for bf16 in (False, True):
        model = load_standin(demo_cp4_model_path(), use_bfloat16=bf16)
        for name, img in images.items():
            segment(model, img)  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                labels = segment(model, img)
                times.append(time.perf_counter() - t)
            out[f"{name}_{'bf16' if bf16 else 'fp32'}_s"] = round(min(times), 2)
            out[f"{name}_{'bf16' if bf16 else 'fp32'}_objects"] = int(np.max(labels))
    for name in images:
        out[f"{name}_bf16_over_fp32"] = round(out[f"{name}_bf16_s"] / out[f"{name}_fp32_s"], 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.threads, a.repeats)))
        return 0
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "threads": a.threads, "runs": {}}
    try:
        result["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True).stdout.strip()
        with open("/proc/cpuinfo") as f:
            result["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for label, extra in (("native", {}), ("emulated", EMULATE)):
        env = dict(os.environ, **extra, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for k in EMULATE:
            if k not in extra:
                env.pop(k, None)
        proc = subprocess.run([sys.executable, __file__, "--child", "--threads", str(a.threads), "--repeats",
                               str(a.repeats)], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        result["runs"][label] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    rows = ["| CPU | bfloat16 | conv bf16/fp32 | 2D 256² fp32 | 2D bf16 | 3D 32x64x64 fp32 | 3D bf16 |",
            "|---|---|---|---|---|---|---|"]
    for label, r in result["runs"].items():
        rows.append(f"| {label} ({r['aten']}) | {'native' if r['bf16_native'] else 'emulated'} | "
                    f"{r['conv_bf16_over_fp32']}x | {r['2d_256x256_fp32_s']} s | {r['2d_256x256_bf16_s']} s "
                    f"({r['2d_256x256_bf16_over_fp32']}x) | {r['3d_32x64x64_fp32_s']} s | {r['3d_32x64x64_bf16_s']} s "
                    f"({r['3d_32x64x64_bf16_over_fp32']}x) |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
