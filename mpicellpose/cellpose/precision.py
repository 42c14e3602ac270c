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

bfloat16 is fast only where the device computes it natively: GPUs from compute capability 8.0
(Ampere) on, CPUs with AVX-512 BF16 or AMX.  Elsewhere torch emulates it, 10-150x slower than
float32 (measured: docs/cellpose4.md, "Precision on CPUs").  :func:`bf16_support` tells which it is;
:func:`resolve_precision` makes Cellpose 4's default (bfloat16) float32 where it would be emulated,
and :func:`warn_if_emulated` says so when bfloat16 is asked for there anyway.
"""
from __future__ import annotations

import logging
import os
import time

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


# oneDNN's ISA names in increasing order; bfloat16 is native from AVX512_CORE_BF16 on
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _onednn_limit(environ) -> str | None:
    """The ISA that ``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``) limits oneDNN to,
    when it limits it below bfloat16; None otherwise."""
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = (environ.get(var) or "").strip().upper()
        if value and value not in ("ALL", "DEFAULT"):
            if value in _ONEDNN_ISAS and _ONEDNN_ISAS.index(value) < _ONEDNN_ISAS.index("AVX512_CORE_BF16"):
                return f"{var}={value}"
    return None


def cpu_bf16_support(flags=None, environ=None) -> tuple:
    """(native, why) for bfloat16 on this CPU: the instructions (AVX-512 BF16 or AMX) and no
    ``ONEDNN_MAX_CPU_ISA`` limit below them (oneDNN runs the convolutions and matrix products).

    Examples
    --------
    >>> cpu_bf16_support({"avx2", "fma"}, {})
    (False, 'the CPU has no AVX-512 BF16 or AMX instructions: torch emulates bfloat16')
    >>> cpu_bf16_support({"avx512_bf16"}, {})[0]
    True
    >>> cpu_bf16_support({"amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    (False, 'ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below AVX-512 BF16: torch emulates bfloat16')
    """
    environ = os.environ if environ is None else environ
    flags = _cpu_flags() if flags is None else set(flags)
    have = sorted(f for f in _CPU_BF16_FLAGS if f in flags)
    if not have:
        return False, "the CPU has no AVX-512 BF16 or AMX instructions: torch emulates bfloat16"
    limit = _onednn_limit(environ)
    if limit:
        return False, f"{limit} keeps oneDNN below AVX-512 BF16: torch emulates bfloat16"
    return True, "the CPU has " + " and ".join(have)


def gpu_bf16_support(capability) -> tuple:
    """(native, why) for a CUDA GPU of compute capability ``(major, minor)``.

    >>> gpu_bf16_support((8, 0))[0], gpu_bf16_support((7, 0))[0]
    (True, False)
    """
    major, minor = (int(c) for c in capability)
    if major >= 8:
        return True, f"compute capability {major}.{minor} (>= 8.0) has bfloat16 tensor cores"
    return False, f"compute capability {major}.{minor} (< 8.0) has no bfloat16 arithmetic: it is emulated"


def bf16_support(device=None) -> tuple:
    """(native, why) for bfloat16 on ``device`` ('cpu', 'cuda[:K]', 'mps'; None: CPU)."""
    kind = str(device or "cpu").split(":")[0]
    if kind == "cuda":
        try:
            import torch

            index = int(str(device).split(":")[1]) if ":" in str(device) else 0
            return gpu_bf16_support(torch.cuda.get_device_capability(index))
        except Exception as exc:  # noqa: BLE001 - no CUDA: nothing to say about its GPU
            return False, f"the GPU could not be asked ({type(exc).__name__}: {exc})"
    if kind == "mps":
        return True, "Apple GPUs compute bfloat16 (M2 and later natively)"
    return cpu_bf16_support()


def model_precision(cellpose_major, resolved, model_kwargs) -> str:
    """The precision the model runs in when ``--precision`` is not given: Cellpose 3 float32;
    Cellpose 4 its ``use_bfloat16`` (given, or Cellpose's default True; the shipped stand-in's
    loader defaults to float32)."""
    if (cellpose_major or 0) < 4:
        return "float32"
    if "use_bfloat16" in (model_kwargs or {}):
        return "bfloat16" if model_kwargs["use_bfloat16"] else "float32"
    from .shipped import CP4_STANDIN_LOADER  # noqa: PLC0415

    return "float32" if (resolved or {}).get("loader") == CP4_STANDIN_LOADER else "bfloat16"


def resolve_precision(precision, cellpose_major, resolved, model_kwargs, device=None, support=None) -> tuple:
    """(precision for the run, message or None): ``precision`` as given; when not given and the model
    would run in bfloat16 on a device without native bfloat16 (``support``: ``(native, why)``, asked of
    ``device`` when None; ``device`` may be a function, called only then), float32, with the reason.
    None keeps the model's own."""
    if precision is not None or model_precision(cellpose_major, resolved, model_kwargs) != "bfloat16":
        return precision, None
    if "use_bfloat16" in (model_kwargs or {}):  # the user's explicit choice: kept (and warned of)
        return precision, None
    native, why = support if support is not None else bf16_support(device() if callable(device) else device)
    if native:
        return precision, None
    return "float32", (f"precision: float32, not Cellpose 4's default bfloat16, because {why} (10-150x slower "
                       f"than float32 there); give --precision bfloat16 to insist")


def run_device(device) -> str:
    """The kind of device a rank will compute on for ``--device`` (auto: a GPU when one is visible)."""
    choice = str(device or "auto").lower()
    if choice in ("auto", ""):
        from .devices import count_visible_gpus  # noqa: PLC0415

        return "cuda:0" if count_visible_gpus()[0] else "cpu"
    return "cuda:0" if choice in ("cuda", "gpu") else choice.replace("gpu:", "cuda:")


def measured_bf16_slowdown(threads: int = 1) -> float:
    """bfloat16 time / float32 time of one 3x3 convolution (2x32x64x64) on this CPU (~0.1-0.5 s)."""
    import torch

    x, w = torch.randn(2, 32, 64, 64), torch.randn(32, 32, 3, 3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for dt in (torch.float32, torch.bfloat16):
            xx, ww = x.to(dt), w.to(dt)
            torch.nn.functional.conv2d(xx, ww, padding=1)
            t = time.perf_counter()
            for _ in range(3):
                torch.nn.functional.conv2d(xx, ww, padding=1)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return times[1] / max(times[0], 1e-9)


_WARNED = set()


def warn_if_emulated(precision, device) -> str | None:
    """Warn (once per process and device) when the network runs in bfloat16 where it is emulated;
    returns the warning."""
    if precision != "bfloat16" or str(device) in _WARNED:
        return None
    native, why = bf16_support(device)
    if native:
        return None
    _WARNED.add(str(device))
    slow = ""
    if str(device or "cpu").startswith("cpu"):
        try:
            slow = f" (measured here: a convolution {measured_bf16_slowdown():.0f}x slower than in float32)"
        except Exception:  # noqa: BLE001 - the warning stands without the number
            slow = ""
    msg = (f"the network runs in bfloat16 on {device or 'cpu'}, but {why}{slow}; --precision float32 is "
           f"much faster there")
    log.warning(msg)
    return msg


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
