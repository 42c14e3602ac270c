"""``mpicellpose preview``: a PNG of a label volume's mid-planes with outlines (the rendering
is :mod:`mpicellpose.tools.preview`)."""
from __future__ import annotations

import sys

from ..tools import preview


def register(sub) -> None:
    p = sub.add_parser("preview", help="write a PNG preview of a label volume (mid-planes with outlines)",
                       description="Write orthogonal mid-planes with label outlines (over the image when given) "
                                   "and a max projection, with block faces drawn, to check seams by eye. The "
                                   "title gives the object count, the block grid and the voxel size.",
                       epilog="example: mpicellpose preview labels.zarr --image stack.tif")
    p.add_argument("labels", metavar="LABELS",
                   help="label volume: the OUTPUT of segment (zarr array, or an OME-Zarr label image such as "
                        "image.ome.zarr/labels/nuclei), or labels in any input format segment reads (TIFF, "
                        "HDF5 file.h5:/dataset, ...)")
    p.add_argument("--image", default=None, metavar="INPUT",
                   help="the segmented image, shown in grey under the outlines; any input segment reads (zarr, "
                        "OME-Zarr, HDF5 file.h5:/dataset, TIFF, a glob of TIFF tiles)")
    p.add_argument("--dataset", default=None, metavar="NAME", help="array inside an --image zarr group or HDF5 file")
    p.add_argument("--level", default=None, metavar="N|PATH",
                   help="OME-Zarr resolution level of --image and of an OME-Zarr LABELS (default 0)")
    p.add_argument("--channel", default=None, metavar="N|NAME",
                   help="channel of --image to show (default: the first one)")
    p.add_argument("--timepoint", type=int, default=None, metavar="T", help="time point of --image")
    p.add_argument("--tile-pattern", default=None, metavar="REGEX",
                   help="grid position of TIFF tiles in --image file names (as for segment)")
    p.add_argument("--out", default=None, metavar="PNG",
                   help="PNG path (default: next to LABELS, its extension replaced by .preview.png)")
    p.add_argument("--blocksize", default=None, metavar="N|Z,Y,X",
                   help="draw block faces every N|Z,Y,X voxels (default: the blocks of the run that wrote LABELS, "
                        "else the label chunks)")
    p.set_defaults(func=main)


def main(args) -> int:
    try:
        out = preview.render_preview(args.labels, args.out, image=args.image, dataset=args.dataset,
                                     level=args.level, channel=args.channel, timepoint=args.timepoint,
                                     tile_pattern=args.tile_pattern, blocksize=args.blocksize)
    except Exception as exc:
        sys.stderr.write(f"mpicellpose: error: {exc}\n")
        return 1
    sys.stdout.write(f"preview written to {out}\n")
    return 0
