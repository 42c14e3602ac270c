"""Flows first, masks second: the Cellpose network once per voxel (``--pipeline flows``).

Cellpose's 3D network runs on 2D planes in three orientations (YX, ZX, ZY) and sums them.
A plane needs context only within itself, so the network does not need a block's full 3D
overlap: each orientation runs on the planes through a *flow box* (:mod:`mpicellpose.grid.boxes`),
each plane grown by a small in-plane halo (``flow_halo``).  The network's cost per output voxel is
then about ``((kB + 2h) / kB)^2`` instead of ``((B + 2o) / B)^3`` (o: the 3D overlap; k: blocks per
box side).

The mask step (following the flows to where they converge, building masks) does need a 3D
neighbourhood of about a cell diameter; it runs per box on its core plus the overlap of the
flow field, so neighbouring boxes see the same flows in their overlap and the usual face
stitching joins what they found.

Both steps go through the installed Cellpose's own code: the flow step calls ``eval`` with
``compute_masks=False`` and substitutes the model's ``_run_net`` by one that runs the
selected planes (so conversion, normalisation and resizing are Cellpose's), the mask step
calls the model's ``_compute_masks`` with the arguments ``eval`` would give it.  Works with
Cellpose 3.1 and 4.x (same private signatures, checked at start-up).

Each orientation's three values (the two in-plane flow components, then the cell probability)
are rounded to half precision and summed in single precision as Cellpose sums them; the sum is
kept in half precision (``ndim + 1`` values: 8 bytes per voxel in 3D, 6 in 2D).
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from ..errors import BackendError, ConfigError
from ..grid.boxes import FLOW_DTYPE

FLOW_LIMIT = 60000.0   # clip before half precision (its largest finite value is 65504)

# Cellpose's run_3D: the axis order of each orientation's planes and where its two flow
# outputs go (the same three tables as cellpose.core.run_3D)
_PERM = ((0, 1, 2, 3), (1, 0, 2, 3), (2, 0, 1, 3))
_INV = ((0, 1, 2), (1, 0, 2), (1, 2, 0))
_FLOW_AXES = ((1, 2), (0, 2), (0, 1))
_RUN_NET_ARGS = ("x", "rescale", "resample", "augment", "batch_size", "tile_overlap", "bsize", "anisotropy",
                 "do_3D")


def combine(stored) -> np.ndarray:
    """The flow field Cellpose's eval would give (float32 ``(ndim + 1, ...)``: the flow
    components, then the cell probability) from the stored per-orientation values
    (``(3 * orientations, ...)``), summed in Cellpose's order (orientation 0, 1, 2)."""
    stored = np.asarray(stored)
    if stored.shape[0] == 3:  # 2D: one orientation, already (dy, dx, cellprob)
        return stored.astype(np.float32)
    out = np.zeros((4, *stored.shape[1:]), np.float32)
    for p in range(3):
        out[3] += stored[3 * p + 2]
        for j in range(2):
            out[_FLOW_AXES[p][j]] += stored[3 * p + j]
    return out


def check_cellpose_internals(model) -> None:
    """The two private calls this module relies on, with the arguments it passes."""
    try:
        run_args = set(inspect.signature(model._run_net).parameters)
        mask_args = set(inspect.signature(model._compute_masks).parameters)
    except (AttributeError, TypeError, ValueError) as exc:
        raise BackendError(f"--pipeline flows needs CellposeModel._run_net and _compute_masks: {exc}; use "
                           f"--pipeline blocks with this Cellpose") from exc
    missing = [a for a in _RUN_NET_ARGS if a not in run_args]
    missing += [a for a in ("shape", "dP", "cellprob", "niter", "do_3D") if a not in mask_args]
    if missing:
        raise BackendError(f"--pipeline flows: this Cellpose's CellposeModel has other private arguments "
                           f"(missing {', '.join(missing)}); use --pipeline blocks")


def _resize3d(resize_image, img, shape):
    """Cellpose's 3D resize: Y and X first, then Z (the same calls as its _run_net)."""
    lz, ly, lx = shape
    out = img
    if out.shape[1] != ly or out.shape[2] != lx:
        out = resize_image(out, Ly=ly, Lx=lx)
    if out.shape[0] != lz:
        out = resize_image(out.transpose(1, 0, 2, 3), Ly=lz, Lx=lx).transpose(1, 0, 2, 3)
    return out


