"""Synthetic nuclei generator: determinism, label validity, touching, gradient, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from mpicellpose.synthetic.labels import adjacent_label_pairs, split_disconnected
from mpicellpose.synthetic.nuclei import make_nuclei


@pytest.fixture(scope="module")
def vol():
    return make_nuclei((64, 72, 80), seed=5, touching_fraction=0.4)


def test_same_seed_same_output_different_seed_differs():
    a_img, a_lab = make_nuclei((48, 48, 48), seed=3)
    b_img, b_lab = make_nuclei((48, 48, 48), seed=3)
    c_img, c_lab = make_nuclei((48, 48, 48), seed=4)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab)
    assert not np.array_equal(a_img, c_img)


def test_types_shapes_and_consecutive_labels(vol):
    img, lab = vol
    assert img.shape == lab.shape == (64, 72, 80)
    assert img.dtype == np.uint16 and lab.dtype == np.uint32
    ids = np.unique(lab)
    n = int(lab.max())
    assert n >= 20
    assert np.array_equal(ids, np.arange(n + 1))


def test_every_label_is_one_compact_component(vol):
    _, lab = vol
    sizes = np.bincount(lab.ravel())[1:]
    mean_volume = 4 / 3 * np.pi * 8 ** 3
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        mask = lab[sl] == k
        assert ndimage.label(mask)[1] == 1, f"label {k} is in pieces"
        extent = np.array([s.stop - s.start for s in sl])
        # an ellipsoid of diameter ~16 (jitter, elongation): bounded box, fills it
        assert extent.max() <= 40, (k, extent)
        if not any(s.start == 0 or s.stop == n for s, n in zip(sl, lab.shape)):
            assert sizes[k - 1] / extent.prod() > 0.35, (k, sizes[k - 1], extent)
    # sizes around the nominal volume (objects cut by the border are smaller)
    assert 0.4 * mean_volume < np.median(sizes) < 1.6 * mean_volume


def test_objects_are_bright_and_background_dark(vol):
    img, lab = vol
    inside = img[lab > 0].astype(float).mean()
    outside = img[lab == 0].astype(float).mean()
    assert inside > 4 * outside


def test_touching_objects_only_when_asked():
    _, lab0 = make_nuclei((64, 64, 64), seed=2, touching_fraction=0.0)
    _, lab1 = make_nuclei((64, 64, 64), seed=2, touching_fraction=0.5)
    assert len(adjacent_label_pairs(lab0)) == 0
    pairs = adjacent_label_pairs(lab1)
    assert len(pairs) >= 0.2 * lab1.max()
    # touching objects stay distinct: a pair shares a face, not its bulk
    a, b = pairs[0]
    assert np.count_nonzero(lab1 == a) > 50 and np.count_nonzero(lab1 == b) > 50


def test_density_controls_coverage():
    _, sparse = make_nuclei((64, 64, 64), seed=1, density=0.08)
    _, dense = make_nuclei((64, 64, 64), seed=1, density=0.25)
    assert (sparse > 0).mean() < 0.12
    assert (dense > 0).mean() > 0.15
    assert dense.max() > 2 * sparse.max()


def test_gradient_scales_brightness_along_axis():
    kw = dict(seed=7, noise=0.0, photons=None)
    flat, lab = make_nuclei((40, 48, 96), **kw)
    grad, lab_g = make_nuclei((40, 48, 96), gradient=(2, 0.25, 1.0), **kw)
    assert np.array_equal(lab, lab_g)  # the gradient changes the image only
    f = flat.astype(float) - 100  # integer encoding: 100 + 1000 * value
    g = grad.astype(float) - 100
    lo, hi = slice(0, 24), slice(72, 96)
    ratio_lo = g[..., lo].sum() / f[..., lo].sum()
    ratio_hi = g[..., hi].sum() / f[..., hi].sum()
    assert 0.25 < ratio_lo < 0.45
    assert 0.85 < ratio_hi < 1.0
    # along the other axes nothing changes systematically
    r0 = g[:20].sum() / f[:20].sum()
    r1 = g[20:].sum() / f[20:].sum()
    assert abs(r0 - r1) < 0.05


def test_2d_and_float_output_and_anisotropy():
    img, lab = make_nuclei((96, 96), seed=0, dtype=np.float32)
    assert img.dtype == np.float32 and lab.ndim == 2 and lab.max() >= 5
    _, iso = make_nuclei((48, 64, 64), seed=0)
    _, ani = make_nuclei((48, 64, 64), seed=0, anisotropy=2.0)

    def mean_extent(lab, axis):
        ext = [sl[axis].stop - sl[axis].start for sl in ndimage.find_objects(lab) if sl]
        return np.mean(ext)

    # anisotropic voxels: objects are about half as tall along axis 0
    assert mean_extent(ani, 0) < 0.7 * mean_extent(iso, 0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_nuclei((10, 10, 10, 10))
    with pytest.raises(ValueError):
        make_nuclei((32, 32), gradient=(5, 0.5, 1.0))
    with pytest.raises(ValueError):
        make_nuclei((32, 32), density=1.5)


def test_helpers():
    lab = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [2, 2, 3, 0]])
    out = split_disconnected(lab)
    assert out.max() == 4 and np.array_equal(out > 0, lab > 0)
    assert adjacent_label_pairs(lab).tolist() == [[2, 3]]


@pytest.mark.slow
def test_256_cube_in_a_few_seconds():
    t = time.perf_counter()
    img, lab = make_nuclei((256, 256, 256), seed=0)
    dt = time.perf_counter() - t
    assert lab.max() > 1000
    # a few seconds on one idle core; generous for a loaded CI machine
    assert dt < 30, dt
