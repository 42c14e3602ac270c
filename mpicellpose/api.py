"""The reference's public calls, kept by name and meaning, on top of :mod:`mpicellpose.runner.driver`."""
from __future__ import annotations

import contextlib
import logging
import sys

import numpy as np

from . import comm as mpi
from .config import RunConfig
from .errors import ConfigError
from .runner import driver
from .runner.oneblock import block_for_crop, segment_one_block  # noqa: F401 - block_for_crop: public here too
from .runner.runlog import RankFormatter

log = logging.getLogger(__name__)


def distributed_eval(input_zarr, blocksize, write_path, mask=None, preprocessing_steps=(), model_kwargs=None,
                     eval_kwargs=None, *, comm=None, overlap=None, backend="cellpose", backend_kwargs=None,
                     stitch=None, progress=None, **options):
    """Segment a large volume block by block on every rank of ``comm`` and stitch it.

    Parameters
    ----------
    input_zarr : zarr array, array-like or path
        The volume: spatial axes (2D or 3D), optionally with a channel axis (give
        ``channel_axis=`` or ``eval_kwargs['channel_axis']``).
    blocksize : int or tuple of int
        Block (= output chunk) size per spatial axis.
    write_path : str
        Path of the zarr array to create with the labels.
    mask : array-like or path, optional
        Foreground mask at the same or a lower resolution; blocks without foreground are
        skipped (they stay 0).
    preprocessing_steps : sequence of (function, kwargs)
        Each called as ``function(image, crop=crop, **kwargs)`` on every block.
    model_kwargs, eval_kwargs : dict, optional
        For ``CellposeModel(**model_kwargs).eval(block, **eval_kwargs)``.  Not modified.
    comm : mpi4py communicator, optional
        COMM_WORLD when None.  It is duplicated, never finalized; only its ranks take part.
    overlap : int or tuple, optional
        Voxels added per side of each block (default 2 x diameter for Cellpose).
    backend : {'cellpose', 'threshold'}
    backend_kwargs : dict, optional
        ``{'threshold': t, 'connectivity': 1}`` for the threshold backend.
    stitch : {'iou', 'touch'}, optional
        Default 'iou' for Cellpose, 'touch' for threshold.
    progress : bool, optional
        Rank 0's lines about the run (what it reads, the model, the flow and mask steps' progress
        with an ETA every few seconds, the summary) on stderr, as the command line shows them.
        None (default): shown unless the program has set up logging itself (a handler on the root
        or the ``mpicellpose`` logger: then they go there, at INFO); True: always; False: never.
    **options
        Any other :class:`~mpicellpose.config.RunConfig` field (``overwrite``,
        ``work_dir``, ``keep_work``, ``restart``, ``iou_threshold``, ``device``, ...).
        ``temporary_directory`` (the reference's name) is accepted as ``work_dir``;
        the reference's ``cluster`` and ``cluster_kwargs`` are accepted and set nothing: the
        run uses the ranks of ``comm`` (one line says so, and how to get more: ``mpirun -n N``).

    Returns
    -------
    labels : zarr array
        Labels 1..N (uint32, or uint64 beyond 2**32 - 1 objects), same on every rank.
    boxes : sequence
        ``boxes[k]`` is the tuple of slices bounding label ``k + 1``.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> img = np.zeros((40, 40), np.uint8); img[5:15, 5:30] = 1; img[25:35, 18:22] = 1
    >>> labels, boxes = distributed_eval(img, 16, os.path.join(d, "lab.zarr"), backend="threshold",
    ...                                  backend_kwargs={"threshold": 0})
    >>> int(labels[...].max()), boxes[0]
    (2, (slice(5, 15, None), slice(5, 30, None)))
    """
    dask_cluster_options(options.pop("cluster", None), options.pop("cluster_kwargs", None), comm)
    if "temporary_directory" in options:
        options.setdefault("work_dir", options.pop("temporary_directory"))
    cfg = RunConfig(input=input_zarr, output=str(write_path), blocksize=blocksize, overlap=overlap, mask=mask,
                    preprocessing_steps=tuple(preprocessing_steps or ()), backend=backend,
                    model_kwargs=dict(model_kwargs or {}), eval_kwargs=dict(eval_kwargs or {}),
                    backend_kwargs=dict(backend_kwargs or {}), stitch=stitch, **options)
    with show_progress(progress, comm):
        res = driver.run(cfg, comm)
    return res.labels, res.boxes




@contextlib.contextmanager
def show_progress(progress, comm):
    """While inside, rank 0 of ``comm`` (the world when None) logs the run's INFO lines to stderr
    (``progress``: see :func:`distributed_eval`); the other ranks their warnings, as the command
    line does.  Nothing is left behind: the handler and the logger's level are removed after."""
    lg = logging.getLogger("mpicellpose")
    configured = bool(lg.handlers or logging.getLogger().handlers)
    if progress is False or (progress is None and configured):
        yield
        return
    rank = (comm if comm is not None else mpi.world()).Get_rank()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handler.setFormatter(RankFormatter(rank))
    level = lg.level
    if lg.getEffectiveLevel() > logging.INFO:
        lg.setLevel(logging.INFO)
    lg.addHandler(handler)
    propagate = lg.propagate
    lg.propagate = False   # not twice through the root's last-resort handler
    try:
        yield
    finally:
        lg.removeHandler(handler)
        lg.setLevel(level)
        lg.propagate = propagate


