"""``mpicellpose segment``: the main job."""
from __future__ import annotations

import argparse
import sys

from ..errors import MpiCellposeError
from ..options import add_options
from .common import (_group, add_input_output, add_run_arguments, cli_message, config_from_args, exit_code,
                     run_and_report)

SEGMENT_EPILOG = """\
examples:
  # 8 ranks (one GPU each, if any), Cellpose's cyto3 on a TIFF stack
  mpirun -n 8 python -m mpi4py -m mpicellpose segment stack.tif labels.zarr \\
      --model cyto3 --diameter 30 --blocksize 256
  # labels written inside an OME-Zarr image as labels/nuclei, shipped model
  mpirun -n 4 python -m mpi4py -m mpicellpose segment embryo.ome.zarr \\
      --labels-name nuclei --model demo
  # a cytoplasm model with a nuclear channel: C,Z,Y,X zarr, cytoplasm in channel 1, nuclei in 0
  mpirun -n 4 python -m mpi4py -m mpicellpose segment cells.zarr labels.zarr \\
      --channel-axis 0 --channel 1,0 --model cyto3 --diameter 30
  # connected components of a probability map stored in HDF5
  mpicellpose segment probs.h5:/predictions labels.zarr \\
      --backend threshold --threshold 0.5
  # check grid, memory per rank and sizes first (writes nothing, no GPU)
  mpicellpose plan stack.tif labels.zarr --blocksize 256 --ranks 8

After a crash or the walltime, run the same command again: finished blocks are
kept. Exit codes: 0 done, 1 error, 2 usage, 3 stopped by a signal (resumable).
"""



def register(sub) -> None:
    p = sub.add_parser(
        "segment", help="segment a volume block by block and stitch it (the main job)",
        description="Segment INPUT block by block on every MPI rank, stitch the objects cut by block\n"
                    "faces and write one label volume with IDs 1..N to OUTPUT, plus an object table\n"
                    "(OUTPUT stem + .objects.csv). Launch with mpirun/srun for several ranks; re-run\n"
                    "the same command to resume.",
        epilog=SEGMENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_output(p, "zarr array to create with the labels (may be left out for an OME-Zarr input); "
                        "the object table goes next to it")
    add_run_arguments(p)
    add_options(p, _group, where="check")  # --check and its thresholds (mpicellpose check)
    p.set_defaults(func=main)


def main(args) -> int:
    if getattr(args, "print_config", False):
        from ..config import to_toml

        try:
            sys.stdout.write(to_toml(config_from_args(args)))
        except (MpiCellposeError, ValueError) as exc:
            sys.stderr.write(f"mpicellpose: error: {cli_message(exc, args)}\n")
            return exit_code(exc)
        return 0
    if getattr(args, "check", False):  # the seam check first; a failing check stops here
        from .check import run_check_command

        rc = run_check_command(args, gate=True)
        if rc:
            return rc
    return run_and_report(lambda: config_from_args(args), args)
