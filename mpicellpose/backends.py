"""Segmentation backends behind one small interface.

A backend is created once per rank and then called once per block with the block's
image (spatial axes first, an optional channel axis last).  It returns integer labels
over the spatial shape.  Heavy dependencies (torch, cellpose) are imported lazily.
"""
from __future__ import annotations

import inspect
import logging
import os
import socket
from pathlib import Path

import numpy as np
from scipy import ndimage

from .volumes.channels import CHANNEL_BOUNDS
from .cellpose4 import CP4_NORMALIZE_DEFAULTS, check_bsize_v4, cp4_normalize, load_shipped  # noqa: F401
from .errors import BackendError, ConfigError, DependencyError, ModelNotFoundError, needs
from .precision import check_precision, cp4_model_kwargs, lower_precision
from .volumes.storage import sha256_file

log = logging.getLogger(__name__)

DEFAULT_DIAMETER = 30.0


class Segmenter:
    """Interface: ``segment(image) -> labels`` (0 background, > 0 objects)."""

    name = "base"

    def segment(self, image: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description for provenance and the resume fingerprint."""
        return {"backend": self.name}


class ThresholdSegmenter(Segmenter):
    """Connected components of ``image > threshold``.

    Parameters
    ----------
    threshold : float
    connectivity : int or 'full'
        1 = faces (scipy.ndimage.label's default) up to ndim (or 'full') = all neighbours.
    channel : int
        Channel used when the image has a channel axis (last).

    Examples
    --------
    >>> seg = ThresholdSegmenter(0.5, 1)
    >>> seg.segment(np.array([[1., 0, 1], [1, 0, 0]]), ndim=2).tolist()
    [[1, 0, 2], [1, 0, 0]]
    """

    name = "threshold"

    def __init__(self, threshold: float = 0.0, connectivity: int = 1, channel: int = 0):
        self.threshold = float(threshold)
        self.connectivity = 99 if connectivity == "full" else int(connectivity)
        self.channel = int(channel)

    def segment(self, image, ndim=None):
        image = np.asarray(image)
        ndim = image.ndim if ndim is None else ndim
        if image.ndim > ndim:
            image = image[..., self.channel]
        fg = image > self.threshold
        structure = ndimage.generate_binary_structure(ndim, min(self.connectivity, ndim))
        labels, _ = ndimage.label(fg, structure=structure)
        return labels

    def describe(self):
        return {"backend": self.name, "threshold": self.threshold, "connectivity": self.connectivity,
                "channel": self.channel}


class LabelsSegmenter(Segmenter):
    """The input already holds labels (e.g. per-block segmentations from another tool):
    each block's labels are taken as they are, then stitched and renumbered like any other
    backend's.  Also the no-inference path of the merge benchmarks.

    Examples
    --------
    >>> LabelsSegmenter().segment(np.array([[0, 7], [7, 3]]), ndim=2).tolist()
    [[0, 7], [7, 3]]
    """

    name = "labels"

    def segment(self, image, ndim=None):
        image = np.asarray(image)
        if image.dtype.kind not in "iub":
            raise BackendError(f"the labels backend needs an integer input, got {image.dtype}")
        return image


# --------------------------------------------------------------------------- cellpose
def cellpose_version():
    """(major, full version string) of the installed cellpose, or (None, None)."""
    try:
        from importlib.metadata import version
        v = version("cellpose")
    except Exception:
        return None, None
    try:
        return int(v.split(".")[0]), v
    except ValueError:
        return None, v


def model_dir() -> Path:
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env) if env else Path.home() / ".cellpose" / "models"


BUILTIN_V3 = {
    "cyto3", "nuclei", "cyto2_cp3", "tissuenet_cp3", "livecell_cp3", "yeast_PhC_cp3", "yeast_BF_cp3",
    "bact_phase_cp3", "bact_fluor_cp3", "deepbacs_cp3", "cyto2", "cyto", "transformer_cp3",
    "neurips_cellpose_default", "neurips_cellpose_transformer", "neurips_grayscale_cyto2",
}
BUILTIN_V4 = {"cpsam", "cpsam_v2"}


def builtin_filename(name: str) -> str:
    """File name Cellpose stores a built-in model under in its model directory."""
    if name in ("cyto", "cyto2", "nuclei"):
        return f"{name}torch_0"
    return name


def _network_ok(host="www.cellpose.org", port=443, timeout=3.0) -> bool:
    """Can the model server be reached?  Bounded in time even where DNS hangs."""
    import threading

    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 2.0)
    return bool(result and result[0])


def resolve_model(model_kwargs: dict) -> dict:
    """Decide which weights a Cellpose run uses, on one rank, before any block runs.

    Returns a dict with ``kind`` ('path', 'builtin' or 'random'), ``name``, ``path``
    (absolute, or None for random weights) and ``sha256``.  Raises
    :class:`ModelNotFoundError` naming the file and where to put it when weights are
    missing and cannot be downloaded.
    """
    mk = dict(model_kwargs or {})
    pm = mk.get("pretrained_model", False)
    mt = mk.get("model_type")
    name = pm if isinstance(pm, (str, os.PathLike)) and pm else mt
    if name is None or name is False:
        if "pretrained_model" in mk and mk["pretrained_model"] is False and mt is None:
            return {"kind": "random", "name": None, "path": None, "sha256": None}
        name = "cyto3" if (cellpose_version()[0] or 3) < 4 else "cpsam"
    name = os.fspath(name)
    if name.startswith("demo_cyto2ch"):  # the shipped two-channel (cytoplasm + nucleus) Cellpose 3 model
        from .training_2ch import resolve

        return resolve(name, *cellpose_version())
    if name == "demo" or name.startswith(("demo_nuclei", "demo_cp4")):
        from .training_cp4 import resolve_demo  # demo_nuclei_v1 under 3.x, the stand-in under 4.x

        return resolve_demo(name, *cellpose_version())
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir():
            raise ModelNotFoundError(f"model path {str(p)!r} is a directory, not a weights file")
        return {"kind": "path", "name": str(p), "path": str(p.resolve()), "sha256": sha256_file(p)}
    if name in BUILTIN_V3 or name in BUILTIN_V4:
        cached = model_dir() / builtin_filename(name)
        if cached.exists():
            return {"kind": "builtin", "name": name, "path": str(cached), "sha256": sha256_file(cached)}
        if _network_ok():
            return {"kind": "builtin", "name": name, "path": None, "sha256": None}
        raise ModelNotFoundError(
            f"Cellpose model {name!r}: weights not found at {cached} and the download server cannot be "
            f"reached (offline compute node?). Download the file once on a machine with internet (it is "
            f"saved to ~/.cellpose/models/{builtin_filename(name)}), copy it to {model_dir()} or to the "
            f"directory named by CELLPOSE_LOCAL_MODELS_PATH, or pass the weights' path with --model PATH."
        )
    if os.sep in name or name.endswith((".pth", ".pt")) or "." in Path(name).name:
        raise ModelNotFoundError(f"model file {name!r} does not exist")
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a file, not 'demo' and not a built-in Cellpose model "
        f"(built-ins: {', '.join(sorted(BUILTIN_V3 | BUILTIN_V4))})"
    )


def _torchvision_for_torch() -> str:
    """``torchvision==0.N.*`` built for the installed torch 2.M (N = M + 15), else ``torchvision``."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("torch").split("+")[0].split(".")[:2])
        return f"torchvision==0.{minor + 15}.*" if major == 2 else "torchvision"
    except Exception:  # noqa: BLE001 - torch missing or an odd version string
        return "torchvision"


def _cellpose_import_error(exc: BaseException) -> DependencyError:
    """One-line install hint for a failed ``import cellpose.models`` (4.x: torchvision, segment_anything)."""
    major, full = cellpose_version()
    if major is None:
        return needs("cellpose", "cellpose")
    missing = (getattr(exc, "name", None) or "").split(".")[0]
    cpu = "for the CPU torch add --index-url https://download.pytorch.org/whl/cpu"
    if isinstance(exc, ImportError) and missing in ("torchvision", "segment_anything"):
        pkg = _torchvision_for_torch() if missing == "torchvision" else "segment-anything"
        return DependencyError(f"Cellpose {full} needs {missing}, which is not installed: pip install '{pkg}' "
                               f"(the release built for your torch; {cpu})")
    if "torchvision::" in str(exc):
        return DependencyError(f"Cellpose {full} imports torchvision, whose compiled ops do not load with this torch "
                               f"(a CUDA torchvision beside a CPU torch?): pip install '{_torchvision_for_torch()}' "
                               f"from the index your torch came from ({cpu}); see docs/cellpose4.md")
    return DependencyError(f"importing Cellpose {full} failed ({type(exc).__name__}: {exc}); reinstall it with its "
                           f"dependencies: pip install 'cellpose=={full}'")


def import_cellpose_models():
    """``cellpose.models``, or a :class:`DependencyError` whose one line says what to install."""
    try:
        from cellpose import models
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision that does not match torch
        if isinstance(exc, RuntimeError) and "torchvision" not in str(exc):
            raise
        raise _cellpose_import_error(exc) from None
    return models


def cellpose_eval_parameters():
    """Names accepted by the installed ``CellposeModel.eval`` (imports cellpose)."""
    models = import_cellpose_models()
    return set(inspect.signature(models.CellposeModel.eval).parameters) - {"self", "x"}


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
    (:class:`ConfigError`); ``invert`` moves into ``normalize`` per block (:func:`cp4_normalize`).
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
        Output of :func:`resolve_model` computed on rank 0 (so every rank loads the same file).
    device : str, optional
        'cpu', 'cuda:K', ... (see :mod:`mpicellpose.gpu`).
    threads : int, optional
        torch CPU threads for this rank.
    precision : str, optional
        The network's arithmetic ('float32', 'bfloat16', 'float16'; see :mod:`mpicellpose.precision`);
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
                "precision": self.precision}


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


def make_backend(name: str, *, model_kwargs=None, eval_kwargs=None, backend_kwargs=None, resolved=None,
                 device=None, threads=None, ndim=3, precision=None) -> Segmenter:
    """Build the backend called ``name`` ('cellpose', 'threshold' or 'labels')."""
    bk = dict(backend_kwargs or {})
    if name == "threshold":
        return ThresholdSegmenter(bk.get("threshold", 0.0), bk.get("connectivity", 1), bk.get("channel", 0))
    if name == "labels":
        return LabelsSegmenter()
    if name == "cellpose":
        return CellposeSegmenter(model_kwargs, eval_kwargs, resolved=resolved, device=device, threads=threads,
                                 ndim=ndim, precision=precision)
    raise ConfigError(f"unknown backend {name!r}; choose 'cellpose', 'threshold' or 'labels'")
