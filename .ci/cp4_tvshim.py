"""Import hook that lets PyPI's torchvision 0.28.0 import beside the CPU torch 2.13.0 wheel.

CI test infrastructure for the Cellpose 4 venv (``.ci/cellpose4-venv.sh`` copies this file to
``site-packages/_cp4_tvshim.py`` and adds ``_cp4_tvshim.pth``); it is not part of mpicellpose.

Why it exists: on this CI machine torch is the CPU wheel (the CUDA one is several GB), but the
only torchvision built for torch 2.13 that pip can reach is the CUDA build.  Its compiled
extension ``torchvision/_C.so`` needs ``libc10_cuda.so``/``libtorch_cuda.so`` and does not load;
torchvision then registers fake kernels for ``torchvision::nms``/``qnms`` without checking that
the extension loaded and ``import torchvision`` dies with
``RuntimeError: operator torchvision::nms does not exist``.  Cellpose 4 imports torchvision
(and segment_anything, which imports it) but calls none of its compiled ops, so defining the two
op schemas before the first ``import torchvision`` is enough (``torchvision.ops.nms`` would
raise if called; nothing in Cellpose or mpicellpose calls it).  A matching CPU torchvision
(``pip install torchvision --index-url https://download.pytorch.org/whl/cpu``) or a CUDA torch
needs no shim: if ``_C.so`` loads, this hook defines nothing.  See docs/cellpose4.md.

Cost: none until something imports torchvision (torch is not imported at start-up).
"""
import importlib.abc
import importlib.util
import os
import sys

_LIB = None  # keeps the torch.library.Library (and with it the schemas) alive


def ensure():
    """Define ``torchvision::nms``/``qnms`` schemas unless torchvision's own extension loads."""
    global _LIB
    if _LIB is not None:
        return
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - raises if the op is not registered
        return
    except (AttributeError, RuntimeError):
        pass
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Hook)]
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations:
        so = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
        if os.path.exists(so):
            try:
                torch.ops.load_library(so)  # a matching (CPU or CUDA) build: nothing to do
                return
            except (OSError, RuntimeError):
                pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            ensure()
        return None


if not any(isinstance(f, _Hook) or type(f).__name__ == "_Hook" for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
