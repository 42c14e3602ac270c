"""The network's arithmetic precision (``--precision``).

Cellpose 3 runs its network in float32 and has no switch for anything else; Cellpose 4 has
``use_bfloat16`` (its default).  ``--precision`` is one option for both:

* ``float32`` keeps Cellpose 3's own code path untouched (its results are Cellpose's, bit for bit);
* ``bfloat16`` / ``float16`` run the network's forward pass under ``torch.autocast`` in that type,
  with the activations in channels-last layout (what oneDNN on CPUs with AMX/AVX-512 BF16 and the
  tensor cores of GPUs are fast with), and hand float32 back to Cellpose, so everything after the
  network (flows, dynamics, masks) is unchanged.  Weights stay float32.

Under Cellpose 4 the choice becomes its ``use_bfloat16`` model argument (``float16`` is refused:
Cellpose 4 has no float16 mode).  Measured effect: docs/pipeline.md ("Precision and batch size").
"""
from __future__ import annotations

import logging

from ..errors import ConfigError

log = logging.getLogger("mpicellpose")

PRECISIONS = ("float32", "bfloat16", "float16")


def check_precision(precision, cellpose_major: int | None) -> None:
    """ConfigError for a precision the installed Cellpose cannot run (planning, every rank)."""
    if precision is None:
        return
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if (cellpose_major or 0) >= 4 and precision == "float16":
        raise ConfigError("Cellpose 4 runs its network in bfloat16 or float32 (use_bfloat16); "
                          "--precision float16 is for Cellpose 3")


def cp4_model_kwargs(mk: dict, precision) -> dict:
    """Cellpose 4: ``--precision`` as ``use_bfloat16`` (a conflicting explicit value is an error)."""
    if precision is None:
        return mk
    want = precision == "bfloat16"
    if "use_bfloat16" in mk and bool(mk["use_bfloat16"]) != want:
        raise ConfigError(f"--precision {precision} contradicts model_kwargs use_bfloat16={mk['use_bfloat16']!r}; "
                          f"give one of them")
    return dict(mk, use_bfloat16=want)


def lower_precision(model, precision) -> list:
    """Run ``model``'s Cellpose 3 networks in ``precision`` (in place); returns the nets changed.

    Each net's ``forward`` is wrapped: input to channels-last, the forward pass under autocast,
    floating outputs back to float32.  Cellpose 3's per-call MKL-DNN conversion is turned off
    (autocast works on ordinary tensors; the plain path is also the faster one here).
    """
    if precision in (None, "float32"):
        return []
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    changed = []
    for attr in ("net", "net_ortho"):
        net = getattr(model, attr, None)
        if net is None or getattr(net, "_mpicellpose_precision", None):
            continue
        device_type = _device_type(net, model)
        if device_type == "cpu" and precision == "float16":
            log.warning("--precision float16 on a CPU is slow on most processors; bfloat16 is the CPU's half "
                        "precision")
        _wrap(net, dtype, device_type, torch)
        net._mpicellpose_precision = precision
        changed.append(attr)
    return changed


def _device_type(net, model) -> str:
    dev = getattr(model, "device", None) or getattr(net, "device", None)
    kind = getattr(dev, "type", None) or str(dev or "cpu").split(":")[0]
    return kind if kind in ("cuda", "cpu", "mps", "xpu") else "cpu"


def _wrap(net, dtype, device_type, torch) -> None:
    if hasattr(net, "mkldnn"):
        net.mkldnn = False
    net.to(memory_format=torch.channels_last)
    inner = net.forward

    def forward(x, *args, **kwargs):
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = inner(x, *args, **kwargs)
        return _as_float32(out, torch)

    net.forward = forward


def _as_float32(out, torch):
    if torch.is_tensor(out):
        return out.float().contiguous() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_as_float32(o, torch) for o in out)
    return out