class _Capture:
    """Stands in for ``model._run_net`` during one ``eval``: runs the network of one
    orientation on the planes through the core only and keeps the core's three values
    (eval gets a one-voxel placeholder, so it does no work on the result)."""

    def __init__(self, model, core_local, ndim, original, orient=0, major=3):
        self.model, self.core, self.ndim, self.original = model, core_local, ndim, original
        self.orient, self.major = int(orient), major
        self.flows = None
        self.network_voxels = 0

    def __call__(self, x, rescale=1.0, resample=True, augment=False, batch_size=8, tile_overlap=0.1,
                 bsize=224, anisotropy=1.0, do_3D=False):
        if self.ndim == 3 and not do_3D:
            raise ConfigError("--pipeline flows segments 3D volumes in 3D (do_3D); for plane-by-plane "
                              "segmentation use --pipeline blocks")
        if self.ndim == 2:
            dP, cellprob, styles = self.original(x, rescale=rescale, resample=resample, augment=augment,
                                                 batch_size=batch_size, tile_overlap=tile_overlap, bsize=bsize,
                                                 anisotropy=anisotropy, do_3D=do_3D)
            ys, xs = self.core
            self.flows = np.concatenate([dP[:, 0, ys, xs], cellprob[None, 0, ys, xs]])
            self.network_voxels = int(np.prod(x.shape[1:3])) * x.shape[0]
        else:
            self.flows, styles = self._planes(x, rescale, resample, augment, batch_size, tile_overlap, bsize,
                                              anisotropy)
        n = self.ndim
        placeholder = np.zeros((n, 2, 2, 2) if n == 3 else (n, 1, 2, 2), np.float32)
        return placeholder, np.zeros(placeholder.shape[1:], np.float32), styles

    def _tile_size(self, bsize):
        """The tile size Cellpose's own 3D path uses: 3.1 tiles planes at 224 whatever eval's
        ``bsize`` (its run_3D gets none); 4.x passes ``bsize``, 256 (or 384) when None."""
        if self.major < 4:
            return 224
        if bsize is not None:
            return bsize
        return 256 if getattr(self.model, "backbone", "sam_vitl") == "sam_vitl" else 384

    def _planes(self, x, rescale, resample, augment, batch_size, tile_overlap, bsize, anisotropy):
        """Orientation ``p``'s (flow along its first in-plane axis, along its second, cell
        probability) of the core, as Cellpose's run_3D computes them before it sums the three."""
        from cellpose import core as cp_core  # noqa: PLC0415 - cellpose is optional
        from cellpose import transforms  # noqa: PLC0415

        if not resample:
            raise ConfigError("--pipeline flows needs resample=True (Cellpose's default)")
        lz, ly, lx = x.shape[:3]
        aniso = 1.0 if anisotropy is None else float(anisotropy)
        resized = rescale != 1.0 or aniso != 1.0
        target = (int(lz * aniso * rescale), int(ly * rescale), int(lx * rescale)) if resized else (lz, ly, lx)
        xr = _resize3d(transforms.resize_image, x, target) if resized else x
        margin = 2 if resized else 0
        p = self.orient
        nets = [self.model.net, getattr(self.model, "net_ortho", None) or self.model.net,
                getattr(self.model, "net_ortho", None) or self.model.net]
        axis = _PERM[p][0]
        scale = xr.shape[axis] / x.shape[axis]
        lo = max(0, int(math.floor(self.core[axis].start * scale)) - margin)
        hi = min(xr.shape[axis], int(math.ceil(self.core[axis].stop * scale)) + margin)
        planes = xr.transpose(_PERM[p])[lo:hi]
        kw = {"batch_size": batch_size, "augment": augment, "tile_overlap": tile_overlap, "rsz": None,
              "bsize": self._tile_size(bsize)}
        if getattr(nets[p], "standin_flows", False):  # the scale-test stand-in (cellpose/standin.py)
            y, style = nets[p].planes(planes), np.zeros((len(planes), 256), np.float32)
        else:
            y, style = cp_core.run_net(nets[p], planes, **kw)
        self.network_voxels = int(np.prod(planes.shape[:3]))
        sel = [slice(None)] * 3
        sel[axis] = slice(lo, hi)
        out = np.zeros((*xr.shape[:3], 3), np.float32)
        sel = tuple(sel)
        for j, c in enumerate((0, 1, -1)):  # run_3D's two flow outputs, then the last (cell probability)
            out[sel + (j,)] = y[..., c].transpose(_INV[p])
        del y
        if resized:
            out = _resize3d(transforms.resize_image, out, (lz, ly, lx))
        return np.ascontiguousarray(np.moveaxis(out[self.core], -1, 0)), style


