"""One rank's backend raises: every rank must get the error, nobody hangs."""
import sys

import numpy as np
from mpi4py import MPI

from segmenters import FailOnMarker

from mpicellpose import distributed_eval

comm = MPI.COMM_WORLD
img = np.zeros((48, 48), np.uint8)
img[1:3, 7:9] = 77  # in block (0, 1) of the 8x6-voxel grid: the first of rank 1 at 3 ranks (dynamic hand-out)
seg = FailOnMarker(77, sleep=0.25)
seen = []
orig = seg.segment


def counting(image, ndim):
    seen.append(1)
    return orig(image, ndim)


seg.segment = counting
# one report file per rank (stdout of several ranks interleaves)
report = open(f"{sys.argv[1]}/rank-{comm.Get_rank()}.txt", "w")
try:
    distributed_eval(img, (8, 6), sys.argv[1] + "/f.zarr", backend=seg, comm=comm)
    report.write(f"rank {comm.Get_rank()} finished without error\n")
    report.close()
    sys.exit(1)
except Exception as exc:
    msg = str(exc).replace("\n", " ")
    report.write(f"caught on rank {comm.Get_rank()}: {type(exc).__name__}: {msg}\n")
report.write(f"rank {comm.Get_rank()} blocks done {len(seen)}\n")
report.close()
