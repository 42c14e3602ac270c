"""What a segmenter is (:class:`Segmenter`), and the Cellpose one: a Cellpose 3.1 or 4.x model
loaded once per rank, its arguments translated for the installed major version, fixed
normalisation bounds applied to each block, and a retry with a smaller batch after a GPU
out-of-memory error.  Imports no Cellpose at module level."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import BackendError, ConfigError, needs
from ..volumes.channels import CHANNEL_BOUNDS
from .cellpose4 import CP4_NORMALIZE_DEFAULTS, check_bsize_v4, cp4_normalize
from .models import cellpose_eval_parameters, cellpose_version, import_cellpose_models, resolve_model
from .precision import check_precision, cp4_model_kwargs, lower_precision, model_precision, warn_if_emulated
from .shipped import load_shipped

log = logging.getLogger(__name__)


class Segmenter:
    """Interface: ``segment(image) -> labels`` (0 background, > 0 objects)."""

    name = "base"

    def segment(self, image: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description for provenance and the resume fingerprint."""
        return {"backend": self.name}


DEFAULT_DIAMETER = 30.0


# arguments we set ourselves from the block geometry
_MANAGED_EVAL = {"z_axis", "channel_axis"}


# arguments that exist in one major version only: translated or dropped with a warning
_V3_ONLY_EVAL = {"channels", "interp"}


_V3_TRANSLATED_EVAL = {"invert"}  # Cellpose 4 takes it as normalize["invert"]


_V3_ONLY_MODEL = {"model_type", "nchan", "diam_mean", "backbone", "pretrained_model_ortho", "mkldnn"}


_V4_ONLY_MODEL = {"use_bfloat16"}


def translate_kwargs(model_kwargs: dict, eval_kwargs: dict, major: int):
    """Adapt reference-style (Cellpose 3) kwargs to the installed Cellpose major version.

    4.x: ``channels``/``interp`` and the 3.x-only model kwargs are dropped (channels are taken in
    order), ``model_type`` becomes ``pretrained_model``, ``bsize`` must be None or 256
    (:class:`ConfigError`); ``invert`` moves into ``normalize`` per block
    (:func:`mpicellpose.cellpose.cellpose4.cp4_normalize`).
    3.x: ``channels`` defaults to ``[0, 0]``; the 4.x-only ``use_bfloat16`` is dropped.
    Returns new ``(model_kwargs, eval_kwargs, ignored)``; warn once about ``ignored``.
    """
    mk, ek, ignored = dict(model_kwargs or {}), dict(eval_kwargs or {}), []
    if major >= 4:
        for k in sorted(_V3_ONLY_EVAL & set(ek)):
            ek.pop(k)
            ignored.append(f"eval_kwargs[{k!r}]")
        for k in sorted(_V3_ONLY_MODEL & set(mk)):
            v = mk.pop(k)
            if k == "model_type" and v and "pretrained_model" not in mk:
                mk["pretrained_model"] = v
            else:
                ignored.append(f"model_kwargs[{k!r}]")
        check_bsize_v4(ek.get("bsize"))
    else:
        if "channels" not in ek:
            ek["channels"] = [0, 0]
        for k in sorted(_V4_ONLY_MODEL & set(mk)):
            mk.pop(k)
            ignored.append(f"model_kwargs[{k!r}] (Cellpose 4 only)")
    return mk, ek, ignored


