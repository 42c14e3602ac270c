"""A stand-in for Cellpose's network, for scale tests and benchmarks only (``--model standin-flows``).

It is *not* a segmentation model for real data.  It exists so that the whole real pipeline
(``--pipeline flows``: flow boxes, their shells, Cellpose's own ``_compute_masks``, faces, merge,
relabel, table) runs at many ranks and many blocks on a few CPU cores: its "network" costs a few
array operations per voxel instead of a U-Net.

What it computes, per 2D plane of the network's input (the first channel, as Cellpose normalised
it): foreground is the plane smoothed by a Gaussian (sigma :data:`SIGMA`) above :data:`THRESHOLD`;
the flow is the gradient (at most unit length, times Cellpose's scale, 5) of the plane's Euclidean
distance to the background, smoothed by the same Gaussian, so it points to the middle of each object's section
(touching objects are split at their neck); the cell probability is positive on the foreground and
negative off it.  The output has the shape and channel order of Cellpose's network ((flow along the
plane's first axis, along its second, cell probability) per pixel), so a run goes through the very
code it takes with the real network: under ``--pipeline flows`` :func:`mpicellpose.cellpose.flowfield.compute_flows`
calls :func:`planes` in place of ``cellpose.core.run_net`` (no tiling); under ``--pipeline blocks``
Cellpose's ``run_net`` tiles the planes and calls the module's ``forward``.

Each output pixel depends only on its plane within a few voxels plus the distance to the nearest
background pixel of its object's section, so when objects are narrower than the flow halo the values
of a slab's core do not depend on the slab's extent: labels are the same at any rank count and slab
width.  Meant for the synthetic nuclei of :mod:`mpicellpose.synthetic.nuclei` (bright objects on a
dark background) under Cellpose 3.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..errors import ConfigError

#: ``--model`` name of the stand-in.
STANDIN_NAME = "standin-flows"
#: ``resolve_model()['loader']`` of the stand-in.
STANDIN_LOADER = "standin-flows"
#: The object diameter (voxels) it is told it was "trained" at: Cellpose resizes by ``16 / diameter``.
STANDIN_DIAMETER = 16.0
SIGMA = 1.0
THRESHOLD = 0.4
FLOW_SCALE = 5.0  # Cellpose's flows are unit vectors times 5 (its compute_masks divides by 5)
CELLPROB_IN, CELLPROB_OUT = 4.0, -6.0
_FAR = 1e6  # distance between planes: the distance transform stays within a plane
#: What the stand-in computes, hashed into the run's fingerprint (a change refuses a resume).
VERSION = f"standin-flows v1 sigma={SIGMA} threshold={THRESHOLD} scale={FLOW_SCALE}"


def planes(x) -> np.ndarray:
    """The stand-in's output for planes ``x`` (``(n, Ly, Lx[, channels])``, normalised): float32
    ``(n, Ly, Lx, 3)``, (flow along Ly, flow along Lx, cell probability)."""
    from scipy import ndimage as ndi  # noqa: PLC0415

    x = np.asarray(x, np.float32)
    img = x[..., 0] if x.ndim == 4 else x
    smooth = ndi.gaussian_filter(img, (0, SIGMA, SIGMA), mode="nearest")
    fg = smooth > THRESHOLD
    out = np.zeros((*img.shape, 3), np.float32)
    if not fg.any():
        out[..., 2] = CELLPROB_OUT
        return out
    # per plane: another plane's background is _FAR away, so it never is the nearest
    dist = ndi.distance_transform_edt(fg, sampling=(_FAR, 1.0, 1.0)).astype(np.float32)
    dist = np.minimum(dist, 1000.0)
    dist = ndi.gaussian_filter(dist, (0, SIGMA, SIGMA), mode="nearest")
    gy, gx = np.gradient(dist, axis=(1, 2))
    norm = np.sqrt(gy * gy + gx * gx)
    # unit length where the distance grows at its usual rate, shrinking smoothly to nothing at the
    # section's middle (where the gradient vanishes), so Cellpose's steps settle there
    scale = np.where(fg, FLOW_SCALE / np.maximum(norm, 1.0), 0.0).astype(np.float32)
    out[..., 0] = gy * scale
    out[..., 1] = gx * scale
    out[..., 2] = np.where(fg, CELLPROB_IN, CELLPROB_OUT)
    return out


def resolve(name: str, major, full) -> dict:
    """``resolve_model`` for ``--model standin-flows`` (Cellpose 3 only)."""
    if major is not None and major >= 4:
        raise ConfigError(f"--model {STANDIN_NAME} (the scale-test stand-in) is built for Cellpose 3; the "
                          f"installed Cellpose is {full}")
    return {"kind": "path", "name": STANDIN_NAME, "path": None,
            "sha256": hashlib.sha256(VERSION.encode()).hexdigest(), "loader": STANDIN_LOADER,
            "diameter": STANDIN_DIAMETER}


def build_net(device=None):
    """The stand-in as a ``torch.nn.Module`` with what Cellpose's ``run_net`` asks of a network."""
    import torch  # noqa: PLC0415

    class StandinNet(torch.nn.Module):
        standin_flows = True

        def __init__(self):
            super().__init__()
            self.nout, self.mkldnn = 3, False
            self.device = device or torch.device("cpu")
            self.diam_mean = torch.nn.Parameter(torch.full((1,), STANDIN_DIAMETER), requires_grad=False)
            self.diam_labels = torch.nn.Parameter(torch.full((1,), STANDIN_DIAMETER), requires_grad=False)

        @staticmethod
        def planes(x):
            return planes(x)

        def forward(self, X):  # (batch, channels, Ly, Lx) -> ((batch, 3, Ly, Lx), style)
            y = planes(X.detach().float().cpu().numpy().transpose(0, 2, 3, 1))
            y = torch.from_numpy(np.ascontiguousarray(y.transpose(0, 3, 1, 2))).to(X.device)
            return y, torch.zeros((X.shape[0], 256), device=X.device)

    return StandinNet()


def load(**model_kwargs):
    """A ``cellpose.models.CellposeModel`` whose network is the stand-in (no weights read)."""
    from cellpose import models  # noqa: PLC0415

    mk = {k: v for k, v in model_kwargs.items() if k in ("gpu", "device")}
    model = models.CellposeModel(pretrained_model=False, nchan=2, diam_mean=STANDIN_DIAMETER, **mk)
    model.net = build_net(model.device)
    model.net_ortho = None
    model.diam_mean = model.diam_labels = STANDIN_DIAMETER
    return model
