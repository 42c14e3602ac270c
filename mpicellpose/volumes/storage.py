"""Files and zarr stores: open / create zarr arrays (zarr-python 2.18 and 3.x, on-disk
formats v2 and v3), remove paths, check that a directory is writable, atomic JSON /
npz files, JSON coercion of numpy values, file checksums.

Reading inputs of every kind is :mod:`mpicellpose.volumes.readers`; OME-NGFF metadata is
:mod:`mpicellpose.volumes.ngff` / :mod:`mpicellpose.volumes.ngff_io`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError, InputNotFoundError, needs


def zarr_module():
    """The ``zarr`` package (a clear error when it is missing)."""
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a hard dependency
        raise needs("zarr") from None
    return zarr


def zarr_major() -> int:
    return int(zarr_module().__version__.split(".")[0])


def is_zarr_path(path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in (".zarray", ".zgroup", "zarr.json"))


def open_zarr_node(path, what: str = "input"):
    """Open a zarr array or group read-only; clear errors for a missing or unreadable path."""
    path = str(path)
    if not os.path.exists(path):
        raise InputNotFoundError(f"{what} {path!r} does not exist")
    try:
        return zarr_module().open(path, mode="r")
    except Exception as exc:
        raise InputError(f"{what} {path!r} is not a readable zarr array or group: {exc}") from None


def check_writable(directory) -> None:
    """Raise InputError unless a file can really be created in ``directory``
    (``os.access`` says yes to root even where writes fail)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=str(directory), prefix=".mpicellpose-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"output directory {str(directory)!r} is not writable ({exc.strerror})") from None


#: The zarr v2 chunk-key separator of every array a run writes (work directory, flow field, output):
#: ``0/3/7`` rather than ``0.3.7``, so no directory holds more entries than one grid axis has chunks
#: (zarr v3's default chunk key encoding, ``c/0/3/7``, is nested already).
NESTED = "/"


def open_array(path, mode: str = "r"):
    return zarr_module().open_array(str(path), mode=mode)


def create_array(path, shape, chunks, dtype, *, zarr_format: int = 2, attrs: dict | None = None,
                 overwrite: bool = False, dimension_separator: str | None = None, dimension_names=None):
    """Create a zarr array on disk (fill value 0) with zarr-python 2.18 or 3.x.

    ``dimension_separator`` (v2 format) and ``dimension_names`` (v3 format) are what
    OME-Zarr level arrays want (see :func:`mpicellpose.volumes.ngff.array_options`); each is
    ignored for the other format.

    Examples
    --------
    >>> import tempfile, os
    >>> a = create_array(os.path.join(tempfile.mkdtemp(), "a.zarr"), (5, 7), (4, 4), np.uint16)
    >>> a.shape, a.chunks, int(a[4, 6])
    ((5, 7), (4, 4), 0)
    """
    zarr = zarr_module()
    shape = tuple(int(s) for s in shape)
    chunks = tuple(int(min(c, s)) for c, s in zip(chunks, shape))
    mode = "w" if overwrite else "w-"
    extra = {}
    if zarr_format == 2 and dimension_separator is not None:
        extra["dimension_separator"] = dimension_separator
    if zarr_major() >= 3:
        if zarr_format == 3 and dimension_names is not None:
            extra["dimension_names"] = tuple(str(n) for n in dimension_names)
        arr = zarr.open_array(str(path), mode=mode, shape=shape, chunks=chunks, dtype=dtype,
                              fill_value=0, zarr_format=zarr_format, **extra)
    else:
        if zarr_format != 2:
            raise InputError("zarr-python 2 can only write the v2 on-disk format; install zarr>=3 for v3")
        arr = zarr.open_array(str(path), mode=mode, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                              **extra)
    if attrs:
        arr.attrs.update(attrs)
    return arr


def array_format(arr) -> int:
    """On-disk zarr format (2 or 3) of a zarr array; 2 for anything else."""
    meta = getattr(arr, "metadata", None)
    return int(getattr(meta, "zarr_format", 2) or 2)


def remove_path(path) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=False)
    elif p.exists() or p.is_symlink():
        p.unlink()


def node_attrs(node) -> dict:
    """A zarr node's attributes as a plain dict (zarr-python 2 and 3)."""
    attrs = node.attrs
    try:
        return dict(attrs.asdict())
    except AttributeError:
        return dict(attrs)


def node_kind(path) -> str | None:
    """'array', 'group' or None (nothing there) from the metadata files on disk."""
    p = Path(str(path))
    if (p / ".zarray").exists():
        return "array"
    if (p / ".zgroup").exists():
        return "group"
    meta = p / "zarr.json"
    if meta.exists():
        try:
            return str(json.loads(meta.read_text()).get("node_type", "group"))
        except (OSError, ValueError):
            return "group"
    return None


# --------------------------------------------------------------------------- atomic files
def _atomic(path: Path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path, obj) -> None:
    """Write JSON atomically (write a temporary file, fsync, rename)."""
    _atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True, default=json_default).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_npz(path, **arrays) -> None:
    """Save arrays to a compressed .npz atomically."""
    _atomic(Path(path), lambda f: np.savez_compressed(f, **arrays))


def load_npz(path, skip_prefix: str | None = None) -> dict:
    """All arrays of an .npz, or all but those whose name starts with ``skip_prefix`` (not read)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if not (skip_prefix and k.startswith(skip_prefix))}


def json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def plain_json(obj):
    """``obj`` with numpy scalars, arrays and tuples turned into plain JSON values."""
    return json.loads(json.dumps(obj, default=json_default))


# --------------------------------------------------------------------------- helpers
def numpy_array_to_zarr(write_path, array, chunks, *, zarr_format: int = 2, overwrite: bool = True):
    """Store a numpy array as a zarr array on disk and return it.

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> z = numpy_array_to_zarr(os.path.join(d, "a.zarr"), np.arange(12).reshape(3, 4), (2, 2))
    >>> z.shape, int(z[2, 3])
    ((3, 4), 11)
    """
    array = np.asarray(array)
    if isinstance(chunks, int):
        chunks = (chunks,) * array.ndim
    arr = create_array(write_path, array.shape, chunks, array.dtype, zarr_format=zarr_format, overwrite=overwrite)
    arr[...] = array
    return arr


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB pieces.

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "f")
    >>> _ = open(p, "wb").write(b"abc")
    >>> sha256_file(p)[:16]
    'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
