"""Bind each MPI rank to one accelerator.

The rule is *one rank per GPU*: the ranks that share a node are numbered
``0 .. local_size - 1`` (the node-local rank: ranks grouped by processor
name through the MPI gateway) and node-local rank ``r`` takes
``cuda:{r % n_visible}``, where ``n_visible`` is the number of GPUs *this
process* can see.  The scheduler's choice is respected: when it hides GPUs
through ``CUDA_VISIBLE_DEVICES`` (``srun --gpus-per-task=1``, ``jsrun -g 1``,
LSF ``-gpu``), CUDA renumbers the visible devices from 0, so a rank that sees
exactly one GPU always gets ``cuda:0``, whatever its rank.

:func:`mpicellpose.cellpose.devices.choose_device` is the pure rule (testable with no MPI, no
torch, no GPU); :func:`bind_device` gathers the facts (node-local rank, GPU count, host name)
and applies it.  Torch is imported lazily; without torch, or without a usable GPU, the rank
falls back to ``"cpu"`` with a logged warning.  Nothing MPI happens at import time.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Optional

from .devices import (DeviceBinding, _normalise_override, choose_device, count_visible_gpus, local_rank_from_env,
                      visible_gpu_ids)

logger = logging.getLogger(__name__)

__all__ = ["bind_device"]


def _physical_id(device: str, cvd: Optional[str]) -> Optional[str]:
    """Node-wide name of a CUDA device (``"cuda:1"`` with ``CUDA_VISIBLE_DEVICES=4,5`` → ``"5"``)."""
    if not device.startswith("cuda:"):
        return None
    index = int(device[5:])
    ids = visible_gpu_ids({} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd})
    if ids is None or index >= len(ids):
        return str(index)
    return ids[index]


def bind_device(comm=None, override: Optional[str] = None, *, log: bool = True) -> DeviceBinding:
    """Choose this rank's device: one rank per GPU, node by node.

    Collective over ``comm`` (every rank must call it): the node-local rank is
    computed by grouping the ranks by processor name, through the MPI gateway
    (:class:`mpicellpose.comm.Mailbox`: labelled collectives that never block).  Torch is imported lazily;
    this function does not call ``torch.cuda.set_device``.

    Parameters
    ----------
    comm : Mailbox or mpi4py communicator, optional
        The run's MPI gateway (:class:`mpicellpose.comm.Mailbox`), or a communicator
        (wrapped in one).  Communicator of the ranks that segment.  ``None``: no MPI; the node-local
        rank is read from the launcher's variables (see :func:`mpicellpose.cellpose.devices.local_rank_from_env`).
    override : str, optional
        Device requested by the user (``--device``), see :func:`mpicellpose.cellpose.devices.choose_device`.
    log : bool
        Log the choice at INFO ("rank 5 -> cuda:1 on node X") and warn on a CPU
        fallback.  ``mpicellpose info`` passes ``False``.

    Returns
    -------
    DeviceBinding

    Raises
    ------
    ValueError
        When the override cannot be honoured (e.g. ``cuda:3`` with two GPUs
        visible).  Raised on the ranks concerned only: callers inside a
        collective phase must agree on failure.

    Examples
    --------
    >>> b = bind_device(None, override="cpu", log=False)
    >>> b.device
    'cpu'
    """
    choice = _normalise_override(override)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if choice in ("cpu", "mps"):
        n_visible, why = 0, "not queried"  # no need to initialise CUDA at all
    else:
        n_visible, why = count_visible_gpus()

    node_devices = None  # physical GPU ids used by the ranks of this node
    all_ranks = None  # (host, device) of every rank, when a communicator is given
    if comm is None:
        rank = 0
        local_rank, local_size = local_rank_from_env()
        host = socket.gethostname()
        device = choose_device(local_rank, local_size, n_visible, override)
    else:
        from ..comm import Mailbox  # noqa: PLC0415 - the MPI gateway (labelled, non-blocking waits)

        box = comm if hasattr(comm, "node_local") else Mailbox(comm)
        rank = box.rank
        local_rank, local_size, host = box.node_local("device binding: ranks per node")
        try:
            device = choose_device(local_rank, local_size, n_visible, override)
            error = None
        except ValueError as exc:
            device, error = "invalid", exc
        # one tiny exchange: which physical GPU each rank took (and which ranks fell back to the CPU)
        taken = box.allgather((host, _physical_id(device, cvd), device), "device binding: GPUs taken")
        node_devices = [d for h, d, _ in taken if h == host]
        all_ranks = [(h, dev) for h, _, dev in taken]
        if error is not None:
            raise error

    if choice != "auto" and not (choice == "cuda" and device.startswith("cuda")):
        reason = f"requested with --device {override}"
    elif device == "cpu":
        reason = f"no GPU: {why}"
    elif n_visible == 1:
        reason = "this rank sees exactly one GPU"
    elif local_size > n_visible:
        reason = f"local rank {local_rank} of {local_size}, {local_size} ranks share {n_visible} GPUs"
    else:
        reason = f"local rank {local_rank} of {local_size} on {n_visible} GPUs"
    binding = DeviceBinding(device=device, local_rank=local_rank, local_size=local_size,
                            hostname=host, n_visible=n_visible, reason=reason, rank=rank,
                            visible_devices=cvd)
    if log:
        logger.info("%s", binding.describe())
        if device == "cpu" and choice == "auto":
            _warn_cpu(rank, host, why, all_ranks)
        elif device.startswith("cuda") and local_rank == 0:
            used = [d for d in (node_devices or [_physical_id(device, cvd)]) if d is not None]
            n_distinct = len(set(used))
            if len(used) > n_distinct:
                logger.warning("node %s: %d ranks share %d GPU(s); one rank per GPU is usually "
                               "fastest", host, len(used), n_distinct)
            elif comm is not None and cvd is None and n_visible > local_size:
                logger.warning("node %s: %d rank(s) but %d GPUs visible: %d GPU(s) left idle",
                               host, local_size, n_visible, n_visible - local_size)
    return binding


def _warn_cpu(rank: int, host: str, why: str, all_ranks) -> None:
    """The CPU fallback warning: one line on rank 0 when it concerns every rank (the usual
    case: a CPU-only machine or a job without GPUs), else from each rank concerned."""
    advice = ("this is slow for Cellpose. Request GPUs from the scheduler, or pass --device cpu (device=\"cpu\" in "
              "the Python API) to silence this.")
    on_cpu = [r for r, (_, dev) in enumerate(all_ranks or []) if dev == "cpu"]
    if all_ranks and len(all_ranks) > 1 and len(on_cpu) == len(all_ranks):
        if rank == 0:
            nodes = len({h for h, _ in all_ranks})
            where = f"on {host}" if nodes == 1 else f"on {nodes} nodes"
            logger.warning("all %d ranks %s run on the CPU (%s); %s", len(all_ranks), where, why, advice)
        return
    logger.warning("rank %d on %s runs on the CPU (%s); %s", rank, host, why, advice)


def device_problem(override: Optional[str] = None, injected: Optional[str] = None) -> tuple:
    """(device kind, problem or None) of this rank, before any model is loaded: ``"cuda"`` when its
    GPUs answer, else ``"cpu"`` with why the GPU it was given is missing or unusable (None: it was
    given none).  ``injected``: a fault-injection action (tests) that marks the device unusable."""
    choice = _normalise_override(override)
    if injected:
        return "cpu", f"its GPU is unusable ({injected}: injected fault)"
    if choice in ("cpu", "mps"):
        return choice, None
    n, why = count_visible_gpus()
    ids = visible_gpu_ids()
    if n == 0:
        if ids:   # the scheduler gave this rank GPUs, but CUDA cannot use them
            return "cpu", f"CUDA_VISIBLE_DEVICES={','.join(ids)} but {why}"
        return "cpu", (f"--device {override} was asked for but {why}" if choice != "auto" else None)
    try:
        import torch  # noqa: PLC0415 - counted above, so importable

        for k in range(n):   # a tiny allocation per visible GPU: one that fell off the bus fails here
            torch.zeros(1, device=f"cuda:{k}").add_(1).cpu()
    except Exception as exc:  # noqa: BLE001 - any CUDA error means unusable
        return "cpu", f"its GPU does not answer ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return "cuda", None


def check_devices(box, override: Optional[str] = None, *, allow_cpu_fallback: bool = False,
                  injected: Optional[str] = None) -> tuple:
    """Collective (every rank of the gateway ``box``): (this rank's device, ``"cuda:K"``, ``"cpu"`` or
    ``"mps"``; whether it falls back to the CPU for want of a usable GPU), or an error on every rank naming the host and rank of each rank whose GPU is missing
    or unusable (given GPUs that do not answer, or none while other ranks have one), unless
    ``allow_cpu_fallback`` (those ranks then run on the CPU, with a warning).  A job where no rank
    has a GPU is not a fault: it runs on the CPU as before."""
    from ..errors import BackendError, agreed  # noqa: PLC0415

    kind, problem = device_problem(override, injected)
    local_rank, local_size, host = box.node_local("device check: ranks per node")
    seen = box.allgather((host, kind, problem), "device check: every rank's device")
    any_gpu = any(k == "cuda" for _, k, _ in seen)
    bad = [(r, h, p or "it sees no GPU while other ranks have one") for r, (h, k, p) in enumerate(seen)
           if p or (any_gpu and k == "cpu" and _normalise_override(override) == "auto")]
    if bad:
        names = "; ".join(f"rank {r} on host {h}: {p}" for r, h, p in bad[:8]) + (
            f"; and {len(bad) - 8} more rank(s)" if len(bad) > 8 else "")
        if not allow_cpu_fallback:
            raise agreed(BackendError(
                f"{len(bad)} rank(s) have no usable GPU: {names}. The job stops here, before any block is "
                f"segmented: a rank on the CPU is ~100x slower (every other rank would wait for its blocks) "
                f"and its blocks' labels can differ slightly. Check the job's GPU request and the node "
                f"(give the host name to your site's support), or pass --allow-cpu-fallback to run these "
                f"ranks on the CPU"))
        if box.rank == 0:
            logger.warning("--allow-cpu-fallback: %d rank(s) run on the CPU: %s", len(bad), names)
        if any(r == box.rank for r, _, _ in bad):
            return "cpu", True
    if kind != "cuda":
        return kind, False
    n, _ = count_visible_gpus()
    return choose_device(local_rank, local_size, n, override), False
