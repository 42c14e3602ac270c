"""Which Cellpose, and which weights a run uses: the installed version, its import with a
one-line install hint, and the resolution of a model name or path (on one rank, before any
block runs) to a file and its checksum.  Imports no Cellpose at module level."""
from __future__ import annotations

import inspect
import os
import socket
from pathlib import Path

from ..errors import DependencyError, ModelNotFoundError, needs
from ..volumes.storage import sha256_file


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
        from .shipped import resolve_cyto2ch

        return resolve_cyto2ch(name, *cellpose_version())
    if name == "standin-flows":  # the scale-test stand-in network (cellpose/standin.py)
        from .standin import resolve as resolve_standin

        return resolve_standin(name, *cellpose_version())
    if name == "demo" or name.startswith(("demo_nuclei", "demo_cp4")):
        from .shipped import resolve_demo  # demo_nuclei_v1 under 3.x, the stand-in under 4.x

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
