"""What ``mpicellpose check`` measures and shows: the block-wise labels of a region against
whole-region Cellpose of the same region (the oracle), with the project's own metrics
(:func:`mpicellpose.synthetic.metrics.match_objects` and the benchmarks' seam counts,
:func:`mpicellpose.tools.demo.seam_report`, the oracle standing for the truth), the verdict,
the terminal table and the PNG of the central planes."""
from __future__ import annotations

import json

import numpy as np

from ..volumes import storage
from ..synthetic.metrics import contingency, match_objects
from .demo import block_ids, seam_report

#: Default thresholds: object F1 against the oracle at IoU 0.5, and seam errors (splits, merges and
#: fragments at block faces) per 100 oracle objects cut by a face.
MIN_F1 = 0.99
MAX_SEAM_ERRORS = 1.0


def _pieces(pred, oracle, blocksize):
    """Oracle objects cut by a face, multi-block predicted labels, and the overlap pairs."""
    bid = block_ids(oracle.shape, blocksize)
    nb = int(bid.max()) + 1

    def multi(lab):
        fg = lab > 0
        key = np.unique(lab[fg].astype(np.int64) * nb + bid[fg])
        labels, n = np.unique(key // nb, return_counts=True)
        return set(labels[n > 1].tolist())

    t = contingency(pred, oracle)
    pa, pb, cnt = t["pair_a"], t["pair_b"], t["pair_count"].astype(np.float64)
    return multi(oracle), multi(pred), t["a_labels"][pa], t["b_labels"][pb], cnt, t["b_sizes"][pb]


def away_from_faces(pred, oracle, blocksize) -> dict:
    """Splits and merges of objects that no block face cuts (the same rules as the seam counts:
    a split leaves an oracle object in two or more pieces of at least 10 % of it; a merge is a
    predicted label holding at least half of two or more oracle objects)."""
    cut, multi_pred, plab, olab, cnt, osize = _pieces(pred, oracle, blocksize)
    pieces, holders = {}, {}
    for o, p, c, s in zip(olab.tolist(), plab.tolist(), cnt.tolist(), osize.tolist()):
        if c >= 0.1 * s:
            pieces.setdefault(o, set()).add(p)
        if c >= 0.5 * s:
            holders.setdefault(p, set()).add(o)
    splits = sum(1 for o, ps in pieces.items() if o not in cut and len(ps) >= 2)
    merges = sum(1 for p, os_ in holders.items() if p not in multi_pred and len(os_) >= 2)
    return {"splits": int(splits), "merges": int(merges)}


def disagreement(pred, oracle, iou_threshold: float = 0.5) -> np.ndarray:
    """Voxels of the objects (of either labelling) that have no match at IoU >= 0.5 in the other."""
    t = contingency(pred, oracle)
    inter = t["pair_count"].astype(np.float64)
    iou = inter / (t["a_sizes"][t["pair_a"]] + t["b_sizes"][t["pair_b"]] - inter)
    good = iou >= iou_threshold
    lone_p = np.setdiff1d(t["a_labels"], t["a_labels"][t["pair_a"][good]])
    lone_o = np.setdiff1d(t["b_labels"], t["b_labels"][t["pair_b"][good]])
    return np.isin(pred, lone_p) | np.isin(oracle, lone_o)


def compare(pred, oracle, blocksize) -> dict:
    """F1 and mean IoU against the oracle, seam errors at faces, splits and merges away from them.

    >>> oracle = np.array([[1, 1, 1, 1, 1, 1, 0, 2]])      # object 1 crosses the face at x = 3
    >>> m = compare(np.array([[1, 1, 1, 3, 3, 3, 0, 2]]), oracle, (1, 3))
    >>> m["f1"], m["cut"], m["split_at_faces"], m["fragments_at_faces"], m["seam_errors"]
    (0.8, 1, 1, 2, 3)
    """
    pred, oracle = np.asarray(pred), np.asarray(oracle)
    scores = match_objects(pred, oracle, 0.5)
    seams = seam_report(pred, oracle, blocksize)
    away = away_from_faces(pred, oracle, blocksize)
    errors = seams["seam_splits"] + seams["seam_merges"] + seams["seam_fragments"]
    return {
        "f1": round(scores["f1"], 4), "mean_iou": round(scores["mean_matched_iou"], 4),
        "objects_oracle": scores["n_gt"], "objects_blockwise": scores["n_pred"], "cut": seams["cut"],
        "rejoined": seams["rejoined"], "split_at_faces": seams["seam_splits"],
        "merged_at_faces": seams["seam_merges"], "fragments_at_faces": seams["seam_fragments"],
        "split_away": away["splits"], "merged_away": away["merges"], "seam_errors": int(errors),
        "seam_errors_per_100_cut": round(100.0 * errors / max(seams["cut"], 1), 2),
    }


def judge(m: dict, min_f1: float = MIN_F1, max_seam: float = MAX_SEAM_ERRORS) -> list:
    """The reasons a measurement fails the thresholds (empty: it passes)."""
    why = []
    if m["f1"] < min_f1:
        why.append(f"F1 {m['f1']:.3f} < {min_f1:g}")
    if m["seam_errors_per_100_cut"] > max_seam:
        why.append(f"{m['seam_errors_per_100_cut']:g} seam errors per 100 objects at faces > {max_seam:g}")
    return why


_ROWS = (
    ("objects (oracle / block-wise)", lambda r: f"{r['objects_oracle']} / {r['objects_blockwise']}"),
    ("F1 vs whole-region (IoU 0.5)", lambda r: f"{r['f1']:.4f}"),
    ("mean IoU of matched objects", lambda r: f"{r['mean_iou']:.4f}"),
    ("objects cut by block faces", lambda r: str(r["cut"])),
    ("split at faces / away", lambda r: f"{r['split_at_faces']} / {r['split_away']}"),
    ("merged at faces / away", lambda r: f"{r['merged_at_faces']} / {r['merged_away']}"),
    ("fragments at faces", lambda r: str(r["fragments_at_faces"])),
    ("seam errors per 100 cut", lambda r: f"{r['seam_errors_per_100_cut']:g}"),
    ("network evaluations / voxel", lambda r: "?" if r.get("network_per_voxel") is None
     else f"{r['network_per_voxel']:g}"),
    ("wall (s)", lambda r: f"{r['wall_s']:.1f}"),
    ("result", lambda r: "pass" if r["passed"] else "FAIL"),
)


def format_table(report: dict) -> str:
    """The report as the terminal shows it: the region, one column per block-wise run (the
    settings asked for first, then each fix tried), the oracle's wall, the verdict."""
    reg = report["region"]
    span = ", ".join(f"{a}:{b}" for a, b in zip(reg["start"], reg["stop"]))
    lines = [f"mpicellpose check: region {span} ({' x '.join(map(str, reg['shape']))} voxels, "
             f"{reg['blocks']} blocks of {' x '.join(map(str, report['blocksize']))}, {reg['how']}), "
             f"{report['ranks']} rank(s)",
             f"oracle: whole-region Cellpose, {report['oracle']['objects']} objects, "
             f"{report['oracle']['wall_s']:.1f} s; the whole check took {report['cost_x_oracle']:g}x its wall "
             f"(planned network work {report['planned_cost_x_oracle']:g}x one whole-region evaluation)"]
    runs = report["runs"]
    heads = [r["label"] for r in runs]
    width = max(len(h) for h in heads + ["pass"]) + 2
    first = max(len(name) for name, _ in _ROWS) + 2
    lines.append(" " * first + "".join(h.rjust(width) for h in heads))
    for name, cell in _ROWS:
        lines.append(name.ljust(first) + "".join(cell(r).rjust(width) for r in runs))
    lines += [f"warning: {w}" for w in report.get("warnings", ())]
    if report.get("png"):
        lines.append(f"picture: {report['png']}")
    if report.get("json"):
        lines.append(f"report: {report['json']}")
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines) + "\n"


