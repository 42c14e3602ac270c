"""Opening inputs: every supported kind becomes a lazy :class:`mpicellpose.volumes.volume.Volume`.

Inputs of every supported kind open through :func:`open_volume_spec`: zarr arrays and
groups, OME-Zarr images (see :mod:`mpicellpose.volumes.ngff_io`), HDF5 datasets
(``file.h5:/path/to/dataset``), TIFF files and stacks, globs of TIFF tiles or slices
and (with zarr-python 2) N5.  Nothing is read until the returned array is sliced.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError, InputNotFoundError, needs
from . import ngff_io
from .storage import is_zarr_path, open_zarr_node, zarr_major, zarr_module
from .images import IMAGE_EXTENSIONS, open_image
from .tiff import _open_tiff, _open_tiff_glob
from .volume import VoxelSize, default_axes, make_volume


def open_input(source, dataset: str | None = None, what: str = "input"):
    """Open the input volume.

    ``source`` may be an array-like (zarr array, h5py dataset, numpy array or memmap:
    anything with ``shape``, ``dtype`` and slicing) or a path to a zarr array, or to a
    zarr group together with ``dataset`` (``group.zarr`` + ``"0"``, or ``group.zarr/0``).
    """
    if not isinstance(source, (str, os.PathLike)):
        for attr in ("shape", "dtype", "__getitem__"):
            if not hasattr(source, attr):
                raise InputError(
                    f"{what} must be a path or an array-like with shape, dtype and slicing; "
                    f"got {type(source).__name__} without {attr!r}"
                )
        return source
    path = str(source)
    node = open_zarr_node(path, what)
    if dataset is not None:
        try:
            node = node[dataset]
        except Exception:
            raise InputError(f"{what} group {path!r} has no dataset {dataset!r}") from None
    if not hasattr(node, "dtype"):
        keys = list(getattr(node, "array_keys", lambda: [])())
        raise InputError(
            f"{what} {path!r} is a zarr group, not an array; choose one with --dataset (arrays: {keys})"
        )
    return node


# --------------------------------------------------------------------------- open_volume_spec
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf", ".he5", ".nxs")
TIFF_EXTENSIONS = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
_HDF5_SPEC = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|he5|nxs))(?::(?P<dataset>.*))?$", re.IGNORECASE)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
def _magic(path, n=8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def parse_hdf5_spec(spec: str):
    """Split ``file.h5:/path/to/dataset`` into ``(file, dataset or None)``; None if not HDF5.

    Examples
    --------
    >>> parse_hdf5_spec("/d/vol.h5:/raw/ch0")
    ('/d/vol.h5', '/raw/ch0')
    >>> parse_hdf5_spec("vol.hdf5"), parse_hdf5_spec("vol.zarr")
    (('vol.hdf5', None), None)
    """
    m = _HDF5_SPEC.match(str(spec))
    if m is None:
        return None
    return m.group("file"), (m.group("dataset") or None)


def input_kind(spec) -> str:
    """What :func:`open_volume_spec` would treat ``spec`` as (no data is read).

    One of ``"array"`` (an in-memory array-like), ``"ome-zarr"``, ``"zarr"``,
    ``"hdf5"``, ``"tiff"``, ``"tiff-glob"``, ``"tiff-folder"``, ``"n5"``, ``"image"`` (PNG, JPEG, ...).

    Examples
    --------
    >>> import numpy as np
    >>> input_kind(np.zeros(3)), input_kind("scan.h5:/data"), input_kind("tiles/*.tif")
    ('array', 'hdf5', 'tiff-glob')
    """
    if not isinstance(spec, (str, os.PathLike)):
        return "array"
    s = str(spec)
    h5 = parse_hdf5_spec(s)
    if h5 is not None and not os.path.isdir(h5[0]):
        return "hdf5"
    if not os.path.exists(s) and any(ch in s for ch in "*?["):
        return "tiff-glob"
    p = Path(s)
    if p.is_dir():
        if (p / "attributes.json").exists() and not is_zarr_path(p):
            return "n5"
        if s.rstrip("/").lower().endswith(".n5"):
            return "n5"
        if is_zarr_path(p) or s.rstrip("/").lower().endswith(".zarr"):
            return "ome-zarr" if ngff_io.is_ome_zarr(s) else "zarr"
        if any(f.suffix.lower() in TIFF_EXTENSIONS for f in p.iterdir()):
            return "tiff-folder"
        return "unknown"
    if s.lower().endswith(TIFF_EXTENSIONS):
        return "tiff"
    if s.lower().endswith(IMAGE_EXTENSIONS):
        return "image"
    head = _magic(s)
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")):
        return "image"
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    return "unknown"


def open_volume_spec(spec, dataset: str | None = None, **ome_options):
    """Open any supported input lazily; return a :class:`mpicellpose.volumes.volume.Volume`.

    Parameters
    ----------
    spec : str, Path or array-like
        * a zarr array, a zarr group (with ``dataset``), an OME-Zarr image group
          (NGFF 0.4 / 0.5) or one of its levels;
        * ``file.h5:/path/to/dataset`` (or ``file.h5`` with ``dataset``, or a file
          holding a single dataset): an HDF5 dataset, kept open read-only;
        * ``file.tif`` (also OME-TIFF / ImageJ hyperstacks, multi-page stacks as z);
        * a 2D picture (PNG, JPEG, BMP, GIF, WebP; colour channels as a channel axis, see
          :mod:`mpicellpose.volumes.images`);
        * a glob such as ``"tiles/*.tif"``: tiles named ``..._Z0Y1X2.tif`` are placed on
          their grid (see :func:`mpicellpose.volumes.tiff.wrap_folder_of_tiffs`), other names are stacked in name
          order as z slices; a folder of TIFF files is read like ``folder/*.tif``;
        * an N5 container (only with zarr-python 2, which still reads N5);
        * an array-like (numpy, zarr, h5py ...), wrapped as is.
    dataset : str, optional
        Array inside a zarr group or HDF5 file.
    **ome_options
        ``level``, ``channel``, ``timepoint`` (see :func:`mpicellpose.volumes.ngff_io.open_volume`;
        ``channel`` may also be a list, e.g. ``[1, 0]`` for cytoplasm 1 and nucleus 0, kept as a
        channel axis in that order, see :func:`mpicellpose.volumes.channels.select_channels`),
        ``axes`` (names for an array without any) and ``tile_pattern`` (regular
        expression for TIFF tile indices).

    Returns
    -------
    Volume
        ``array`` reads only what is sliced; ``axes``, ``channel_axis`` and
        ``voxel_size`` (None when the file does not say) describe it.

    Raises
    ------
    InputNotFoundError
        The path does not exist / the glob matches nothing.
    InputError
        Unknown format, missing dataset (the message lists what exists), bad level /
        channel / time point.

    Examples
    --------
    >>> import tempfile, os, h5py
    >>> import numpy as np
    >>> f = os.path.join(tempfile.mkdtemp(), "vol.h5")
    >>> with h5py.File(f, "w") as h:
    ...     _ = h.create_dataset("raw/ch0", data=np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    >>> with open_volume_spec(f + ":/raw/ch0") as vol:
    ...     print(vol.kind, vol.shape, vol.axes, int(vol.array[1, 2, 3]))
    hdf5 (2, 3, 4) ('z', 'y', 'x') 23
    """
    allowed = {"level", "channel", "timepoint", "axes", "tile_pattern"}
    unknown = sorted(set(ome_options) - allowed)
    if unknown:
        raise InputError(f"unknown input option(s) {unknown}; valid: {sorted(allowed)}")
    level = ome_options.get("level", 0)
    channel = ome_options.get("channel")
    if isinstance(channel, (list, tuple)):  # several channels, or one kept as a channel axis: lazily chosen
        from .channels import select_channels

        vol = open_volume_spec(spec, dataset, **dict(ome_options, channel=None))
        return select_channels(vol, channel, getattr(channel, "axis", None))
    timepoint = ome_options.get("timepoint")
    axes = ome_options.get("axes")
    sel = {"channel": channel, "timepoint": timepoint}
    kind = input_kind(spec)
    if kind == "array":
        for attr in ("shape", "dtype", "__getitem__"):
            if not hasattr(spec, attr):
                raise InputError(f"input must be a path or an array-like with shape, dtype and slicing; "
                                 f"got {type(spec).__name__} without {attr!r}")
        return make_volume(spec, axes, **sel, kind="array")
    s = str(spec)
    if kind == "hdf5":
        return _open_hdf5(s, dataset, axes, sel)
    if kind in ("tiff-glob", "tiff-folder"):
        pattern = os.path.join(s, "*.tif*") if kind == "tiff-folder" else s
        return _open_tiff_glob(pattern, ome_options.get("tile_pattern"), axes, sel)
    if not os.path.exists(s):
        raise InputNotFoundError(f"input {s!r} does not exist")
    if kind == "tiff":
        if dataset is not None:
            raise InputError(f"dataset={dataset!r} does not apply to the TIFF file {s!r}")
        return _open_tiff(s, axes, sel)
    if kind == "n5":
        return _open_n5(s, dataset, axes, sel)
    if kind == "image":
        if dataset is not None:
            raise InputError(f"dataset={dataset!r} does not apply to the image file {s!r}")
        return open_image(s, axes, sel)
    if kind in ("zarr", "ome-zarr"):
        vol = ngff_io.open_volume(s, level, channel, timepoint, dataset=dataset)
        if axes is not None and not vol.is_ome:
            vol = make_volume(vol.array, axes, **sel, zarr_format=vol.zarr_format, kind="zarr", source=s)
        return vol
    raise InputError(
        f"cannot tell what kind of input {s!r} is: expected a zarr / OME-Zarr directory, an HDF5 file "
        f"({', '.join(HDF5_EXTENSIONS)}; written file.h5:/dataset), a TIFF file ({', '.join(TIFF_EXTENSIONS)}), "
        f"a glob of TIFF files ('tiles/*.tif'), an N5 container (.n5) or a 2D picture "
        f"({', '.join(IMAGE_EXTENSIONS)})"
    )


def _hdf5_datasets(h5file, limit=50) -> list:
    found = []

    def visit(name, obj):
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            found.append("/" + name + f" {tuple(obj.shape)} {obj.dtype}")
        return None if len(found) < limit else True

    h5file.visititems(visit)
    return found


def _open_hdf5(spec, dataset, axes, sel):
    try:
        import h5py
    except ImportError:
        raise needs("h5py", "all") from None
    path, ds_name = parse_hdf5_spec(spec) or (spec, None)
    if ds_name and dataset and ds_name.strip("/") != str(dataset).strip("/"):
        raise InputError(f"input {spec!r} names dataset {ds_name!r} but dataset={dataset!r} was also given")
    ds_name = ds_name or dataset
    if not os.path.exists(path):
        raise InputNotFoundError(f"input {path!r} does not exist")
    try:  # read-only, without HDF5 file locks (they fail on some parallel file systems)
        f = h5py.File(path, "r", locking=False)
    except TypeError:  # h5py < 3.5
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"input {path!r} is not a readable HDF5 file: {exc}") from None
    try:
        if ds_name is None:
            found = _hdf5_datasets(f)
            if len(found) != 1:
                raise InputError(f"HDF5 file {path!r} holds {len(found) or 'no'} datasets; name one as "
                                 f"{path}:/path/to/dataset (or --dataset): {found}")
            ds_name = found[0].split(" ")[0]
        if ds_name not in f:
            raise InputError(f"HDF5 file {path!r} has no dataset {ds_name!r}; datasets: {_hdf5_datasets(f)}")
        ds = f[ds_name]
        if not hasattr(ds, "dtype"):
            raise InputError(f"{ds_name!r} in HDF5 file {path!r} is a group, not a dataset; datasets: "
                             f"{_hdf5_datasets(ds)}")
        if axes is None:
            labels = [str(d.label) for d in ds.dims]
            if all(labels) and len(set(labels)) == len(labels):
                axes = tuple(_axis_name(a, i, labels) for i, a in enumerate(labels))
        voxel = None
        el = ds.attrs.get("element_size_um")
        names = axes or default_axes(ds.ndim)
        spatial = [a for a in names if a not in ("c", "t")]
        if el is not None and len(el) == len(spatial) and len(spatial) in (2, 3):
            try:
                voxel = VoxelSize(tuple(spatial), tuple(float(v) for v in el), ("micrometer",) * len(spatial))
            except InputError:
                voxel = None
        vol = make_volume(ds, axes, **sel, voxel_size=voxel, kind="hdf5", source=f"{path}:{ds.name}",
                          handle=f)
    except BaseException:
        f.close()
        raise
    return vol


def _axis_name(label, i, labels) -> str:
    m = {"z": "z", "y": "y", "x": "x", "c": "c", "t": "t", "channel": "c", "channels": "c", "time": "t"}
    return m.get(str(label).strip().lower(), str(label))


def _open_n5(path, dataset, axes, sel):
    if zarr_major() >= 3:
        raise InputError(
            f"input {path!r} is an N5 container; zarr-python {zarr_module().__version__} cannot read N5 (support ended "
            f"with zarr-python 3). Convert it once with zarr-python 2 installed (pip install 'zarr<3', then "
            f"'mpicellpose convert {path} out.zarr --dataset NAME'), or use a zarr / HDF5 / TIFF copy"
        )
    zarr = zarr_module()
    try:  # pragma: no cover - zarr-python 2 only
        store = zarr.N5FSStore(path)
        node = zarr.open(store, mode="r")
    except Exception as exc:  # pragma: no cover
        raise InputError(f"input {path!r} is not a readable N5 container: {exc}") from None
    if dataset is not None:  # pragma: no cover
        try:
            node = node[dataset]
        except Exception:
            raise InputError(f"N5 container {path!r} has no dataset {dataset!r}") from None
    if not hasattr(node, "dtype"):  # pragma: no cover
        raise InputError(f"N5 container {path!r} is a group; choose a dataset (arrays: {list(node.array_keys())})")
    return make_volume(node, axes, **sel, kind="n5", source=path)  # pragma: no cover
