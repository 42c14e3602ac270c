import itertools

import numpy as np
import pytest

from mpicellpose.grid import geometry as geo
from mpicellpose.grid import partition
from mpicellpose.errors import ConfigError


def test_per_axis_forms():
    assert geo.per_axis(8, 3, "b", minimum=1) == (8, 8, 8)
    assert geo.per_axis("4,5,6", 3, "b", minimum=1) == (4, 5, 6)
    assert geo.per_axis((4, 5), 2, "b", minimum=1) == (4, 5)
    with pytest.raises(ConfigError, match="blocksize has 2 values"):
        geo.per_axis((4, 5), 3, "blocksize", minimum=1)
    with pytest.raises(ConfigError, match="blocksize must be >= 1"):
        geo.per_axis(0, 3, "blocksize", minimum=1)
    with pytest.raises(ConfigError, match="overlap must be >= 0"):
        geo.per_axis(-1, 2, "overlap", minimum=0)
    with pytest.raises(ConfigError, match="integers"):
        geo.per_axis((1.5, 2), 2, "blocksize", minimum=1)


@pytest.mark.parametrize("seed", range(25))
def test_cores_tile_volume_exactly_once_and_reads_contain_cores(seed):
    rng = np.random.default_rng(seed)
    nd = int(rng.integers(1, 4))
    shape = tuple(int(s) for s in rng.integers(1, 40, nd))
    bs = tuple(int(b) for b in rng.integers(1, 25, nd))
    ov = tuple(int(o) for o in rng.integers(0, 30, nd))  # overlap may exceed the block
    g = geo.BlockGrid(shape, bs, ov)
    cover = np.zeros(shape, np.int32)
    for blk in g:
        cover[blk.core_slices] += 1
        for (ca, cb), (ra, rb), o, s in zip(blk.core, blk.read, ov, shape):
            assert ra == max(ca - o, 0) and rb == min(cb + o, s)
        assert g.block(blk.index).linear == blk.linear
    assert (cover == 1).all()


def test_neighbours_and_contacts():
    g = geo.BlockGrid((30, 30, 30), 10, 2)
    assert len(g.neighbour_offsets(1)) == 6
    assert len(g.neighbour_offsets(2)) == 18
    assert len(g.neighbour_offsets(3)) == 26
    c = g.block((1, 1, 1)).linear
    assert g.neighbour(c, (1, 0, 0)) == g.linear_of((2, 1, 1))
    assert g.neighbour(g.linear_of((2, 2, 2)), (1, 0, 0)) is None
    assert g.contact_box(c, (1, 0, 0)) == ((19, 20), (10, 20), (10, 20))
    assert g.contact_box(c, (-1, 1, 0)) == ((10, 11), (19, 20), (10, 20))
    band = g.band_box(c, 0, 1, 8)
    assert band == ((18, 22), (10, 20), (10, 20))  # clipped by the overlap of 2


def test_band_box_is_shared_by_both_blocks():
    g = geo.BlockGrid((40, 37), (16, 11), (6, 5))
    for blk in g:
        for axis in range(2):
            nb = list(blk.index)
            nb[axis] += 1
            if not g.contains_index(nb):
                continue
            b = g.linear_of(nb)
            assert g.band_box(blk.linear, axis, 1, 4) == g.band_box(b, axis, -1, 4)
            band = g.band_box(blk.linear, axis, 1, 100)
            assert geo.box_intersect(band, blk.read) == band  # inside both read regions
            assert geo.box_intersect(band, g.block(b).read) == band


def test_mask_mapping_and_errors():
    g = geo.BlockGrid((40, 40), 10, 0)
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[3, 2] = True
    keep = geo.blocks_in_mask(g, mask)
    assert keep.sum() == 2 and keep[g.linear_of((0, 0))] and keep[g.linear_of((3, 2))]
    # lower resolution that does not divide evenly
    mask = np.zeros((3, 7), bool)
    mask[2, 6] = True
    keep = geo.blocks_in_mask(g, mask)
    assert keep[g.linear_of((3, 3))] and keep.sum() >= 1
    with pytest.raises(ConfigError, match="cannot map onto volume"):
        geo.check_mask_shape((50, 40), (40, 40))
    with pytest.raises(ConfigError, match="mask has 3 axes"):
        geo.check_mask_shape((4, 4, 4), (40, 40))


def test_assignment_contiguous_balanced_deterministic():
    items = list(range(100))
    w = [1 + (i % 7) for i in items]
    for n in (1, 2, 3, 4, 7, 150):
        a = partition.assign_contiguous(items, w, n)
        assert len(a) == n
        assert list(itertools.chain(*a)) == items
        loads = [sum(w[i] for i in part) for part in a]
        if n <= 7:
            assert max(loads) <= sum(w) / n + max(w)
        assert a == partition.assign_contiguous(items, w, n)
