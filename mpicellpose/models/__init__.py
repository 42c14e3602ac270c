"""Model weights shipped with mpicellpose.

``demo_nuclei_v1`` is a standard Cellpose 3 CPnet trained from scratch on
synthetic fluorescence nuclei (mean diameter 16 voxels, ``diam_mean`` 16) by
``python -m mpicellpose.training``; its provenance and validation scores are
in ``demo_nuclei_v1.json`` beside it. It exists so that the demo and the
tests run offline, without downloading Cellpose's own weights.

``demo_cp4_v1`` is its Cellpose 4 counterpart: a stand-in for ``cpsam`` built from
Cellpose 4's own model class with a reduced encoder (0.9M parameters, fp16, 1.8 MB),
trained by ``python -m mpicellpose.training_cp4``; ``--model demo`` picks it under
Cellpose 4 and it loads through :func:`mpicellpose.training_cp4.load_standin` only
(provenance in ``demo_cp4_v1.json``; see docs/cellpose4.md).

``demo_cyto2ch_v1`` is a two-channel (cytoplasm + nucleus, Cellpose 3 ``channels=[1, 2]``)
Cellpose 3 CPnet, 4x narrower and without the style vector (0.42M parameters, 0.9 MB),
trained on synthetic cells by ``python -m mpicellpose.training_2ch``; ``--model demo_cyto2ch``
picks it under Cellpose 3 (with ``--channel C,N``, ``--diameter 16``) and it loads through
:func:`mpicellpose.training_2ch.load_small` only (provenance in ``demo_cyto2ch_v1.json``).

Load the Cellpose 3 demo model with::

    from cellpose import models
    model = models.CellposeModel(gpu=False, pretrained_model=str(demo_model_path()))
    masks = model.eval(volume, channels=[0, 0], z_axis=0, do_3D=True, diameter=16)[0]
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DEMO_MODEL_NAME", "DEMO_MODEL_FILE", "demo_model_path", "demo_model_info"]

#: Name under which the shipped model is selected (``pretrained_model="demo"``).
DEMO_MODEL_NAME = "demo"
#: File name of the shipped weights inside this package folder.
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
    return Path(__file__).resolve().parent / DEMO_MODEL_FILE


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