def compute_flows(seg, image, core_local, ndim: int, orient: int = 0):
    """(orientation ``orient``'s three values over the core, float32 ``(3, *core)``; network
    voxels evaluated).  2D: the one orientation (dy, dx, cell probability).

    ``seg``: a :class:`mpicellpose.cellpose.segmenter.CellposeSegmenter`; ``image``: the slab's read
    region (channel axis last, if any); ``core_local``: slices of the core in that region.
    """
    core_local = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(core_local, np.shape(image)[:ndim]))
    image, ek = seg.prepare(image, ndim)
    ek = dict(ek, compute_masks=False)
    ek.pop("flow3D_smooth", None)  # applied by the mask step, which has the 3D neighbourhood
    model = seg.model
    before = model.__dict__.get("_run_net")  # a wrapper someone put on the instance stays
    cap = _Capture(model, tuple(core_local), ndim, getattr(model, "_run_net"), orient, getattr(seg, "major", 3))
    model._run_net = cap
    try:
        seg._eval_with_retry(image, ek)
    finally:
        if before is None:
            del model._run_net
        else:
            model._run_net = before
    if cap.flows is None:
        raise BackendError("Cellpose's eval did not run the network (its private API changed?); use "
                           "--pipeline blocks")
    return cap.flows, cap.network_voxels


def _smooth(dP, sigma):
    """Cellpose's ``flow3D_smooth``: a Gaussian per flow component (a number or Z, Y, X sigmas)."""
    from scipy.ndimage import gaussian_filter  # noqa: PLC0415

    s = list(sigma) if isinstance(sigma, (list, tuple)) else [sigma]
    if len(s) == 1:
        s = s * 3
    if len(s) != 3 or not any(float(v) > 0 for v in s):
        return dP
    return gaussian_filter(dP, [0, *map(float, s)])


def _rescale(seg, ek: dict) -> float:
    """The factor Cellpose's eval resizes the image by (its diameter rule)."""
    diameter = ek.get("diameter")
    if getattr(seg, "major", 3) >= 4:
        return 30.0 / float(diameter) if diameter else 1.0
    diam_mean = float(getattr(seg.model, "diam_mean", 30.0) or 30.0)
    labels = float(getattr(seg.model, "diam_labels", diam_mean) or diam_mean)
    return diam_mean / float(diameter) if diameter else diam_mean / labels


def mask_arguments(seg, ek: dict, read_voxels: int, total_voxels: int) -> dict:
    """The arguments Cellpose's ``eval`` gives ``_compute_masks``, with ``max_size_fraction``
    made a fraction of the whole volume (not of the block) so it does not depend on the block size."""
    major = getattr(seg, "major", 3)
    rescale = _rescale(seg, ek)
    niter = ek.get("niter")
    if not niter:
        niter = (int(200 / rescale) if major >= 4 else 200 / rescale) if ek.get("resample", True) else 200
    frac = float(ek.get("max_size_fraction", 0.4))
    args = {"flow_threshold": ek.get("flow_threshold", 0.4), "cellprob_threshold": ek.get("cellprob_threshold", 0.0),
            "min_size": ek.get("min_size", 15), "max_size_fraction": frac * total_voxels / max(read_voxels, 1),
            "niter": niter, "do_3D": bool(ek.get("do_3D", False)), "stitch_threshold": 0.0}
    if major < 4:
        args["interp"] = ek.get("interp", True)
    return args


def compute_masks(seg, flows, ndim: int, total_voxels: int):
    """Labels of a block's read region from its flow field (float32 ``(ndim + 1, *region)``)."""
    _, ek = seg.prepare(np.zeros((1,) * ndim, np.float32), ndim)
    region = flows.shape[1:]
    dP, cellprob = flows[:ndim], flows[ndim]
    args = mask_arguments(seg, ek, int(np.prod(region)), total_voxels)
    accepted = set(inspect.signature(seg.model._compute_masks).parameters)
    args = {k: v for k, v in args.items() if k in accepted}
    if ndim == 3:
        if ek.get("flow3D_smooth"):
            dP = _smooth(dP, ek["flow3D_smooth"])
        shape = (*region, 1)
    else:
        dP, cellprob = dP[:, None], cellprob[None]
        shape = (1, *region, 1)
    masks = seg.model._compute_masks(shape, np.ascontiguousarray(dP, np.float32),
                                     np.ascontiguousarray(cellprob, np.float32), **args)
    masks = np.asarray(masks).reshape(region)
    return masks


def to_half(flows):
    return np.clip(flows, -FLOW_LIMIT, FLOW_LIMIT).astype(FLOW_DTYPE)