class CellposeSegmenter(Segmenter):
    """Cellpose (3.1.1.x or 4.x) model, loaded once per rank.

    Parameters
    ----------
    model_kwargs, eval_kwargs : dict
        As for ``CellposeModel(**model_kwargs).eval(image, **eval_kwargs)``.
    resolved : dict, optional
        Output of :func:`mpicellpose.cellpose.models.resolve_model` computed on rank 0 (so every rank
        loads the same file).
    device : str, optional
        'cpu', 'cuda:K', ... (see :mod:`mpicellpose.cellpose.gpu`).
    threads : int, optional
        torch CPU threads for this rank.
    precision : str, optional
        The network's arithmetic ('float32', 'bfloat16', 'float16'; see :mod:`mpicellpose.cellpose.precision`);
        None keeps the model's own (float32 under Cellpose 3, Cellpose 4's ``use_bfloat16`` default).
    """

    name = "cellpose"

    def __init__(self, model_kwargs=None, eval_kwargs=None, *, resolved=None, device=None, threads=None,
                 ndim=3, precision=None):
        major, full = cellpose_version()
        if major is None:
            raise needs("cellpose", "cellpose")
        self.major, self.version = major, full
        self.ndim = ndim
        self.resolved = resolved or resolve_model(model_kwargs or {})
        mk, ek, self.ignored = translate_kwargs(model_kwargs, eval_kwargs, major)
        check_precision(precision, major)
        if major >= 4:
            mk = cp4_model_kwargs(mk, precision)
        self.precision = precision
        self._user_channels = "channels" in (eval_kwargs or {})
        models = import_cellpose_models()
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        mk.pop("pretrained_model", None)
        mk.pop("model_type", None)
        gpu = bool(device and str(device).startswith(("cuda", "mps")))
        mk.setdefault("gpu", gpu)
        if device is not None:
            mk["device"] = torch.device(device)
        res = self.resolved
        if res["kind"] == "random":
            mk["pretrained_model"] = False
        elif res["path"] is not None:
            mk["pretrained_model"] = res["path"]
        else:  # built-in that cellpose will download (network checked on rank 0)
            if major >= 4:
                mk["pretrained_model"] = res["name"]
            else:
                mk["model_type"] = res["name"]
        self._diameter_factor, self._norm_keys = 1.0, None
        if res.get("loader"):  # shipped small models: the Cellpose 4 stand-in, the two-channel demo
            self.model, self.diam_mean, self._diameter_factor = load_shipped(res, mk)
        else:
            try:
                self.model = models.CellposeModel(**mk)
            except Exception as exc:
                raise BackendError(f"could not build CellposeModel({_short(mk)}): {exc}") from exc
            self.diam_mean = float(getattr(self.model, "diam_mean", DEFAULT_DIAMETER) or DEFAULT_DIAMETER)
        if res["kind"] == "random" and getattr(self.model, "net_ortho", 1) is not None and major < 4:
            self.model.net_ortho = None  # random weights have no orthogonal net (Cellpose 3 quirk)
        if major < 4:
            lower_precision(self.model, precision)
        self.precision_used = precision or model_precision(major, self.resolved, model_kwargs)
        warn_if_emulated(self.precision_used, device)
        if major >= 4:
            self._norm_keys = set(getattr(models, "normalize_default", CP4_NORMALIZE_DEFAULTS))
        if "diameter" not in ek or ek["diameter"] is None:
            ek["diameter"] = self.diam_mean if res["kind"] == "path" else DEFAULT_DIAMETER
        ek["diameter"] = float(ek["diameter"])
        if ndim == 3:
            ek.setdefault("do_3D", True)
        self.eval_kwargs = ek

    def prepare(self, image, ndim=None):
        """(image, eval kwargs) exactly as :meth:`segment` hands them to ``eval``."""
        ndim = self.ndim if ndim is None else ndim
        image = np.asarray(image)
        if image.ndim == ndim + 1 and image.shape[-1] == 1:
            image = image[..., 0]  # one chosen channel kept as a channel axis: a one-channel block
        ek = dict(self.eval_kwargs)
        if image.ndim > ndim:
            ek["channel_axis"] = image.ndim - 1
            if self.major < 4 and not getattr(self, "_user_channels", True):
                ek["channels"] = [1, 2]  # Cellpose 3: channels in order, to segment (cytoplasm) then nucleus
        if ndim == 3:
            ek["z_axis"] = 0
        image, ek = apply_fixed_bounds(image, ek, ndim)
        if getattr(self, "_norm_keys", None) is not None:  # Cellpose 4
            ek = cp4_normalize(ek, self._norm_keys)
            if ek.get("diameter"):
                ek["diameter"] = float(ek["diameter"]) * self._diameter_factor
        return image, ek

    def segment(self, image, ndim=None):
        ndim = self.ndim if ndim is None else ndim
        image, ek = self.prepare(image, ndim)
        out = self._eval_with_retry(image, ek)
        masks = out[0] if isinstance(out, (tuple, list)) else out
        masks = np.asarray(masks)
        spatial = image.shape[:ndim]
        if masks.shape != spatial:
            raise BackendError(f"Cellpose returned labels of shape {masks.shape} for a block of shape {spatial}")
        return masks

    def _eval_with_retry(self, image, ek):
        """Run eval; on a GPU out-of-memory error retry with half the batch size (down to 1).

        The batch size only changes how many tiles go through the network at once, not the
        result, so a retry gives the labels the first attempt would have given.
        """
        batch = int(ek.get("batch_size", 8))
        while True:
            try:
                return self.model.eval(image, **dict(ek, batch_size=batch))
            except Exception as exc:
                if not is_out_of_memory(exc) or batch <= 1:
                    raise
                batch = max(1, batch // 2)
                log.warning("out of memory on a block of shape %s; retrying with batch_size=%d", image.shape, batch)
                _empty_cache()

    def describe(self):
        ek = {k: v for k, v in self.eval_kwargs.items() if k not in _MANAGED_EVAL}
        return {"backend": self.name, "cellpose": self.version, "model": self.resolved, "eval_kwargs": ek,
                "precision": self.precision_used}


def apply_fixed_bounds(image, ek, ndim):
    """Apply fixed ``[low, high]`` bounds (global normalisation) to a block ourselves: one pair for
    a one-channel block, one pair per channel (``normalize[CHANNEL_BOUNDS]`` or a ``lowhigh`` of
    shape (channels, 2)) for a block with a channel axis (last).

    Cellpose converts a one-channel image to ``model.nchan`` channels (the extra ones are zero)
    and then applies a ``lowhigh`` of shape (2,) to *every* channel, so the empty channels become
    ``-low / (high - low)`` instead of 0: the network then sees an input it never saw in training
    (its percentile path leaves empty channels at 0).  Measured on the shipped model: the same
    bounds as the block's own percentiles gave different labels through ``lowhigh`` and matched
    only when applied here.  So we scale (and invert) the image here and call Cellpose with
    normalisation off, which is exactly its percentile path with fixed bounds.  With several
    channels, each gets its own bounds (Cellpose 3's per-channel ``lowhigh`` arithmetic), in the
    block's channel order, before Cellpose picks channels (``channels=[1, 2]``).

    >>> x, ek = apply_fixed_bounds(np.array([[[0., 10], [10, 30]]]), {"normalize": {"lowhigh": [0, 10],
    ...     CHANNEL_BOUNDS: [[0, 10], [10, 30]]}}, 2)
    >>> x.tolist(), ek["normalize"]["normalize"]
    ([[[0.0, 0.0], [1.0, 1.0]]], False)
    """
    norm = ek.get("normalize")
    if not isinstance(norm, dict):
        return image, ek
    if CHANNEL_BOUNDS in norm:  # ours: never handed to Cellpose
        ek = dict(ek, normalize={k: v for k, v in norm.items() if k != CHANNEL_BOUNDS})
    multi = image.ndim == ndim + 1
    bounds = norm.get(CHANNEL_BOUNDS) if multi and norm.get(CHANNEL_BOUNDS) is not None else norm.get("lowhigh")
    if bounds is None or norm.get("normalize") is False or image.ndim not in (ndim, ndim + 1):
        return image, ek
    lh = np.asarray(bounds, dtype=np.float64)
    nchan = image.shape[-1] if multi else 1
    if lh.shape == (2,):
        lh = np.tile(lh, (nchan, 1))
    if lh.shape != (nchan, 2):
        raise BackendError(f"normalisation bounds of shape {lh.shape} for a block with {nchan} channel(s); "
                           f"give one [low, high] or one per channel")
    x = np.array(image, dtype=np.float32)  # a copy: the caller's block stays as read
    view = x if multi else x[..., None]
    for c, (lo, hi) in enumerate(lh):  # the same float32 arithmetic as cellpose.transforms.normalize_img
        view[..., c] -= np.float64(lo)
        view[..., c] /= np.float64(hi - lo)
    if norm.get("invert") or ek.get("invert"):
        x *= -1
        x += 1
    # a dict, not False: Cellpose 3 writes a bool into its module-level defaults, and with norm3D
    # off it does not warn "norm3D is True but do_3D is False" on every block
    ek = dict(ek, normalize={"normalize": False, "norm3D": False})
    ek.pop("invert", None)
    return x, ek


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's CUDA/MPS out-of-memory errors (by type name or message)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _empty_cache():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def _short(d):
    return ", ".join(f"{k}={v!r}" for k, v in d.items())


def check_eval_kwargs(eval_kwargs: dict) -> None:
    """Raise ConfigError for keys the installed Cellpose's ``eval`` does not accept."""
    valid = cellpose_eval_parameters() | _V3_ONLY_EVAL | _V3_TRANSLATED_EVAL
    bad = sorted(set(eval_kwargs or {}) - valid)
    if bad:
        raise ConfigError(
            f"unknown eval_kwargs key(s) {bad} for the installed Cellpose {cellpose_version()[1]}; "
            f"valid keys: {', '.join(sorted(valid))}"
        )
    if (cellpose_version()[0] or 3) >= 4:
        check_bsize_v4((eval_kwargs or {}).get("bsize"))
