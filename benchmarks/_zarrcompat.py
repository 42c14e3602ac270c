"""Create/open zarr arrays in the v2 *format* with either zarr-python 2.x or 3.x.

The reference needs zarr-python 2 (it breaks on 3) while the project uses 3; arrays
written in format 2 by either library are read by both, so every benchmark input
and output goes through these two helpers.
"""
from __future__ import annotations

import zarr

ZARR_MAJOR = int(zarr.__version__.split(".")[0])


def create_v2(path, shape, chunks, dtype, fill_value=0, attrs=None):
    """A new (overwritten) zarr array in format 2 at ``path``, Zstd-compressed."""
    shape, chunks = tuple(int(s) for s in shape), tuple(int(c) for c in chunks)
    if ZARR_MAJOR >= 3:
        import numcodecs
        arr = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=dtype,
                                fill_value=fill_value, zarr_format=2,
                                compressors=numcodecs.Zstd(level=3), overwrite=True)
    else:
        import numcodecs
        arr = zarr.open(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype,
                        fill_value=fill_value, compressor=numcodecs.Zstd(level=3))
    if attrs:
        arr.attrs.update(attrs)
    return arr


def open_array(path, mode="r"):
    """Open an existing zarr array (any format the installed library reads)."""
    return zarr.open(str(path), mode=mode)
