"""Global intensity normalisation: percentiles sampled over the whole volume, same on any rank count."""
import numpy as np
import pytest

from mpicellpose import comm as mpi
from mpicellpose.grid import geometry as geo
from mpicellpose.config import RunConfig
from mpicellpose.runner.phases.normalize import global_normalization
from mpicellpose.runner.phases.plan import Settings
from mpicellpose.errors import InputError


def plan_for(img, cfg, blocksize=16, kept=None):
    """(settings, kept blocks) of a one-channel volume cut in blocks of ``blocksize``."""
    g = geo.BlockGrid(img.shape, blocksize, 4)
    kept = list(range(len(g))) if kept is None else kept
    s = Settings(img.shape, g.blocksize, g.overlap, None, "iou", 1, dict(cfg.eval_kwargs), None, None, None,
                 tuple("zyx"[-img.ndim:]), normalize=cfg.normalize)
    return s, kept


def normalize(cfg, img):
    return global_normalization(cfg, *plan_for(img, cfg), img, mpi.Mailbox(mpi.SelfComm()))


def gradient_volume():
    z = np.linspace(1.0, 5.0, 48)[:, None, None]
    rng = np.random.default_rng(0)
    return (rng.random((48, 40, 40)) * 100 * z).astype(np.float32)


def test_global_percentiles_match_whole_volume():
    img = gradient_volume()
    cfg = RunConfig(input=img, output="/tmp/x.zarr")
    norm = normalize(cfg, img)
    lo, hi = norm["normalize"]["lowhigh"]
    want_lo, want_hi = np.percentile(img, [1, 99])
    assert abs(lo - want_lo) / want_hi < 0.02 and abs(hi - want_hi) / want_hi < 0.02
    assert norm["percentile"] == [1.0, 99.0] and norm["sampled_voxels"] > 1000


def test_mask_and_options_honoured():
    img = gradient_volume()
    mask = np.zeros((6, 5, 5), bool)
    mask[:3] = True  # only the dim half of the volume
    cfg = RunConfig(input=img, output="/tmp/x.zarr", mask=mask)
    norm = normalize(cfg, img)
    assert norm["normalize"]["lowhigh"][1] < np.percentile(img[24:], 99) * 0.8
    for kw in ({"normalize": "block"}, {"normalize": "none"}, {"eval_kwargs": {"normalize": {"lowhigh": [0, 1]}}},
               {"backend": "threshold"}):
        cfg = RunConfig(input=img, output="/tmp/x.zarr", **kw)
        assert normalize(cfg, img) is None
    cfg = RunConfig(input=img, output="/tmp/x.zarr", eval_kwargs={"normalize": {"percentile": [5, 95], "norm3D": True}})
    norm = normalize(cfg, img)
    assert norm["percentile"] == [5, 95] and norm["normalize"]["norm3D"] is True


def test_nan_found_before_any_block():
    img = gradient_volume()
    img[::7, ::7, ::7] = np.nan
    cfg = RunConfig(input=img, output="/tmp/x.zarr")
    with pytest.raises(InputError, match="NaN/inf values"):
        normalize(cfg, img)


@pytest.mark.parametrize("shape", [(128, 128), (40, 48, 48)])
def test_fixed_bounds_reproduce_cellpose_percentile_path(shape):
    """Global bounds equal to the block's own percentiles must give the labels Cellpose gives with
    normalize=True. Passing them to Cellpose as a (2,) ``lowhigh`` shifts its zero-filled extra
    channel to -low/(high-low) and changes the labels (found in the end-to-end benchmark)."""
    pytest.importorskip("cellpose")
    from mpicellpose.cellpose.backends import make_backend
    from mpicellpose.synthetic.nuclei import make_nuclei

    img, _ = make_nuclei(shape, seed=11, touching_fraction=0.4)
    img = (img * 1000 + 80).astype(np.uint16)
    lo, hi = (float(v) for v in np.percentile(img.astype(np.float32), [1, 99]))
    mk = {"pretrained_model": "demo"}
    own = make_backend("cellpose", model_kwargs=mk, eval_kwargs={"diameter": 16}, ndim=len(shape), threads=1)
    fixed = make_backend("cellpose", model_kwargs=mk, ndim=len(shape), threads=1,
                         eval_kwargs={"diameter": 16, "normalize": {"lowhigh": [lo, hi], "percentile": None}})
    before = img.copy()
    a, b = own.segment(img), fixed.segment(img)
    assert a.max() > 3
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(img, before)  # the block is not modified in place
