"""Object-table scale check: millions of one-voxel objects through the threshold backend.

``python benchmarks/table_scale.py [EDGE]`` builds an EDGE^3 volume with an isolated voxel every
2 voxels along each axis ((EDGE/2)^3 objects), segments it with 64^3 blocks, and prints the time
per phase (the table phase is the one that grows with the object count).
"""
import json
import sys
import tempfile
import time

import numpy as np

from mpicellpose import distributed_eval
from mpicellpose.volumes.storage import numpy_array_to_zarr

edge = int(sys.argv[1]) if len(sys.argv) > 1 else 256
img = np.zeros((edge,) * 3, np.uint8)
img[::2, ::2, ::2] = 200
d = tempfile.mkdtemp()
numpy_array_to_zarr(f"{d}/in.zarr", img, 64)
t = time.time()
from mpicellpose.runner.driver import run
from mpicellpose.config import RunConfig

res = run(RunConfig(input=f"{d}/in.zarr", output=f"{d}/out.zarr", blocksize=64, backend="threshold",
                    backend_kwargs={"threshold": 100}))
print(json.dumps({"edge": edge, "objects": res.n_objects, "wall_s": round(time.time() - t, 2),
                  "timings": res.timings}, indent=1))