def verdict_line(runs: list, thresholds: dict) -> str:
    """One line: does blocking change the result here, and what fixes it."""
    asked = runs[0]
    limits = f"(limits: F1 >= {thresholds['min_f1']:g}, <= {thresholds['max_seam_errors']:g} seam errors per 100 cut)"
    if asked["passed"]:
        return (f"PASS: blocking leaves the result as whole-region Cellpose's here: F1 {asked['f1']:.3f}, "
                f"{asked['seam_errors']} seam error(s) among {asked['cut']} objects at faces {limits}")
    msg = f"FAIL: {'; '.join(asked['why'])} {limits}"
    fixed = [r for r in runs[1:] if r["passed"]]
    if fixed:
        r = fixed[0]
        cost = "" if r.get("network_per_voxel") is None else \
            f" at {r['network_per_voxel']:g} network evaluations per voxel"
        was = "" if asked.get("network_per_voxel") is None else f" (now {asked['network_per_voxel']:g})"
        return msg + f"; {r['label']} passes (F1 {r['f1']:.3f}){cost}{was}"
    if len(runs) > 1:
        return msg + f"; none of the settings tried ({', '.join(r['label'] for r in runs[1:])}) passes"
    return msg


def write_png(path, image, oracle, pred, blocksize, title: str) -> str:
    """Central planes: the oracle's outlines on top, the block-wise run's below, block faces in
    yellow and the voxels of every object without a match (either side) in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .preview import panel

    bad = disagreement(pred, oracle)
    nd = oracle.ndim
    if nd == 2:
        views = [("YX", (slice(None), slice(None)), (0, 1))]
    else:
        mid = [s // 2 for s in oracle.shape]
        views = [(f"YX, z={mid[0]}", (mid[0], slice(None), slice(None)), (1, 2)),
                 (f"ZX, y={mid[1]}", (slice(None), mid[1], slice(None)), (0, 2)),
                 (f"ZY, x={mid[2]}", (slice(None), slice(None), mid[2]), (0, 1))]
    fig, axs = plt.subplots(2, len(views), figsize=(max(6.0, 4.2 * len(views)), 8.4), squeeze=False)
    for col, (name, sl, axes) in enumerate(views):
        faces = {i: list(range(blocksize[a], oracle.shape[a], blocksize[a])) for i, a in enumerate(axes)}
        im = None if image is None else np.asarray(image[sl])
        for row, (who, lab) in enumerate((("whole-region (oracle)", oracle), ("block-wise", pred))):
            rgb = panel(lab[sl], im, faces)
            if row == 1:
                rgb[bad[sl]] = 0.4 * rgb[bad[sl]] + 0.6 * np.array([1.0, 0.0, 0.0])
            axs[row][col].imshow(rgb, interpolation="nearest")
            axs[row][col].set_title(f"{who}: {name}", fontsize=9)
            axs[row][col].set_axis_off()
    fig.suptitle(f"{title}\nyellow: block faces; red: objects without a match in the other", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def labels_in(path, region) -> np.ndarray:
    """A run's labels, kept only in the cores of the region's blocks that the mask keeps."""
    lab = np.asarray(storage.open_array(path)[...])
    keep = np.zeros(lab.shape, bool)
    for core in region["cores"]:
        keep[tuple(slice(a, z) for a, z in core)] = True
    lab[~keep] = 0
    return lab


def write_report(prep, oracle_wall, runs, opts, cfg, n_ranks) -> dict:
    """Rank 0: the report (JSON beside OUTPUT or as ``--report`` says, and the PNG)."""
    region = prep["region"]
    oracle = labels_in(prep["oracle"].output, region)
    thresholds = {"min_f1": opts.min_f1, "max_seam_errors": opts.max_seam_errors}
    asked = runs[: 2 if opts.both_pipelines else 1]
    report = {
        "input": str(cfg.input), "output": cfg.output, "ranks": n_ranks, "blocksize": prep["blocksize"],
        "region": {k: v for k, v in region.items() if k != "cores"}, "thresholds": thresholds,
        "oracle": {"objects": int(len(np.unique(oracle)) - 1), "wall_s": round(oracle_wall, 2)},
        "runs": runs, "passed": all(r["passed"] for r in asked),
        "fix": next((r["label"] for r in runs[len(asked):] if r["passed"]), None),
        "verdict": verdict_line(runs, thresholds) if len(asked) == 1 else
        "; ".join(f"{r['label']}: {'PASS' if r['passed'] else 'FAIL ' + ', '.join(r['why'])}" for r in asked),
        "warnings": prep["warnings"], "planned_cost_x_oracle": prep["planned_cost"],
        "cost_x_oracle": round((oracle_wall + sum(r["wall_s"] for r in runs)) / max(oracle_wall, 1e-9), 2),
        "normalization": (prep["normalization"] or {}).get("normalize"), "fingerprint": prep["fingerprint"],
        "json": prep["json"], "png": None,
    }
    if opts.png:
        png = report["json"][: -len(".json")] + ".png" if report["json"].endswith(".json") else report["json"] + ".png"
        try:
            image = np.asarray(storage.open_array(prep["oracle"].input)[...])
            if prep["oracle"].channel_axis is not None:
                image = np.take(image, 0, axis=prep["oracle"].channel_axis)
            report["png"] = write_png(png, image, oracle, labels_in(asked[0]["output"], region),
                                          prep["blocksize"], f"mpicellpose check: {asked[0]['label']}")
        except Exception as exc:  # noqa: BLE001 - matplotlib missing: the numbers stand without the picture
            report["warnings"].append(f"no picture: {exc}")
    storage_json = json.dumps(report, indent=1, default=storage.json_default)
    with open(report["json"], "w") as f:
        f.write(storage_json + "\n")
    return json.loads(storage_json)
