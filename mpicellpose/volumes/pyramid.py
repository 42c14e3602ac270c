"""Label pyramids: lower resolution levels of an NGFF label image, written by all ranks.

:func:`downsample_labels` is the pure per-block step; :func:`build_pyramid` splits each
level's output chunks over the ranks (contiguous runs, see
:func:`mpicellpose.grid.partition.contiguous_bounds`) and rewrites the group's
``multiscales`` at the end; :func:`mirror_levels` reads the levels of an OME-Zarr image
that a label pyramid must match.

Only :mod:`mpicellpose.comm` talks MPI; this module receives a communicator and uses
its rank/size, and the collective agreement of :class:`mpicellpose.comm.Mailbox`
between pyramid levels.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from .. import comm as mpi
from ..errors import InputError
from ..grid import geometry as geo
from ..grid.partition import contiguous_bounds
from .ngff import (DOWNSAMPLE_FUNCTION, LABEL_METHODS, NGFF_FOR_FORMAT, array_options, axes_of, level_transform,
                   ome_metadata, per_axis_factor, pick_level, transforms_of)
from .ngff_io import open_group_for_write, update_ome_attrs
from .storage import array_format, create_array, node_attrs, open_array, zarr_module
from .volume import default_axes

log = logging.getLogger(__name__)


def downsample_labels(block, factor=2, method: str = "mode") -> np.ndarray:
    """Downsample a label block by an integer factor per axis (pure).

    ``"mode"``: each output voxel is the most frequent non-zero label of its cell of
    ``factor`` voxels per axis (ties go to the smallest label; 0 only when the whole
    cell is background).  ``"nearest"``: the first voxel of each cell (stride
    sampling).  Cells cut by the block's far edge use the voxels present, so the
    output shape is ``ceil(shape / factor)``.

    Examples
    --------
    >>> b = np.array([[1, 2, 0, 0],
    ...               [2, 1, 0, 3]], np.uint32)
    >>> downsample_labels(b, 2).tolist()  # 1 and 2 tie: the smaller wins
    [[1, 3]]
    >>> downsample_labels(b, 2, "nearest").tolist()
    [[1, 0]]
    >>> downsample_labels(np.array([[5, 5, 7]]), (1, 2)).tolist()
    [[5, 7]]
    """
    block = np.asarray(block)
    f = per_axis_factor(factor, block.ndim)
    if method not in LABEL_METHODS:
        raise InputError(f"method must be one of {LABEL_METHODS}, got {method!r}")
    if method == "nearest" or all(x == 1 for x in f):
        return np.ascontiguousarray(block[tuple(slice(None, None, x) for x in f)])
    out_shape = tuple(-(-s // x) for s, x in zip(block.shape, f))
    padded_shape = tuple(o * x for o, x in zip(out_shape, f))
    if padded_shape != block.shape:
        padded = np.zeros(padded_shape, block.dtype)
        padded[tuple(slice(0, s) for s in block.shape)] = block
    else:
        padded = block
    # (o0, f0, o1, f1, ...) -> (o0, o1, ..., f0 * f1 * ...)
    inter = []
    for o, x in zip(out_shape, f):
        inter += [o, x]
    cells = padded.reshape(inter)
    nd = block.ndim
    cells = cells.transpose(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    k = int(np.prod(f))
    cells = np.sort(cells.reshape(-1, k), axis=1)
    counts = np.zeros(cells.shape, np.int32)
    for j in range(k):
        counts[:, j] = np.count_nonzero(cells == cells[:, j:j + 1], axis=1)
    counts[cells == 0] = 0
    # rows are sorted ascending: the first maximum is the smallest label with that count
    pick = np.argmax(counts, axis=1)
    out = cells[np.arange(cells.shape[0]), pick]
    return out.reshape(out_shape).astype(block.dtype, copy=False)


def pyramid_shapes(shape, n_levels: int, factor=2) -> list:
    """Shapes of levels 0..n_levels (level 0 first).

    Examples
    --------
    >>> pyramid_shapes((5, 9, 9), 2)
    [(5, 9, 9), (3, 5, 5), (2, 3, 3)]
    """
    f = per_axis_factor(factor, len(shape))
    out = [tuple(int(s) for s in shape)]
    for _ in range(int(n_levels)):
        out.append(tuple(-(-s // x) for s, x in zip(out[-1], f)))
    return out


def mirror_levels(image_group, level=0, axes=None) -> dict:
    """How to build a label pyramid that matches an OME-Zarr image's own levels.

    NGFF asks a label image in ``<image>/labels`` to have as many levels as the image.
    For the image levels after ``level`` (the one that was segmented), this returns
    their spatial ``shapes``, the per-level integer ``factor`` (rounded ratio of
    consecutive shapes) and the image's ``transforms`` (scale, translation) restricted
    to ``axes`` (default: the image's spatial axes).

    Returns
    -------
    dict with ``n_levels``, ``factor`` (list of tuples), ``shapes`` (list of tuples),
    ``transforms`` (list of (scale, translation), level ``level`` first).

    Examples
    --------
    >>> import tempfile, os
    >>> from mpicellpose.volumes.ngff_io import write_multiscales_metadata
    >>> from mpicellpose.volumes.storage import create_array
    >>> g = os.path.join(tempfile.mkdtemp(), "img.ome.zarr")
    >>> for k, shp in enumerate([(4, 9, 11), (4, 4, 5)]):
    ...     _ = create_array(os.path.join(g, str(k)), shp, shp, np.uint8)
    >>> _ = write_multiscales_metadata(g, "zyx", (2.0, 0.5, 0.5), n_levels=2, factor=(1, 2, 2))
    >>> m = mirror_levels(g)
    >>> m["n_levels"], m["factor"], m["shapes"]
    (1, [(1, 2, 2)], [(4, 4, 5)])
    """
    group = zarr_module().open_group(str(image_group), mode="r")
    _, meta = ome_metadata(node_attrs(group))
    ms = (meta.get("multiscales") or [None])[0]
    if not isinstance(ms, dict):
        raise InputError(f"{str(image_group)!r} is not an OME-Zarr image (no 'multiscales' metadata)")
    datasets = [d for d in ms.get("datasets") or () if isinstance(d, dict) and "path" in d]
    start = pick_level(datasets, level, str(image_group))
    first = group[str(datasets[start]["path"])]
    ndim = len(first.shape)
    ax = axes_of(ms, ndim)
    names = [a["name"] for a in ax]
    if axes is None:
        keep = [i for i, a in enumerate(ax) if a.get("type") == "space"]
    else:
        missing = [a for a in axes if a not in names]
        if missing:
            raise InputError(f"axes {missing} are not axes of the image {str(image_group)!r} ({names})")
        keep = [names.index(a) for a in axes]
    shapes, factors, transforms = [], [], []
    prev = tuple(int(first.shape[i]) for i in keep)
    for k in range(start, len(datasets)):
        arr = group[str(datasets[k]["path"])]
        shp = tuple(int(arr.shape[i]) for i in keep)
        sc, tr = level_transform(ms, datasets[k], ndim)
        transforms.append(([float(sc[i]) for i in keep], [float(tr[i]) for i in keep]))
        if k > start:
            factors.append(tuple(max(1, int(round(p / max(c, 1)))) for p, c in zip(prev, shp)))
            shapes.append(shp)
        prev = shp
    return {"n_levels": len(shapes), "factor": factors, "shapes": shapes, "transforms": transforms}


def build_pyramid(group_path, n_levels=None, comm=None, factor=2, method: str = "mode", *, like=None,
                  like_level=0) -> list:
    """Write label levels ``1..n_levels`` from level ``0`` of an NGFF image group (collective).

    Every rank of ``comm`` calls it.  Level k is computed from level k-1 with
    :func:`downsample_labels`; the output chunks of a level (chunked like level 0, or
    smaller at the top) are split into contiguous runs, one per rank, so each chunk is
    written by exactly one rank; all ranks wait for each other between levels.  Rank 0
    then rewrites the group's ``multiscales`` to list every level (scale times the
    factor, translation moved to the cell centre for ``"mode"``), keeping the axes,
    level-0 scale and other metadata written before by :func:`mpicellpose.volumes.ngff_io.write_labels_metadata`.
    An error on any rank is raised on every rank.

    Parameters
    ----------
    group_path : str
        Image group holding level ``0`` and ``multiscales`` metadata.
    n_levels : int, optional
        Number of levels to add (required unless ``like`` is given).
    comm : Mailbox or communicator, optional
        The run's MPI gateway (:class:`mpicellpose.comm.Mailbox`) or a communicator;
        default: a one-rank communicator.
    factor : int, tuple of int, or list of those
        Downsampling per level and axis (``(1, 2, 2)`` keeps z); a list gives one
        factor per level.
    method : {"mode", "nearest"}
    like : str, optional
        An OME-Zarr image whose levels after ``like_level`` the labels must mirror
        (labels inside ``<image>/labels``): level shapes, factors and coordinate
        transformations are taken from it (see :func:`mirror_levels`).
    like_level : int or str
        The image level the labels were computed from.

    Returns
    -------
    list of tuple : the shape of every level, level 0 first.

    Examples
    --------
    >>> import tempfile, os
    >>> from mpicellpose.volumes.ngff_io import open_volume, write_labels_metadata
    >>> from mpicellpose.volumes.storage import create_array, open_array
    >>> g = os.path.join(tempfile.mkdtemp(), "lab.ome.zarr")
    >>> a = create_array(os.path.join(g, "0"), (4, 4), (2, 2), np.uint32)
    >>> a[...] = np.array([[1, 1, 0, 0], [1, 2, 0, 3], [0, 0, 4, 4], [0, 0, 4, 4]])
    >>> _ = write_labels_metadata(g, ("y", "x"), (0.5, 0.5))
    >>> build_pyramid(g, 2)
    [(4, 4), (2, 2), (1, 1)]
    >>> open_array(os.path.join(g, "1"))[...].tolist()
    [[1, 3], [0, 4]]
    >>> open_volume(g, level=1).voxel_size.size
    (1.0, 1.0)
    """
    if method not in LABEL_METHODS:
        raise InputError(f"method must be one of {LABEL_METHODS}, got {method!r}")
    if like is None and (isinstance(n_levels, bool) or not isinstance(n_levels, (int, np.integer))
                         or n_levels < 0):
        raise InputError(f"n_levels must be a non-negative integer, got {n_levels!r}")
    if isinstance(comm, mpi.Mailbox):  # the run's gateway: its notices and collectives stay in order
        box = comm
    else:
        box = mpi.Mailbox(mpi.SelfComm() if comm is None else comm)
    group_path = str(group_path)
    with box.step("creating the pyramid levels"):
        layout = _layout(group_path, n_levels, factor, like, like_level, box.rank)
        if box.rank == 0:
            _create_levels(group_path, layout)
    for k in range(1, layout.n_levels + 1):
        with box.step(f"writing pyramid level {k}"):
            _write_level(group_path, layout, k, method, box.rank, box.size)
    box.on_root(lambda: _rewrite_levels(group_path, layout.ms, layout.version, layout.fmt, layout.factors, method,
                                        layout.transforms), "writing the pyramid metadata")
    if box.rank == 0:
        log.info("pyramid of %s: %d level(s) %s (%s)", group_path, layout.n_levels + 1, layout.shapes, method)
    return layout.shapes


@dataclass(frozen=True)
class _Layout:
    """The levels to write: shapes (level 0 first), factors, transforms (or None), and the
    level-0 facts needed to create and describe them."""

    n_levels: int
    shapes: list
    factors: list
    transforms: list | None
    ms: dict
    version: str | None
    fmt: int
    axes: list
    chunks0: tuple
    dtype: object


def _layout(group_path, n_levels, factor, like, like_level, rank) -> _Layout:
    level0 = open_array(os.path.join(group_path, "0"))
    shape0 = tuple(int(s) for s in level0.shape)
    try:
        g = zarr_module().open_group(group_path, mode="r")
    except Exception:
        raise InputError(f"{group_path!r} is not a zarr group; call write_labels_metadata first") from None
    version, meta = ome_metadata(node_attrs(g))
    ms = (meta.get("multiscales") or [None])[0]
    if not isinstance(ms, dict):
        raise InputError(f"{group_path!r} has no 'multiscales' metadata; call write_labels_metadata first")
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes") or ()] or \
        list(default_axes(len(shape0)))
    transforms = None
    if like is not None:
        plan = mirror_levels(like, like_level, axes)
        if len(plan["transforms"][0][0]) != len(shape0):
            raise InputError(f"labels {group_path!r} and image {str(like)!r} have different axes")
        n = plan["n_levels"] if n_levels is None else min(int(n_levels), plan["n_levels"])
        if n_levels is not None and int(n_levels) != plan["n_levels"] and rank == 0:
            log.warning("image %s has %d level(s) after the segmented one; writing %d label level(s)",
                        like, plan["n_levels"], n)
        n_levels = n
        factors = plan["factor"][:n]
        shapes = [shape0] + plan["shapes"][:n]
        transforms = plan["transforms"][: n + 1]
    else:
        if isinstance(factor, list):
            if len(factor) != n_levels:
                raise InputError(f"{len(factor)} factors for {n_levels} levels")
            factors = [per_axis_factor(f, len(shape0)) for f in factor]
        else:
            factors = [per_axis_factor(factor, len(shape0))] * int(n_levels)
        shapes = [shape0]
        for f in factors:
            shapes.append(tuple(-(-s // x) for s, x in zip(shapes[-1], f)))
    return _Layout(int(n_levels), shapes, factors, transforms, ms, version, array_format(level0), axes,
                   tuple(int(c) for c in level0.chunks), level0.dtype)


def _create_levels(group_path, layout: _Layout) -> None:
    for k in range(1, layout.n_levels + 1):
        ch = tuple(min(c, s) for c, s in zip(layout.chunks0, layout.shapes[k]))
        create_array(os.path.join(group_path, str(k)), layout.shapes[k], ch, layout.dtype, zarr_format=layout.fmt,
                     overwrite=True, **array_options(layout.fmt, layout.axes))


def _write_level(group_path, layout: _Layout, k, method, rank, size) -> None:
    """This rank's contiguous run of level k's chunks, downsampled from level k-1."""
    f = layout.factors[k - 1]
    src = open_array(os.path.join(group_path, str(k - 1)))
    dst = open_array(os.path.join(group_path, str(k)), mode="r+")
    boxes = list(geo.chunk_boxes(layout.shapes[k], tuple(int(c) for c in dst.chunks)))
    for i in range(*contiguous_bounds(len(boxes), size, rank)):
        out_box = boxes[i]
        read = tuple(slice(a * x, min(b * x, s)) for (a, b), x, s in zip(out_box, f, layout.shapes[k - 1]))
        down = downsample_labels(src[read], f, method)
        want = tuple(b - a for a, b in out_box)
        if down.shape != want:  # the target level was rounded down (or up) by the image
            fitted = np.zeros(want, down.dtype)
            common = tuple(slice(0, min(d, w)) for d, w in zip(down.shape, want))
            fitted[common] = down[common]
            down = fitted
        dst[tuple(slice(a, b) for a, b in out_box)] = down


def _rewrite_levels(group_path, ms, version, fmt, factors, method, transforms=None):
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes") or ()]
    nd = len(axes)
    first = next((d for d in ms.get("datasets") or () if isinstance(d, dict) and str(d.get("path")) == "0"), None)
    scale0, origin0 = (np.ones(nd), np.zeros(nd)) if first is None else \
        transforms_of(first.get("coordinateTransformations"), nd)
    datasets = []
    cum = np.ones(nd)
    for k in range(len(factors) + 1):
        if k:
            cum = cum * np.asarray(factors[k - 1], float)
        if transforms is not None:
            sc, tr = np.asarray(transforms[k][0], float), np.asarray(transforms[k][1], float)
        else:
            sc = scale0 * cum
            tr = origin0 + (cum - 1.0) / 2.0 * scale0 if method == "mode" else origin0
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(v) for v in sc]},
            {"type": "translation", "translation": [float(v) for v in tr]},
        ]})
    entry = dict(ms)
    entry["datasets"] = datasets
    entry["metadata"] = {"method": DOWNSAMPLE_FUNCTION,
                         "kwargs": {"method": method, "factor": [list(f) for f in factors]}}
    group = open_group_for_write(group_path, fmt)
    update_ome_attrs(group, version or NGFF_FOR_FORMAT[fmt], {"multiscales": [entry]})
