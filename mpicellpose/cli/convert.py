"""``mpicellpose convert``: copy any supported input into a (OME-)zarr array, block by block
(the conversion itself is :func:`mpicellpose.volumes.convert.convert`)."""
from __future__ import annotations

import argparse

from ..volumes import convert as cv
from .common import run_and_report


def register(sub) -> None:
    """Add the ``convert`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "convert", help="copy a TIFF / HDF5 / tile folder / zarr input into a chunked (OME-)zarr array",
        description="Convert INPUT (TIFF file or stack, glob of TIFF tiles or slices, HDF5 file.h5:/dataset, zarr or "
                    "OME-Zarr) into a chunked zarr array OUTPUT, block by block without loading the volume, in "
                    "parallel when launched with mpirun/srun. --ome writes an OME-Zarr image (NGFF 0.4 with "
                    "--zarr-format 2, 0.5 with 3) that viewers (napari, Fiji/MoBIE, neuroglancer) open with its "
                    "voxel size.",
    )
    p.add_argument("input", help="input: file.tif, 'tiles/*.tif', file.h5:/dataset, in.zarr, image.ome.zarr")
    p.add_argument("output", help="zarr array (or, with --ome, OME-Zarr group) to create")
    p.add_argument("--chunks", default=str(cv.DEFAULT_CHUNK), metavar="N|Z,Y,X",
                   help=f"chunk size per spatial axis (default {cv.DEFAULT_CHUNK}; channels stay in one chunk)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=2, help="on-disk zarr format (default 2)")
    p.add_argument("--ome", action="store_true", help="write an OME-Zarr image (OUTPUT/0 + multiscales metadata)")
    p.add_argument("--voxel-size", default=None, metavar="Z,Y,X",
                   help="physical voxel size per spatial axis (default: from the input's metadata, else 1)")
    p.add_argument("--unit", default=None, help="unit of --voxel-size, e.g. micrometer (default: the input's)")
    p.add_argument("--dataset", default=None, help="array inside a zarr group or HDF5 file")
    p.add_argument("--level", default="0", help="OME-Zarr input: resolution level (index or path, default 0)")
    p.add_argument("--channel", default=None, help="keep only this channel (index, or OME channel label)")
    p.add_argument("--timepoint", type=int, default=None, help="time point of a time series")
    p.add_argument("--axes", default=None, metavar="NAMES",
                   help="axis names of an input that has none, e.g. czyx (default: last axes z,y,x)")
    p.add_argument("--tile-pattern", default=None, metavar="REGEX",
                   help=r"regular expression for tile indices in TIFF names (default '_(Z)(\d+)(Y)(\d+)(X)(\d+)')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(func=main)


def _axes_arg(text):
    if text is None:
        return None
    t = str(text).strip()
    names = [a.strip() for a in t.split(",")] if "," in t else list(t)
    return tuple(a.lower() for a in names if a)


def _channel_arg(text):
    if text is None:
        return None
    t = str(text).strip()
    return int(t) if t.lstrip("-").isdigit() else t


def _level_arg(text):
    t = str(text).strip()
    return int(t) if t.lstrip("-").isdigit() else t


def main(args: argparse.Namespace) -> int:
    """Entry point of ``mpicellpose convert``; returns the exit code."""
    def make_config():
        return dict(
            source=args.input, output=args.output, chunks=cv.parse_triple(args.chunks, "--chunks", int),
            zarr_format=args.zarr_format, as_ome=args.ome,
            voxel_size=cv.parse_triple(args.voxel_size, "--voxel-size"), unit=args.unit, dataset=args.dataset,
            level=_level_arg(args.level), channel=_channel_arg(args.channel), timepoint=args.timepoint,
            axes=_axes_arg(args.axes), tile_pattern=args.tile_pattern, overwrite=args.overwrite,
        )

    def runner(kwargs, comm):
        result = cv.convert(comm=comm, **kwargs)
        if comm.Get_rank() == 0:
            cv.log.info("wrote %s: shape %s, dtype %s, axes %s, chunks %s", result.path, result.shape, result.dtype,
                        "".join(result.axes), result.chunks)
        return result

    return run_and_report(make_config, args, runner)
