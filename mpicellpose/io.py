"""Everything that touches files: opening inputs, creating zarr outputs (zarr-python 2.18
and 3.x, on-disk formats v2 and v3), atomic small-file writes."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError, InputNotFoundError, needs


def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a hard dependency
        raise needs("zarr") from None
    return zarr


def zarr_major() -> int:
    return int(_zarr().__version__.split(".")[0])


def is_zarr_path(path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in (".zarray", ".zgroup", "zarr.json"))


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
    if not os.path.exists(path):
        raise InputNotFoundError(f"{what} {path!r} does not exist")
    zarr = _zarr()
    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:
        raise InputError(f"{what} {path!r} is not a readable zarr array or group: {exc}") from None
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


def check_writable(directory) -> None:
    """Raise InputError unless a file can really be created in ``directory``
    (``os.access`` says yes to root even where writes fail)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=str(directory), prefix=".mpicellpose-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"output directory {str(directory)!r} is not writable ({exc.strerror})") from None


def open_array(path, mode: str = "r"):
    return _zarr().open_array(str(path), mode=mode)


def create_array(path, shape, chunks, dtype, *, zarr_format: int = 2, attrs: dict | None = None,
                 overwrite: bool = False):
    """Create a zarr array on disk (fill value 0) with zarr-python 2.18 or 3.x."""
    zarr = _zarr()
    shape = tuple(int(s) for s in shape)
    chunks = tuple(int(min(c, s)) for c, s in zip(chunks, shape))
    mode = "w" if overwrite else "w-"
    if zarr_major() >= 3:
        arr = zarr.open_array(str(path), mode=mode, shape=shape, chunks=chunks, dtype=dtype,
                              fill_value=0, zarr_format=zarr_format)
    else:
        if zarr_format != 2:
            raise InputError("zarr-python 2 can only write the v2 on-disk format; install zarr>=3 for v3")
        arr = zarr.open_array(str(path), mode=mode, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
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
    _atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True, default=_json_default).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_npz(path, **arrays) -> None:
    """Save arrays to a compressed .npz atomically."""
    _atomic(Path(path), lambda f: np.savez_compressed(f, **arrays))


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _json_default(o):
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


def wrap_folder_of_tiffs(filename_pattern, block_index_pattern=r"_(Z)(\d+)(Y)(\d+)(X)(\d+)"):
    """A virtual zarr array over a grid of TIFF tiles, without copying the data.

    Uses tifffile's ``FileSequence`` zarr interface: files matching the glob
    ``filename_pattern`` are placed on a grid by the indices that ``block_index_pattern``
    (a regular expression with axis-name / index group pairs) extracts from their names.

    Returns
    -------
    zarr array (read-only) over all tiles, shape = grid shape * tile shape.
    """
    try:
        import tifffile
    except ImportError:
        raise needs("tifffile") from None
    import glob

    files = sorted(glob.glob(str(filename_pattern)))
    if not files:
        raise InputNotFoundError(f"no files match {filename_pattern!r}")
    seq = tifffile.TiffSequence(files, pattern=block_index_pattern)
    store = seq.aszarr()
    zarr = _zarr()
    try:
        return zarr.open(store, mode="r")
    except TypeError:
        return zarr.open_array(store, mode="r")
