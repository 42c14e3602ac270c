"""Synthetic two-channel fluorescence: cell bodies (a cytoplasm stain) and their nuclei.

The test data of two-channel (cytoplasm + nucleus) models: :func:`make_cells` places cells
with :func:`mpicellpose.synthetic.nuclei.make_nuclei` (touching, jittered ellipsoids; the cytoplasm
channel is that image, dimmer where the nucleus is) and gives every cell one nucleus, the
inner part of the cell, drawn in a second channel with its own brightness scale.  The
channels are deliberately on very different intensity scales, as in real two-colour data,
so that normalising them together (instead of per channel) shows.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

from .nuclei import make_nuclei

#: Default cell diameter (voxels) and the nucleus's share of the cell radius.
CELL_DIAMETER = 16.0
NUCLEUS_FRACTION = 0.45


def cell_boundaries(labels: np.ndarray) -> np.ndarray:
    """Voxels on the face of their label (next to another label or the background, 1-connected).

    >>> cell_boundaries(np.array([[1, 1, 1, 2, 2]])).astype(int).tolist()
    [[0, 0, 1, 1, 0]]
    """
    edge = np.zeros(labels.shape, bool)
    for ax in range(labels.ndim):
        diff = np.diff(labels, axis=ax) != 0
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    return edge & (labels > 0)


def nuclei_of_cells(cells: np.ndarray, fraction: float = NUCLEUS_FRACTION) -> np.ndarray:
    """One nucleus per cell: the cell's voxels deeper than ``1 - fraction`` of its largest depth
    (distance to the cell's face); labelled with the cell's ID."""
    depth = ndimage.distance_transform_edt(~cell_boundaries(cells) & (cells > 0))
    deepest = ndimage.maximum(depth, cells, index=np.arange(int(cells.max()) + 1))
    deepest = np.asarray(deepest, dtype=np.float64)
    inner = (cells > 0) & (depth >= (1.0 - float(fraction)) * deepest[cells])
    return np.where(inner, cells, 0).astype(cells.dtype)


def make_cells(shape: Sequence[int], *, seed: int = 0, mean_diameter: float = CELL_DIAMETER,
               density: float = 0.35, touching_fraction: float = 0.5, nuclear_scale: float = 8.0,
               nuclear_dimming: float = 0.3, noise: float = 0.04, photons: float = 150.0,
               channel_axis: int = 0, **cell_kwargs) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-channel image of cells (channel 0: cytoplasm, channel 1: nuclei) and its labels.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape, 2D ``(Y, X)`` or 3D ``(Z, Y, X)``.
    seed : int
        Equal arguments give identical output.
    mean_diameter, density, touching_fraction
        Of the cells, as for :func:`mpicellpose.synthetic.nuclei.make_nuclei`.
    nuclear_scale : float
        Brightness of the nuclear channel relative to the cytoplasm channel (uint16 values
        ``50 + 1000 * nuclear_scale * signal``): the channels need normalising apart.
    nuclear_dimming : float
        Fraction by which the cytoplasm stain is dimmer inside the nucleus.
    channel_axis : int
        Where the channel axis goes in the returned image (0: C,[Z,]Y,X; -1: [Z,]Y,X,C).
    **cell_kwargs
        Other :func:`make_nuclei` arguments for the cell bodies (``anisotropy``, ``blur_sigma``...).

    Returns
    -------
    image : numpy.ndarray
        uint16, the two channels stacked along ``channel_axis``.
    cells : numpy.ndarray
        uint32 ground truth of the cells, 1..N.
    nuclei : numpy.ndarray
        uint32 nuclei, each labelled with its cell's ID.

    Examples
    --------
    >>> img, cells, nuc = make_cells((64, 64), seed=1)
    >>> img.shape, img.dtype, int(cells.max()) == len(np.unique(nuc)) - 1
    ((2, 64, 64), dtype('uint16'), True)
    """
    shape = tuple(int(s) for s in shape)
    cyto, cells = make_nuclei(shape, seed=seed, mean_diameter=mean_diameter, density=density,
                              touching_fraction=touching_fraction, noise=noise, photons=photons, **cell_kwargs)
    nuclei = nuclei_of_cells(cells)
    rng = np.random.default_rng(int(seed) + 7919)
    cyto = cyto.astype(np.float32)
    bg = 100.0  # make_nuclei's uint16 offset
    cyto = bg + (cyto - bg) * (1.0 - float(nuclear_dimming) * (nuclei > 0))
    bright = np.clip(1.0 + 0.25 * rng.standard_normal(int(cells.max()) + 1), 0.3, None).astype(np.float32)
    bright[0] = 0.0
    sig = ndimage.gaussian_filter(bright[nuclei], 1.0) + np.float32(0.05)
    sig = rng.poisson(np.clip(sig, 0, None) * photons).astype(np.float32) / np.float32(photons)
    sig += rng.standard_normal(shape).astype(np.float32) * np.float32(noise)
    nuc = 50.0 + 1000.0 * float(nuclear_scale) * sig
    image = np.stack([cyto, nuc], axis=channel_axis)
    image = np.clip(np.rint(image), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return image, cells.astype(np.uint32), nuclei.astype(np.uint32)
