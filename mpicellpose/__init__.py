"""mpicellpose: distributed Cellpose segmentation of larger-than-memory volumes with MPI.

Public calls keep the names and meanings of Cellpose's Dask-based
``cellpose.contrib.distributed_segmentation``; nothing heavy (MPI, torch, cellpose)
is imported until it is used.
"""
__version__ = "0.1.0"

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
    if name in ("numpy_array_to_zarr", "wrap_folder_of_tiffs"):
        from . import io
        return getattr(io, name)
    if name == "RunConfig":
        from .config import RunConfig
        return RunConfig
    if name == "run":
        from .driver import run
        return run
    if name == "BlockGrid":
        from .geometry import BlockGrid
        return BlockGrid
    raise AttributeError(f"module 'mpicellpose' has no attribute {name!r}")
