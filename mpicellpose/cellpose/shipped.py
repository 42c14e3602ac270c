"""The shipped models (``mpicellpose/models``): where their weights are, which file a name
selects for the installed Cellpose, and the loaders of the two that a plain
``CellposeModel(pretrained_model=PATH)`` cannot load.  What a run needs of them, and nothing of
their training (:mod:`mpicellpose.training`), which imports this module, never the reverse.

``demo_nuclei_v1`` is a standard Cellpose 3 CPnet trained from scratch on
synthetic fluorescence nuclei (mean diameter 16 voxels, ``diam_mean`` 16) by
``python -m mpicellpose.training``; its provenance and validation scores are
in ``demo_nuclei_v1.json`` beside it. It exists so that the demo and the
tests run offline, without downloading Cellpose's own weights.

``demo_cp4_v1`` is its Cellpose 4 counterpart: a stand-in for ``cpsam`` built from
Cellpose 4's own model class with a reduced encoder (0.9M parameters, fp16, 1.8 MB),
trained by ``python -m mpicellpose.training.cp4``; ``--model demo`` picks it under
Cellpose 4 and it loads through :func:`load_standin` only (provenance in
``demo_cp4_v1.json``; see docs/cellpose4.md).  ``CellposeModel(pretrained_model=PATH)``
always builds ViT-L, so the file stores its encoder size under the extra key
:data:`CONFIG_KEY`; :func:`load_standin` reads it and builds the ``CellposeModel`` inside
:func:`standin_encoder` (a plain ``CellposeModel`` refuses the file: ``size mismatch for
encoder.pos_embed``).  Cellpose 4 resizes by ``30 / diameter`` and the stand-in was trained at
native scale on 16-voxel nuclei, so the Cellpose backend passes ``diameter * 30 / 16`` to
``eval`` for this model only (:func:`load_shipped` gives the factor).

``demo_cyto2ch_v1`` is a two-channel (cytoplasm + nucleus, Cellpose 3 ``channels=[1, 2]``)
Cellpose 3 CPnet, 4x narrower and without the style vector (0.42M parameters, 0.9 MB),
trained on synthetic cells by ``python -m mpicellpose.training.two_channel``; ``--model demo_cyto2ch``
picks it under Cellpose 3 (with ``--channel C,N``, ``--diameter 16``) and it loads through
:func:`load_small` only (provenance in ``demo_cyto2ch_v1.json``): ``CellposeModel`` always
builds the full-width ``CPnet``, so :func:`load_small` builds one without weights and puts the
narrow network (:func:`build_narrow_cpnet`), loaded from the file, in its place.

Load the Cellpose 3 demo model with::

    from cellpose import models
    model = models.CellposeModel(gpu=False, pretrained_model=str(demo_model_path()))
    masks = model.eval(volume, channels=[0, 0], z_axis=0, do_3D=True, diameter=16)[0]

Only the standard library is imported at module level; torch and cellpose inside the functions.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from ..errors import BackendError, ConfigError, ModelNotFoundError
from ..volumes.storage import sha256_file

#: The package-data folder of the shipped weights.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


# --------------------------------------------------------------------------- demo_nuclei_v1 (Cellpose 3)
#: Name under which the shipped model is selected (``pretrained_model="demo"``).
DEMO_MODEL_NAME = "demo"
#: File name of the shipped weights inside ``mpicellpose/models``.
DEMO_MODEL_FILE = "demo_nuclei_v1"


def demo_model_path() -> Path:
    """Path of the shipped demo weights file.

    The path is returned whether or not the file exists (a broken
    installation); callers must check ``path.exists()`` before giving it to
    Cellpose, which silently downloads ``cyto3`` for a missing path.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> demo_model_path().name
    'demo_nuclei_v1'
    """
    return MODELS_DIR / DEMO_MODEL_FILE


def demo_model_info() -> dict:
    """Provenance record of the shipped demo model.

    Returns
    -------
    dict
        The content of ``demo_nuclei_v1.json``: generator settings, seed,
        steps, learning rate, training time, versions, ``sha256`` of the
        weights and validation scores (``validation``).

    Raises
    ------
    FileNotFoundError
        If the JSON file is missing from the installation.

    Examples
    --------
    >>> demo_model_info()["diam_mean"]
    16.0
    """
    path = demo_model_path().with_name(DEMO_MODEL_FILE + ".json")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- demo_cp4_v1 (Cellpose 4 stand-in)
#: File name of the stand-in inside ``mpicellpose/models``.
CP4_MODEL_NAME = "demo_cp4_v1"
#: Extra state-dict key holding ``[embed_dim, depth, num_heads(, out_chans)]`` (``out_chans``, the
#: width of SAM's neck, is 256 when absent); ignored by Cellpose's loader.
CONFIG_KEY = "standin.config"
#: Cellpose 4 resizes by ``CP4_DIAMETER / diameter``.
CP4_DIAMETER = 30.0


def demo_cp4_model_path() -> Path:
    """Path of the shipped stand-in weights (returned whether or not the file exists).

    Examples
    --------
    >>> demo_cp4_model_path().name
    'demo_cp4_v1'
    """
    return MODELS_DIR / CP4_MODEL_NAME


def demo_cp4_model_info() -> dict:
    """The provenance record ``models/demo_cp4_v1.json``."""
    with open(demo_cp4_model_path().with_name(CP4_MODEL_NAME + ".json"), encoding="utf-8") as fh:
        return json.load(fh)


def _import_cellpose():
    """``cellpose.models`` (the backend imports it first, through
    :func:`mpicellpose.cellpose.models.import_cellpose_models`, for a one-line install hint)."""
    from cellpose import models

    return models


#: ``resolve_model()['loader']`` of the shipped stand-in: load it with :func:`load_standin`.
CP4_STANDIN_LOADER = "cp4-demo-standin"


def resolve_demo(name: str, major, full) -> dict:
    """The shipped model behind ``--model demo`` for the installed Cellpose ``major`` (``full``
    version): ``models/demo_nuclei_v1`` (a Cellpose 3 CPnet) under 3.x, the stand-in
    under 4.x (with ``loader`` :data:`CP4_STANDIN_LOADER`).  The explicit names
    ``demo_nuclei*``/``demo_cp4*`` are refused, with a hint, by the other major version.
    Called by :func:`mpicellpose.cellpose.models.resolve_model`.
    """
    v4 = major is not None and major >= 4
    if name.startswith("demo_nuclei") and v4:
        raise ConfigError(
            f"{name!r} is a Cellpose 3 model and the installed Cellpose {full} cannot load Cellpose 3 weights; "
            "use --model demo (the Cellpose 4 stand-in) or install 'cellpose>=3.1.1,<4' "
            "(pip install 'mpicellpose[cellpose]')")
    if name.startswith("demo_cp4") and not v4:
        raise ConfigError(
            f"{name!r} is a Cellpose 4 model and the installed Cellpose is {full or 'missing'}; use --model demo "
            "(the Cellpose 3 demo model) or install 'cellpose>=4,<5' (pip install 'mpicellpose[cellpose4]')")
    path = demo_cp4_model_path() if v4 else demo_model_path()
    if not path.exists():
        raise ModelNotFoundError(f"the shipped demo model is missing from the installation: {path}")
    res = {"kind": "path", "name": "demo", "path": str(path), "sha256": sha256_file(path)}
    if v4:
        res["loader"] = CP4_STANDIN_LOADER
    return res


@contextlib.contextmanager
def standin_encoder(embed_dim: int, depth: int, num_heads: int, out_chans: int = 256):
    """While active, ``cellpose.vit.CPSAM()`` builds a reduced SAM encoder instead of ViT-L.

    ``CPSAM.__init__`` calls ``sam_model_registry["vit_l"](None).image_encoder``; that
    module-level registry entry is swapped and restored.  Image size (1024) and patch size (16)
    stay as in SAM because CPSAM derives its 8x8-patch, 32x32-token position embedding from them.
    """
    from functools import partial
    from types import SimpleNamespace

    _import_cellpose()
    import torch
    import cellpose.vit as cvit
    from segment_anything.modeling import ImageEncoderViT

    def build(checkpoint=None):
        enc = ImageEncoderViT(
            depth=int(depth), embed_dim=int(embed_dim), img_size=1024, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=int(num_heads),
            patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(),
            window_size=14, out_chans=int(out_chans))
        return SimpleNamespace(image_encoder=enc)

    reg = cvit.sam_model_registry
    old = reg["vit_l"]
    reg["vit_l"] = build
    try:
        yield
    finally:
        reg["vit_l"] = old


def read_standin_config(path) -> Optional[dict]:
    """The encoder size stored in a stand-in file, or None for any other file."""
    import torch

    sd = torch.load(os.fspath(path), map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(sd, dict) or CONFIG_KEY not in sd:
        return None
    vals = [int(v) for v in sd[CONFIG_KEY].tolist()]
    cfg = {"embed_dim": vals[0], "depth": vals[1], "num_heads": vals[2], "out_chans": 256}
    if len(vals) > 3:
        cfg["out_chans"] = vals[3]
    return cfg


def load_standin(path, **model_kwargs):
    """``cellpose.models.CellposeModel`` for a stand-in file written by :func:`mpicellpose.training.cp4.save_net`.

    ``model_kwargs`` go to ``CellposeModel`` (``gpu``, ``device``, ``use_bfloat16``; the
    default here is ``use_bfloat16=False``, i.e. float32, unlike Cellpose's).
    """
    models = _import_cellpose()
    path = os.fspath(path)
    if not os.path.isfile(path):  # Cellpose would silently try to download cpsam_v2
        raise FileNotFoundError(f"Cellpose 4 stand-in weights not found: {path}")
    cfg = read_standin_config(path)
    if cfg is None:
        raise ValueError(f"{path} is not a Cellpose 4 stand-in file (no {CONFIG_KEY!r} entry)")
    mk = dict(model_kwargs)
    mk.setdefault("use_bfloat16", False)
    mk["pretrained_model"] = path
    with standin_encoder(**cfg):
        return models.CellposeModel(**mk)


def native_diameter(model) -> float:
    """Object diameter the (stand-in) network was trained at, from its ``diam_mean``."""
    try:
        return float(model.net.diam_mean.item())
    except (AttributeError, RuntimeError, ValueError):
        return CP4_DIAMETER


# --------------------------------------------------------------------------- demo_cyto2ch_v1 (two channels)
#: File name of the two-channel model inside ``mpicellpose/models``.
CYTO2CH_MODEL_NAME = "demo_cyto2ch_v1"
#: Cell diameter (voxels) of its training data (:data:`mpicellpose.synthetic.cells.CELL_DIAMETER`).
CYTO2CH_DIAMETER = 16.0
#: The name ``--model`` takes (any name starting with it selects this file).
CYTO2CH_SELECT_NAME = "demo_cyto2ch"
#: ``resolve_model()['loader']`` of this file: load it with :func:`load_small`.
CYTO2CH_LOADER = "cp3-small-cpnet"
#: Channels of the narrow CPnet: input (cytoplasm, nucleus), then the four levels.
NBASE = (2, 8, 16, 32, 64)


def demo_cyto2ch_path() -> Path:
    """Path of the shipped weights (returned whether or not the file exists).

    >>> demo_cyto2ch_path().name
    'demo_cyto2ch_v1'
    """
    return MODELS_DIR / CYTO2CH_MODEL_NAME


def resolve_cyto2ch(name: str, major, full) -> dict:
    """``resolve_model`` for ``demo_cyto2ch*``: Cellpose 3 only (it is a Cellpose 3 CPnet)."""
    if major is not None and major >= 4:
        raise ConfigError(f"{name!r} is a Cellpose 3 two-channel model and the installed Cellpose {full} cannot "
                          f"load Cellpose 3 weights; under Cellpose 4 use a Cellpose 4 model (cpsam), which takes "
                          f"the first three channels in order")
    path = demo_cyto2ch_path()
    if not path.exists():
        raise ModelNotFoundError(f"the shipped two-channel demo model is missing from the installation: {path}")
    return {"kind": "path", "name": CYTO2CH_SELECT_NAME, "path": str(path), "sha256": sha256_file(path),
            "loader": CYTO2CH_LOADER, "diameter": CYTO2CH_DIAMETER}


#: Length of the style vector Cellpose 3's ``run_net`` expects (``nbase[-1]`` of the full CPnet).
STYLE_LENGTH = 256
#: CPnet's "style" (a global average of the deepest features, added back everywhere) makes every
#: output depend on the whole tile, padding included: off, the network sees only a neighbourhood,
#: so block-wise and whole-volume labels may differ only at block faces (what the tests check).
STYLE_ON = False


def build_narrow_cpnet(nbase: Sequence[int] = NBASE, diameter: float = CYTO2CH_DIAMETER, seed: int = 0,
                       style_on: bool = STYLE_ON):
    """A seeded float32 narrow ``CPnet`` (Cellpose 3) whose style vector is zero-padded to the
    length Cellpose expects (it only returns styles; masks do not depend on them)."""
    import torch
    import torch.nn.functional as F
    from cellpose.resnet_torch import CPnet

    class NarrowCPnet(CPnet):
        def forward(self, data):
            out = super().forward(data)
            style = out[1]
            if style.shape[-1] < STYLE_LENGTH:
                style = F.pad(style, (0, STYLE_LENGTH - style.shape[-1]))
            return (out[0], style) + tuple(out[2:])

    torch.manual_seed(int(seed))
    net = NarrowCPnet(list(nbase), 3, sz=3, mkldnn=False, max_pool=True, diam_mean=float(diameter))
    net.style_on = bool(style_on)
    return net


def load_small(path, **model_kwargs):
    """``cellpose.models.CellposeModel`` with the narrow network of ``path`` in place of its own.

    ``model_kwargs``: ``gpu``, ``device`` (others are ignored).  The file holds a float16 state
    dict plus ``nbase`` (the widths); the network is float32 on the model's device.
    """
    import torch
    from cellpose import models

    path = os.fspath(path)
    if not os.path.isfile(path):  # Cellpose would silently download cyto3
        raise FileNotFoundError(f"two-channel demo weights not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "nbase" not in sd:
        raise ValueError(f"{path} is not a narrow-CPnet file of mpicellpose.training.two_channel (no 'nbase' entry)")
    nbase = [int(v) for v in sd.pop("nbase").tolist()]
    style_on = bool(int(sd.pop("style_on").item())) if "style_on" in sd else True
    diameter = float(sd["diam_mean"].float().item())
    mk = {k: v for k, v in model_kwargs.items() if k in ("gpu", "device")}
    model = models.CellposeModel(pretrained_model=False, nchan=nbase[0], diam_mean=diameter, **mk)
    net = build_narrow_cpnet(nbase, diameter, style_on=style_on)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    model.net = net.to(model.device)
    model.net.eval()
    model.nbase, model.net_ortho = nbase, None
    model.diam_mean = model.diam_labels = diameter
    model.pretrained_model = path
    return model


# --------------------------------------------------------------------------- loading
def load_shipped(res: dict, mk: dict):
    """``(model, diam_mean, diameter_factor)`` for a resolved model with a ``loader``.

    ``diameter_factor`` multiplies the ``diameter`` given to ``eval``: Cellpose 4 resizes by
    ``30 / diameter``, and its stand-in was trained on 16-voxel objects at native scale.
    """
    kw = {k: v for k, v in mk.items() if k != "pretrained_model"}
    if res["loader"] == "standin-flows":  # the scale-test stand-in (cellpose/standin.py): no weights
        from .standin import load as load_standin_flows

        model = load_standin_flows(**kw)
        return model, float(model.diam_mean), 1.0
    if res["loader"] == CP4_STANDIN_LOADER:
        what, load = "the Cellpose 4 stand-in demo model", load_standin
    elif res["loader"] == CYTO2CH_LOADER:
        what, load = "the two-channel demo model", load_small
    else:
        raise BackendError(f"unknown model loader {res['loader']!r}")
    try:
        model = load(res["path"], **kw)
    except Exception as exc:
        raise BackendError(f"could not load {what} {res['path']}: {exc}") from exc
    if res["loader"] == CP4_STANDIN_LOADER:
        diam = native_diameter(model)
        return model, diam, CP4_DIAMETER / diam
    return model, float(model.diam_mean), 1.0
