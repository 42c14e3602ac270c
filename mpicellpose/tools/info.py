"""``mpicellpose info``: versions, MPI and GPU binding, for bug reports.

Run it exactly as the job runs, so that it reports what every rank sees::

    mpirun -n 8 python -m mpi4py -m mpicellpose info
    srun --ntasks=8 --gpus-per-task=1 python -m mpi4py -m mpicellpose info --json

Rank 0 prints one report: the versions of the stack (read from package
metadata, so Cellpose is never imported), the MPI library, whether MPI looks
CUDA-aware, and one line per rank (host, GPUs seen, the device
:func:`mpicellpose.cellpose.gpu.bind_device` would choose).  Works without torch,
Cellpose or even mpi4py installed ("not installed").
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import sys
from importlib import metadata
from typing import Dict, List, Optional, Tuple

from .. import comm as mpi
from ..cellpose.precision import cpu_bf16_support, gpu_bf16_support

logger = logging.getLogger(__name__)

__all__ = ["package_version", "collect_versions", "mpi_summary", "cuda_aware_mpi",
           "rank_record", "collect_info", "format_report"]

NOT_INSTALLED = "not installed"

#: distributions reported, in order (display name, distribution name)
_PACKAGES = (
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("zarr", "zarr"),
    ("numcodecs", "numcodecs"),
    ("mpi4py", "mpi4py"),
    ("torch", "torch"),
    ("cellpose", "cellpose"),
    ("tifffile", "tifffile"),
)


def package_version(dist: str) -> str:
    """Installed version of a distribution, or ``"not installed"``.

    Reads package metadata only: nothing is imported.

    Examples
    --------
    >>> package_version("numpy") != "not installed"
    True
    >>> package_version("surely-not-a-real-package-xyz")
    'not installed'
    """
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED
    except Exception:  # pragma: no cover - corrupt metadata
        return "unknown"


def _torch_facts() -> Dict[str, object]:
    """torch version, CUDA build, and the GPUs this process sees (lazy import)."""
    facts: Dict[str, object] = {"torch": package_version("torch"), "cuda": None,
                                "cuda_available": False, "gpus": []}
    if facts["torch"] == NOT_INSTALLED:
        return facts
    try:
        import torch  # noqa: PLC0415
    except Exception as exc:
        facts["torch"] = f"{facts['torch']} (import failed: {type(exc).__name__}: {exc})"
        return facts
    facts["cuda"] = getattr(torch.version, "cuda", None)
    try:
        facts["cuda_available"] = bool(torch.cuda.is_available())
        if facts["cuda_available"]:
            gpus = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpu = f"cuda:{i} {props.name} {props.total_memory / 2**30:.0f} GiB"
                cc = (getattr(props, "major", None), getattr(props, "minor", None))
                if None not in cc:
                    gpu += (f", compute capability {cc[0]}.{cc[1]}, bfloat16 "
                            f"{'native' if gpu_bf16_support(cc)[0] else 'emulated'}")
                gpus.append(gpu)
            facts["gpus"] = gpus
    except Exception as exc:
        facts["cuda_error"] = f"{type(exc).__name__}: {exc}"
    return facts


def collect_versions() -> Dict[str, str]:
    """Versions of mpicellpose, Python and the stack (no heavy import).

    Returns
    -------
    dict
        Display name → version string (``"not installed"`` when missing).
        ``cellpose_major`` tells whether Cellpose is the 3.x (CPnet) or the
        4.x (Cellpose-SAM) line.

    Examples
    --------
    >>> v = collect_versions()
    >>> sorted(k for k in ("python", "numpy", "mpicellpose") if k in v)
    ['mpicellpose', 'numpy', 'python']
    """
    from .. import __version__  # noqa: PLC0415

    out = {"mpicellpose": __version__,
           "python": f"{platform.python_version()} ({platform.python_implementation()}, "
                     f"{sys.executable})",
           "platform": platform.platform()}
    for name, dist in _PACKAGES:
        out[name] = package_version(dist)
    cp = out["cellpose"]
    if cp == NOT_INSTALLED:
        out["cellpose_major"] = NOT_INSTALLED
    else:
        major = cp.split(".")[0]
        out["cellpose_major"] = {"3": "3.x (CPnet models: cyto3, nuclei, custom)",
                                 "4": "4.x (Cellpose-SAM, cpsam only)"}.get(
            major, f"{major}.x (unsupported: need 3.1.1+ or 4.x)")
    return out


def cuda_aware_mpi(environ: Optional[Dict[str, str]] = None) -> Tuple[str, str]:
    """Does the MPI library accept GPU buffers?  ``("yes"|"no"|"unknown", how)``.

    mpicellpose itself only sends host memory, so this is informational (it
    matters if you embed mpicellpose in a program that sends GPU buffers).
    Asks mpi4py (``MPI.Query_cuda_support``, MPIX extension) when the library
    provides it, then looks at well-known variables.

    Examples
    --------
    >>> cuda_aware_mpi({"MPICH_GPU_SUPPORT_ENABLED": "1"})[0] in ("yes", "no", "unknown")
    True
    """
    env = os.environ if environ is None else environ
    found = mpi.query_cuda_support()
    if found is not None:
        supported, name = found
        return ("yes" if supported else "no"), f"mpi4py MPI.{name}()"
    truthy = ("1", "yes", "true", "on", "enable", "enabled")
    checks = (
        ("MPICH_GPU_SUPPORT_ENABLED", "HPE Cray MPICH"),
        ("MV2_USE_CUDA", "MVAPICH2"),
        ("OMPI_MCA_opal_cuda_support", "Open MPI"),
        ("MPIR_CVAR_ENABLE_GPU", "MPICH"),
        ("I_MPI_OFFLOAD", "Intel MPI"),
    )
    for var, who in checks:
        value = env.get(var)
        if value is not None:
            answer = "yes" if value.strip().lower() in truthy else "no"
            return answer, f"{var}={value} ({who}, environment)"
    ucx = env.get("UCX_TLS")
    if ucx and "cuda" in ucx.lower():
        return "yes", f"UCX_TLS={ucx} includes cuda (environment; probably)"
    return "unknown", "mpi4py has no MPI.Query_cuda_support here and no known variable is set"


def mpi_summary(comm=None) -> Dict[str, object]:
    """MPI library, standard version, size; ``{"mpi4py": "not installed"}`` without mpi4py."""
    error = mpi.mpi_import_error()
    if error is not None:
        return {"mpi4py": NOT_INSTALLED, "library": NOT_INSTALLED, "error": error}
    library = mpi.library_version()
    aware, how = cuda_aware_mpi()
    return {
        "library": " ".join(library.split()) if library else "unknown",
        "standard": mpi.mpi_standard(),
        "size": comm.Get_size() if comm is not None else 1,
        "thread_level": mpi.thread_level_name() or "unknown",
        "cuda_aware": aware,
        "cuda_aware_how": how,
    }


def rank_record(comm=None, device: Optional[str] = None) -> Dict[str, object]:
    """What this rank sees: host, GPUs, the binding; collective over ``comm``."""
    from ..cellpose.gpu import bind_device  # noqa: PLC0415

    torch = _torch_facts()
    rec: Dict[str, object] = {
        "rank": comm.Get_rank() if comm is not None else 0,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": torch["gpus"],
        "cuda_available": torch["cuda_available"],
        "cpu_bf16": list(cpu_bf16_support()),
    }
    if "cuda_error" in torch:
        rec["cuda_error"] = torch["cuda_error"]
    try:
        binding = bind_device(comm, override=device, log=False)
        rec.update({"hostname": binding.hostname, "local_rank": binding.local_rank,
                    "local_size": binding.local_size, "device": binding.device,
                    "reason": binding.reason})
    except ValueError as exc:
        rec.update({"device": "error", "reason": str(exc)})
    return rec


def collect_info(comm=None, device: Optional[str] = None) -> Optional[Dict[str, object]]:
    """Gather everything on rank 0 (collective over ``comm``).

    Parameters
    ----------
    comm : mpi4py communicator, optional
        ``None``: this process alone.
    device : str, optional
        ``--device`` override to show the binding for.

    Returns
    -------
    dict or None
        The report on rank 0 (keys ``versions``, ``torch``, ``mpi``, ``ranks``,
        ``nodes``); ``None`` on the other ranks.

    Examples
    --------
    >>> info = collect_info(None)
    >>> len(info["ranks"]), info["nodes"][0]["ranks"]
    (1, 1)
    """
    rec = rank_record(comm, device)
    records: List[Dict[str, object]] = comm.gather(rec, root=0) if comm is not None else [rec]
    if comm is not None and comm.Get_rank() != 0:
        return None
    torch = _torch_facts()
    nodes: Dict[str, List[int]] = {}
    for r in records:
        nodes.setdefault(str(r["hostname"]), []).append(int(r["rank"]))
    return {
        "versions": collect_versions(),
        "torch": {"version": torch["torch"],
                  "cuda": (NOT_INSTALLED if torch["torch"] == NOT_INSTALLED
                           else torch["cuda"] or "none (CPU build)")},
        "mpi": mpi_summary(comm),
        "ranks": records,
        "nodes": [{"hostname": h, "ranks": len(rs), "rank_ids": rs} for h, rs in nodes.items()],
    }


def format_report(info: Dict[str, object]) -> str:
    """Render :func:`collect_info`'s result as readable text."""
    v = info["versions"]
    mpi = info["mpi"]
    lines = ["mpicellpose support information", ""]
    width = 13
    for key in ("mpicellpose", "python", "platform", "numpy", "scipy", "zarr", "numcodecs",
                "mpi4py", "tifffile"):
        lines.append(f"  {key:<{width}} {v.get(key, NOT_INSTALLED)}")
    lines.append(f"  {'MPI library':<{width}} {mpi.get('library')}")
    if "standard" in mpi:
        lines.append(f"  {'MPI standard':<{width}} {mpi['standard']}, thread level "
                     f"{mpi['thread_level']}, {mpi['size']} rank(s)")
        lines.append(f"  {'CUDA-aware':<{width}} {mpi['cuda_aware']} ({mpi['cuda_aware_how']}; "
                     "not needed by mpicellpose)")
    lines.append(f"  {'torch':<{width}} {info['torch']['version']}")
    lines.append(f"  {'CUDA (torch)':<{width}} {info['torch']['cuda']}")
    lines.append(f"  {'cellpose':<{width}} {v['cellpose']}"
                 + (f" — {v['cellpose_major']}" if v["cellpose"] != NOT_INSTALLED else ""))
    nodes = info["nodes"]
    per_node = sorted({n["ranks"] for n in nodes})
    lines += ["", f"{len(info['ranks'])} rank(s) on {len(nodes)} node(s), ranks per node: "
              + ", ".join(f"{n['hostname']}={n['ranks']}" for n in nodes)
              + ("" if len(per_node) <= 1 else "  (uneven)")]
    for r in info["ranks"]:
        gpus = r.get("gpus") or []
        seen = f"{len(gpus)} GPU(s)" if gpus else "no GPU"
        cvd = r.get("CUDA_VISIBLE_DEVICES")
        lines.append(f"  rank {r['rank']:>4} on {r['hostname']} (local {r.get('local_rank', '?')}/"
                     f"{r.get('local_size', '?')}): sees {seen}"
                     + (f" [CUDA_VISIBLE_DEVICES={cvd}]" if cvd is not None else "")
                     + f" -> {r.get('device')} ({r.get('reason')})")
        if r.get("cpu_bf16"):
            native, why = r["cpu_bf16"]
            lines.append(f"         CPU bfloat16: {'native' if native else 'emulated'} ({why})"
                         + ("" if native else "; Cellpose 4 runs in float32 on this CPU unless told otherwise"))
        for g in gpus:
            lines.append(f"         {g}")
        if r.get("cuda_error"):
            lines.append(f"         CUDA error: {r['cuda_error']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    from mpicellpose.cli.info import standalone_main

    sys.exit(standalone_main())
