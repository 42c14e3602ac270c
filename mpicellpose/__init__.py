"""mpicellpose: distributed Cellpose segmentation of larger-than-memory volumes with MPI.

Public calls keep the names and meanings of Cellpose's Dask-based
``cellpose.contrib.distributed_segmentation``; nothing heavy (MPI, torch, cellpose)
is imported until it is used.
"""
from ._version import __version__

__all__ = [
    "distributed_eval",
    "process_block",
    "numpy_array_to_zarr",
    "wrap_folder_of_tiffs",
    "RunConfig",
    "run",
    "BlockGrid",
    "__version__",
]


def __getattr__(name):  # lazy: importing the package stays cheap and MPI-free
    if name in ("distributed_eval", "process_block"):
        from . import api
        return getattr(api, name)
    if name == "numpy_array_to_zarr":
        from .volumes.storage import numpy_array_to_zarr
        return numpy_array_to_zarr
    if name == "wrap_folder_of_tiffs":
        from .volumes.tiff import wrap_folder_of_tiffs
        return wrap_folder_of_tiffs
    if name == "RunConfig":
        from .config import RunConfig
        return RunConfig
    if name == "run":
        from .runner.driver import run
        return run
    if name == "BlockGrid":
        from .grid.geometry import BlockGrid
        return BlockGrid
    raise AttributeError(f"module 'mpicellpose' has no attribute {name!r}")
