"""Which device a rank would use: the pure rule and the facts it needs, read without MPI.

:func:`choose_device` is the rule (node-local rank ``r`` takes ``cuda:{r % n_visible}``; testable
with no MPI, no torch, no GPU); :func:`visible_gpu_ids` and :func:`count_visible_gpus` read what
``CUDA_VISIBLE_DEVICES`` and torch (imported lazily) let this process see, and
:func:`local_rank_from_env` the node-local rank from the launcher's variables.
:func:`mpicellpose.cellpose.gpu.bind_device` gathers the facts over MPI and applies the rule.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceBinding",
    "choose_device",
    "visible_gpu_ids",
    "count_visible_gpus",
    "local_rank_from_env",
]


#: values of ``CUDA_VISIBLE_DEVICES`` that hide every GPU
_HIDDEN_VALUES = ("", "-1", "nodevfiles", "none", "void")


#: environment variables that launchers set to the node-local rank
#: (used only when no communicator is given)
_LOCAL_RANK_VARS = (
    "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI, Spectrum MPI (jsrun)
    "MPI_LOCALRANKID",  # MPICH / Intel MPI (hydra)
    "PMI_LOCAL_RANK",
    "PALS_LOCAL_RANKID",  # HPE Cray PALS
    "MV2_COMM_WORLD_LOCAL_RANK",  # MVAPICH2
    "SLURM_LOCALID",  # srun
    "JSM_NAMESPACE_LOCAL_RANK",  # jsrun
)


_LOCAL_SIZE_VARS = (
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "PMI_LOCAL_SIZE",
    "PALS_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "JSM_NAMESPACE_LOCAL_SIZE",
)


@dataclass(frozen=True)
class DeviceBinding:
    """Where one rank runs its model.

    Attributes
    ----------
    device : str
        Torch device string: ``"cuda:K"``, ``"cpu"`` or ``"mps"``.
    local_rank : int
        Rank among the ranks of the same node (0-based).
    local_size : int
        Number of ranks on this node.
    hostname : str
        Node name (``MPI.Get_processor_name()`` when MPI is used).
    n_visible : int
        Number of GPUs this process can see (after ``CUDA_VISIBLE_DEVICES``).
    reason : str
        One human-readable sentence explaining the choice.
    rank : int
        Rank in the communicator given to :func:`mpicellpose.cellpose.gpu.bind_device` (0 without one).
    visible_devices : str or None
        The raw ``CUDA_VISIBLE_DEVICES`` value (``None`` when unset).

    Examples
    --------
    >>> b = DeviceBinding("cuda:1", 1, 4, "node7", 4, "local rank 1 of 4 on 4 GPUs", rank=5)
    >>> b.describe()
    'rank 5 -> cuda:1 on node node7 (local rank 1 of 4 on 4 GPUs)'
    """

    device: str
    local_rank: int
    local_size: int
    hostname: str
    n_visible: int
    reason: str
    rank: int = 0
    visible_devices: Optional[str] = None

    @property
    def is_gpu(self) -> bool:
        """True when the device is a CUDA device."""
        return self.device.startswith("cuda")

    def describe(self) -> str:
        """One line for logs: ``rank R -> DEVICE on node HOST (reason)``."""
        return f"rank {self.rank} -> {self.device} on node {self.hostname} ({self.reason})"

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        return {
            "rank": self.rank,
            "hostname": self.hostname,
            "local_rank": self.local_rank,
            "local_size": self.local_size,
            "n_visible": self.n_visible,
            "visible_devices": self.visible_devices,
            "device": self.device,
            "reason": self.reason,
        }


def _normalise_override(override: Optional[str]) -> str:
    """Lower-case, strip, map aliases; ``None`` → ``"auto"``."""
    if override is None:
        return "auto"
    if not isinstance(override, str):
        raise TypeError(f"device override must be a string or None, got {override!r}")
    value = override.strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value == "gpu":
        return "cuda"
    if value.startswith("gpu:"):
        return "cuda:" + value[4:]
    return value


def choose_device(
    local_rank: int,
    local_size: int,
    n_visible_gpus: int,
    override: Optional[str] = None,
) -> str:
    """Pick the torch device of one rank (pure function).

    Parameters
    ----------
    local_rank : int
        Rank among the ranks sharing this node, ``0 <= local_rank < local_size``.
    local_size : int
        Number of ranks on this node.
    n_visible_gpus : int
        GPUs this process can see (``torch.cuda.device_count()``, which already
        honours ``CUDA_VISIBLE_DEVICES``).
    override : str, optional
        ``None`` or ``"auto"``: round-robin over the visible GPUs, ``"cpu"`` when
        there is none.  ``"cpu"`` or ``"mps"``: that device.  ``"cuda"`` (or
        ``"gpu"``): round-robin, but an error when no GPU is visible.
        ``"cuda:K"``: exactly that device (an error when it is not visible).

    Returns
    -------
    str
        ``"cuda:K"``, ``"cpu"`` or ``"mps"``.  ``K = local_rank % n_visible_gpus``
        for the automatic choices, so with more ranks than GPUs the ranks share
        the GPUs evenly, and a rank that sees exactly one GPU gets ``"cuda:0"``.

    Raises
    ------
    ValueError
        For an inconsistent rank/size/count, an unknown override, or a CUDA
        device that is not visible.

    Examples
    --------
    >>> choose_device(5, 8, 4)
    'cuda:1'
    >>> choose_device(3, 4, 1)  # srun --gpus-per-task=1: each rank sees one GPU
    'cuda:0'
    >>> choose_device(0, 2, 0)
    'cpu'
    >>> choose_device(1, 2, 4, override="cpu")
    'cpu'
    >>> choose_device(1, 2, 4, override="cuda:3")
    'cuda:3'
    """
    for name, value in (("local_rank", local_rank), ("local_size", local_size),
                        ("n_visible_gpus", n_visible_gpus)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if local_size < 1:
        raise ValueError(f"local_size must be >= 1, got {local_size}")
    if not 0 <= local_rank < local_size:
        raise ValueError(f"local_rank must be in [0, {local_size}), got {local_rank}")
    if n_visible_gpus < 0:
        raise ValueError(f"n_visible_gpus must be >= 0, got {n_visible_gpus}")

    choice = _normalise_override(override)
    if choice == "auto":
        return f"cuda:{local_rank % n_visible_gpus}" if n_visible_gpus else "cpu"
    if choice in ("cpu", "mps"):
        return choice
    if choice == "cuda":
        if not n_visible_gpus:
            raise ValueError("device 'cuda' was requested but this process sees no GPU "
                             "(check CUDA_VISIBLE_DEVICES and the job's GPU request, "
                             "or use --device auto/cpu)")
        return f"cuda:{local_rank % n_visible_gpus}"
    if choice.startswith("cuda:"):
        index_text = choice[5:]
        if not index_text.isdigit():
            raise ValueError(f"bad device {override!r}: expected 'cuda:K' with K an integer")
        index = int(index_text)
        if index >= n_visible_gpus:
            raise ValueError(f"device {override!r} was requested but this process sees "
                             f"{n_visible_gpus} GPU(s) (cuda:0..cuda:{n_visible_gpus - 1}); "
                             "GPUs are renumbered from 0 after CUDA_VISIBLE_DEVICES")
        return f"cuda:{index}"
    raise ValueError(f"unknown device {override!r}: use 'auto', 'cpu', 'cuda', 'cuda:K' or 'mps'")


def visible_gpu_ids(environ: Optional[Mapping[str, str]] = None) -> Optional[Sequence[str]]:
    """The GPUs that ``CUDA_VISIBLE_DEVICES`` exposes to this process.

    Parameters
    ----------
    environ : mapping, optional
        Environment to read (default ``os.environ``).

    Returns
    -------
    list of str or None
        ``None`` when the variable is unset (every GPU of the node is visible);
        ``[]`` when it hides every GPU (empty, ``-1``, ``NoDevFiles``); otherwise
        the listed entries (indices or ``GPU-``/``MIG-`` UUIDs), in order.  The
        process sees them as ``cuda:0 .. cuda:len-1``.

    Examples
    --------
    >>> visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "2,3"})
    ['2', '3']
    >>> visible_gpu_ids({}) is None
    True
    >>> visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "NoDevFiles"})
    []
    """
    env = os.environ if environ is None else environ
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    value = raw.strip()
    if value.lower() in _HIDDEN_VALUES:
        return []
    ids = [part.strip() for part in value.split(",") if part.strip()]
    # CUDA stops at the first negative index
    out = []
    for part in ids:
        if part.startswith("-"):
            break
        out.append(part)
    return out


def count_visible_gpus(environ: Optional[Mapping[str, str]] = None) -> Tuple[int, str]:
    """Count the CUDA GPUs this process can use, importing torch lazily.

    Parameters
    ----------
    environ : mapping, optional
        Environment to read for ``CUDA_VISIBLE_DEVICES`` (default ``os.environ``);
        only used to explain the result, torch applies the real one.

    Returns
    -------
    n : int
        ``torch.cuda.device_count()`` when CUDA is usable, else 0.
    why : str
        Why the count is what it is (``"torch not installed"``, ...).

    Examples
    --------
    >>> n, why = count_visible_gpus()
    >>> n >= 0 and isinstance(why, str)
    True
    """
    ids = visible_gpu_ids(environ)
    if ids == []:
        return 0, "CUDA_VISIBLE_DEVICES hides every GPU"
    try:
        import torch  # noqa: PLC0415  (lazy: heavy, optional)
    except Exception as exc:  # ImportError, or a broken install
        return 0, f"torch not installed ({type(exc).__name__})"
    try:
        if not torch.cuda.is_available():
            built = getattr(getattr(torch, "version", None), "cuda", None)
            if not built:
                return 0, "torch was built without CUDA"
            return 0, "torch.cuda.is_available() is False (no driver or no GPU)"
        n = int(torch.cuda.device_count())
    except Exception as exc:  # driver errors surface here
        return 0, f"CUDA initialisation failed: {exc}"
    if ids is not None and len(ids) != n:
        logger.debug("CUDA_VISIBLE_DEVICES lists %d device(s) but torch sees %d", len(ids), n)
    where = "CUDA_VISIBLE_DEVICES=" + ",".join(ids) if ids is not None else "all GPUs of the node"
    return n, f"{n} GPU(s) visible ({where})"


def _first_int(env: Mapping[str, str], names: Sequence[str]) -> Optional[int]:
    for name in names:
        value = env.get(name)
        if value is None:
            continue
        head = value.split("(")[0].split(",")[0].strip()  # SLURM_NTASKS_PER_NODE='4(x2)'
        if head.isdigit():
            return int(head)
    return None


def local_rank_from_env(environ: Optional[Mapping[str, str]] = None) -> Tuple[int, int]:
    """Node-local rank and size from the launcher's variables (no MPI call).

    Used only when :func:`mpicellpose.cellpose.gpu.bind_device` gets no communicator.

    Parameters
    ----------
    environ : mapping, optional
        Environment to read (default ``os.environ``).

    Returns
    -------
    (local_rank, local_size) : tuple of int
        ``(0, 1)`` when no launcher variable is set.

    Examples
    --------
    >>> local_rank_from_env({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    (2, 4)
    >>> local_rank_from_env({})
    (0, 1)
    """
    env = os.environ if environ is None else environ
    rank = _first_int(env, _LOCAL_RANK_VARS)
    size = _first_int(env, _LOCAL_SIZE_VARS)
    if rank is None:
        return 0, 1
    if size is None or size <= rank:
        size = rank + 1
    return rank, size
