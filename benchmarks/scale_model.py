"""Fit a per-rank model of memory, bytes and serial time to benchmarks/scale.py results, and
evaluate it at the issue's two target jobs (issue 13).

    .venv/bin/python benchmarks/scale_model.py RESULT.json [RESULT.json ...] [--markdown]

Each point is one run (P ranks, N objects, B blocks, L ranks on one node: L = P here).
Non-negative least squares, per rank (median rank):

* peak RSS (MiB)                 = m0 + m_obj * N/P + m_blk * B
* rank 0's peak RSS - median     = r0 + r_blk * B + r_local * L
* bytes sent in collectives      <= s_obj * N/P, s_obj the largest bytes per own object measured
  (an envelope, not a fit: how many of a rank's table rows go to another rank depends on how the
  ID ranges fall; gateway collectives only; the face views go point to point, in messages of at
  most MPICELLPOSE_EXCHANGE_BYTES)
* CPU s of merge+relabel+table   = t0 + t_obj * N/P + t_own * B/P + t_blk * B   (what one rank computes;
  oversubscribed on 2 cores the wall is their sum, on a cluster about the slowest rank's)

The predictions take L = 8 (8 GPUs per node) and, in brackets, L = P (every rank on one node,
the measured setting extrapolated).

The largest single message is bounded by construction (``MPICELLPOSE_MESSAGE_BYTES`` = 64 MiB per
rank and round of ``alltoall_arrays``, ``MPICELLPOSE_EXCHANGE_BYTES`` = 64 MiB per face-view
message); the largest unbounded ones grow with the blocks: the plan (broadcast, ~B x 40 bytes)
and the per-block allgathers (one rank's part: ~B/P x 16 bytes).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from scipy.optimize import nnls

TARGETS = {"(a) 128 ranks, 1e8 objects": (128, 1e8, 16 * 40 * 40),
           "(b) 1024 ranks, 1e9 objects": (1024, 1e9, 16 * 40 * 40)}   # 4000 x 10000 x 10000, 256^3 blocks
MESSAGE_BYTES = EXCHANGE_BYTES = 64 << 20


def points(paths):
    out = []
    for path in paths:
        d = json.load(open(path))
        for r in d["results"]:
            if r.get("rc"):
                continue
            P, N, B = r["ranks"], r["objects"], d.get("blocks")
            cpu = r.get("step_cpu_s", {})
            out.append({"P": P, "N": N, "B": B, "rss": r["peak_rss_mib"]["median"],
                        "rank0_extra": r["peak_rss_mib"]["rank0"] - r["peak_rss_mib"]["median"],
                        "bytes": r["bytes_sent_per_rank"]["median"],
                        "cpu": sum(cpu.get(k, {}).get("median", 0.0)
                                   for k in ("merge", "relabel_phase", "table_phase")),
                        "largest": r["largest_message_bytes"]})
    return out


def fit(rows, cols, y):
    A = np.array([[1.0] + [c(p) for c in cols] for p in rows])
    b = np.array([y(p) for p in rows], np.float64)
    norm = np.abs(A).max(axis=0)          # columns of very different sizes: solve on scaled columns
    norm[norm == 0] = 1.0
    coef = nnls(A / norm, b)[0] / norm
    return coef, A @ coef


def envelope(rows, col, y):
    """(0, the largest y / col over the points) and the envelope at each point."""
    slope = max(y(p) / col(p) for p in rows if col(p) > 0)
    return np.array([0.0, slope]), np.array([slope * col(p) for p in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+")
    a = p.parse_args(argv)
    pts = points(a.results)
    per_obj, blk, local = (lambda q: q["N"] / q["P"]), (lambda q: q["B"]), (lambda q: q.get("L", q["P"]))
    own_blk = (lambda q: q["B"] / q["P"])   # the relabel and the records: per block of the rank's own
    models = {
        "peak RSS per rank (MiB)": fit(pts, [per_obj, blk], lambda q: q["rss"]),
        "rank 0 RSS over median (MiB)": fit(pts, [blk, local], lambda q: q["rank0_extra"]),
        "bytes sent per rank (MB)": envelope(pts, per_obj, lambda q: q["bytes"] / 1e6),
        "merge+relabel+table CPU s per rank": fit(pts, [per_obj, own_blk, blk], lambda q: q["cpu"]),
    }
    keys = {"peak RSS per rank (MiB)": ["m0", "m_obj", "m_blk"],
            "rank 0 RSS over median (MiB)": ["r0", "r_blk", "r_local"],
            "bytes sent per rank (MB)": ["s0", "s_obj"],
            "merge+relabel+table CPU s per rank": ["t0", "t_obj", "t_own", "t_blk"]}
    print("points (P, N, B): measured -> fitted")
    for name, (coef, fitted) in models.items():
        y = {"peak RSS per rank (MiB)": "rss", "rank 0 RSS over median (MiB)": "rank0_extra",
             "bytes sent per rank (MB)": "bytes", "merge+relabel+table CPU s per rank": "cpu"}[name]
        scale = 1e6 if y == "bytes" else 1.0
        print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in zip(keys[name], coef)))
        for q, f in zip(pts, fitted):
            print(f"    P={q['P']:>3} N={q['N']:>9} B={q['B']:>6}: {q[y] / scale:10.3f} -> {f:10.3f}")
    print("\npredictions")
    cols_of = {"peak RSS per rank (MiB)": [per_obj, blk], "rank 0 RSS over median (MiB)": [blk, local],
               "bytes sent per rank (MB)": [per_obj], "merge+relabel+table CPU s per rank": [per_obj, own_blk, blk]}

    def value(name, q):
        coef = models[name][0]
        return coef[0] + sum(c * f(q) for c, f in zip(coef[1:], cols_of[name]))

    for label, (P, N, B) in TARGETS.items():
        q, q_one_node = {"P": P, "N": N, "B": B, "L": 8}, {"P": P, "N": N, "B": B}
        out = []
        for name in models:
            v = f"{name} {value(name, q):.1f}"
            if name.startswith("rank 0"):
                v += f" [{value(name, q_one_node):.1f}]"
            out.append(v)
        rows = models["bytes sent per rank (MB)"][0][1] * 1e6 * N / P   # all of a rank's table rows to one rank
        largest = max(min(MESSAGE_BYTES, rows), 40 * B, 16 * B / P)
        print(f"  {label} (N/P = {N / P:,.0f} objects, B/P = {B / P:.0f} blocks): " + "; ".join(out)
              + f"; largest single message ~{largest / 1e6:.0f} MB (<= {max(MESSAGE_BYTES, EXCHANGE_BYTES) >> 20} MiB "
              f"by construction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