def dask_cluster_options(cluster, cluster_kwargs, comm) -> None:
    """The reference's Dask cluster arguments: nothing to set up under MPI.  Rank 0 says once what
    they would have meant and how to get workers here; the run goes on with the ranks there are."""
    if cluster is None and not cluster_kwargs:
        return
    if cluster_kwargs is not None and not isinstance(cluster_kwargs, dict):
        raise ConfigError(f"cluster_kwargs must be a dict (the reference's Dask cluster settings), got "
                          f"{type(cluster_kwargs).__name__}")
    world = comm if comm is not None else mpi.world()
    if world.Get_rank() != 0:
        return
    given = ", ".join(sorted(cluster_kwargs or {})) or "none"
    log.warning("cluster%s: mpicellpose needs no Dask cluster; these settings (%s) are ignored and the run uses "
                "the %d MPI rank(s) it was started on. For more workers start it as 'mpirun -n N python "
                "script.py' (one rank per GPU on a GPU node; 'mpicellpose batch-script' writes LSF/SLURM "
                "scripts); per-worker threads are --threads / threads=, logs --log-dir.",
                "=" + type(cluster).__name__ + " and cluster_kwargs" if cluster is not None else "_kwargs", given,
                world.Get_size())


def process_block(block_index, crop, input_zarr, model_kwargs, eval_kwargs, blocksize, overlap, output_zarr=None,
                  preprocessing_steps=(), worker_logs_directory=None, test_mode=False, *, backend="cellpose",
                  backend_kwargs=None, channel_axis=None, segmenter=None, device=None, threads=None, exact=False,
                  **options):
    """Segment one block as the full run does; try parameters before a big job.

    The defaults are resolved by the same code as a run's (overlap from the diameter and the
    anisotropy, the shipped model's diameter, voxel sizes of an OME-Zarr input), the block
    goes through the same code path, and with global normalisation (the default) the same
    sample of the volume gives the same bounds: the core's labels equal the run's.

    Parameters
    ----------
    block_index : tuple of int
        Position of the block in the grid.
    crop : tuple of slice or None
        The region to read and segment.  None, or a block's read region, gives that block's
        labels in the full run (``block_index`` then names the block; in test mode it may be a
        dummy, the block is found from ``crop``): exactly under ``--pipeline blocks``; under
        ``--pipeline flows`` (the run builds masks per flow box of several blocks) the block is
        computed alone, at one block's cost, and agrees with the run but near its edges, unless
        ``exact=True``.  Any other region (e.g. a crop
        around any point of the volume, as the reference's documentation builds it) is
        segmented on its own with the run's settings (global normalisation, diameter,
        model; under ``--pipeline flows`` with whole-region Cellpose, one block's cost), and
        its core is returned: the crop less ``overlap`` on every side that is not at the
        volume's start, at most ``blocksize`` long.
    input_zarr, model_kwargs, eval_kwargs, blocksize, overlap, preprocessing_steps
        As for :func:`distributed_eval`.
    output_zarr : zarr array, optional
        Where the core's block-local labels are written (not in test mode).
    test_mode : bool
        Return ``(labels, boxes, box_ids)`` and write nothing: labels of the block's
        core numbered 1..n (the same numbering the full run keeps before global
        renumbering), boxes in global coordinates, and the IDs 1..n.
    segmenter : Segmenter, optional
        A backend built earlier (reuse the loaded model across calls).
    device, threads : optional
        As for :func:`distributed_eval` (torch device, CPU threads).
    exact : bool
        Under ``--pipeline flows``, for a grid block: compute it exactly as the run does (its flow box
        and the neighbouring boxes its mask region reaches: the cost of those boxes, not of one block).
    **options
        Any other :class:`~mpicellpose.config.RunConfig` field that changes the labels
        (``normalize``, ``mask``, ``voxel_size``, ``stitch``, ``iou_depth``, ...).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((20, 20), np.uint8); img[2:6, 2:6] = 1
    >>> lab, boxes, ids = process_block((0, 0), None, img, {}, {}, 10, 0, test_mode=True,
    ...                                 backend="threshold", backend_kwargs={"threshold": 0})
    >>> lab.shape, boxes, ids.tolist()
    ((10, 10), [(slice(2, 6, None), slice(2, 6, None))], [1])
    """
    cfg = RunConfig(input=input_zarr, output=None, blocksize=blocksize, overlap=overlap,
                    preprocessing_steps=tuple(preprocessing_steps or ()), backend=backend,
                    model_kwargs=dict(model_kwargs or {}), eval_kwargs=dict(eval_kwargs or {}),
                    backend_kwargs=dict(backend_kwargs or {}), channel_axis=channel_axis, device=device,
                    threads=threads, **options)
    one = segment_one_block(cfg, block_index, crop, segmenter, exact=exact)
    if test_mode:
        return one.labels, one.boxes, one.ids
    if output_zarr is None:
        raise ConfigError("process_block needs output_zarr unless test_mode=True")
    output_zarr[one.block.core_slices] = one.labels
    return one.boxes, one.ids
