"""Cellpose 4 specifics of the Cellpose backend.

Cellpose 4's ``normalize`` dict and tile size (used by :mod:`mpicellpose.cellpose.segmenter`),
and the GPU memory its networks need (``mpicellpose plan``).  The loaders of the shipped small
models are in :mod:`mpicellpose.cellpose.shipped`.  Imports no Cellpose at module level.
"""
from __future__ import annotations

from ..errors import ConfigError

#: Cellpose 4.2.1.1's ``models.normalize_default``.  Cellpose 4 writes a *bool* ``normalize`` into
#: that module-level dict (it leaks into later calls) and merges a dict into a copy: pass full dicts.
CP4_NORMALIZE_DEFAULTS = {"lowhigh": None, "percentile": None, "normalize": True, "norm3D": True,
                          "sharpen_radius": 0, "smooth_radius": 0, "tile_norm_blocksize": 0,
                          "tile_norm_smooth3D": 1, "invert": False}


def check_bsize_v4(bsize) -> None:
    """Cellpose 4's Cellpose-SAM runs on 256x256 tiles only (4.2.1.1 raises deep inside eval)."""
    if bsize is not None and not (isinstance(bsize, (int, float)) and bsize == 256):
        raise ConfigError(f"eval_kwargs bsize={bsize!r}: Cellpose 4 (Cellpose-SAM) networks work on 256x256 tiles "
                          f"only; leave bsize unset or pass 256 (batch_size sets how many tiles run at once)")


def cp4_normalize(ek: dict, keys=None) -> dict:
    """``ek`` with ``normalize`` as a full Cellpose 4 dict (never a bool, ``"normalize"`` explicit)
    and a Cellpose 3 style ``invert`` moved into it; ``keys``: the installed defaults' keys.

    >>> n = cp4_normalize({"normalize": {"lowhigh": [0, 9]}, "invert": True})["normalize"]
    >>> n["normalize"], n["lowhigh"], n["invert"], n["percentile"]
    (True, [0, 9], True, None)
    """
    ek, user = dict(ek), ek.get("normalize", True)
    norm = dict(CP4_NORMALIZE_DEFAULTS, **(user if isinstance(user, dict) else {}))
    norm["normalize"] = bool(user.get("normalize", True) if isinstance(user, dict) else user)
    if "invert" in ek:
        norm["invert"] = bool(ek.pop("invert")) or bool(norm.get("invert"))
    if keys is not None:
        norm = {k: v for k, v in norm.items() if k in keys or (isinstance(user, dict) and k in user)}
    ek["normalize"] = norm
    return ek


# --------------------------------------------------------------------------- memory (mpicellpose plan)
#: Cellpose-SAM (``cpsam``): SAM ViT-L encoder, global attention in every block, on 256x256 tiles of
#: 8x8-pixel patches (32x32 = 1024 tokens), 305M parameters; the shipped stand-in is the same network
#: with a 64-wide, 2-block, 2-head encoder and a 64-wide neck (0.27M parameters).
CPSAM_NET = {"name": "cpsam", "parameters": 305_000_000, "embed_dim": 1024, "depth": 24, "heads": 16,
             "tile": 256, "patch": 8, "in_channels": 3}
STANDIN_NET = {"name": "cp4 stand-in (demo)", "parameters": 271_874, "embed_dim": 64, "depth": 2, "heads": 2,
               "tile": 256, "patch": 8, "in_channels": 3}
#: CUDA context, cuDNN/cuBLAS workspaces and allocator slack per process (typical torch 2.x).
CUDA_OVERHEAD = 600 * 2**20
#: Mask step (Cellpose 4.2.1.1 ``dynamics.compute_masks`` on the rank's GPU): per voxel of the block,
#: the flow field (3 x float32) and the dense histogram with its max-pool (~4 x 4 B, on the block
#: grown by 20 per side), plus per voxel above the cell-probability threshold the positions (3 x
#: float32), one Euler step's samples (3 x float32), the integer positions and the sparse indices
#: (3 x int32 + 3 x int64): 28 + 52 x the foreground fraction bytes.
MASK_BYTES_PER_VOXEL = 28
MASK_BYTES_PER_FOREGROUND_VOXEL = 52
FOREGROUND_FRACTION = 0.5  # assumed: dense tissue; sparse nuclei need less


def tile_activation_bytes(net: dict, bf16: bool = True) -> int:
    """Peak activations of one 256x256 tile in one forward pass (no autograd) of ``net``.

    SAM's attention builds the full ``heads x tokens x tokens`` score matrix (no fused kernel) and
    holds it about three times at once (scores, the decomposed relative-position sum, softmax);
    the residual stream, q/k/v and the MLP add ``~9 x tokens x width``.

    >>> round(tile_activation_bytes(CPSAM_NET) / 2**20)  # MiB per tile in bfloat16
    114
    """
    tokens = (net["tile"] // net["patch"]) ** 2
    size = 2 if bf16 else 4
    return int(3 * net["heads"] * tokens ** 2 * size + 9 * tokens * net["embed_dim"] * size)


def gpu_memory_estimate(net: dict, read_voxels: int, batch_size: int = 8, bf16: bool = True,
                        foreground: float = FOREGROUND_FRACTION) -> dict:
    """Peak GPU memory of one rank running a Cellpose 4 network on a block of ``read_voxels``.

    The network step holds the weights and ``batch_size`` tiles (their input and activations);
    the mask step then holds the weights and the block's flow-following arrays.  The torch
    caching allocator reuses the first step's memory for the second, so the peak is the weights
    plus the larger of the two, plus the CUDA context.

    >>> e = gpu_memory_estimate(CPSAM_NET, 512 ** 3)
    >>> round(e["weights"] / 1e9, 2), e["batch_size"], e["peak_step"], round(e["bytes"] / 2**30, 1)
    (0.61, 8, 'masks', 7.9)
    """
    size = 2 if bf16 else 4
    weights = int(net["parameters"] * size)
    tiles = int(batch_size) * (tile_activation_bytes(net, bf16) + net["in_channels"] * net["tile"] ** 2 * 4)
    masks = int(read_voxels * (MASK_BYTES_PER_VOXEL + MASK_BYTES_PER_FOREGROUND_VOXEL * foreground))
    return {"network": net["name"], "precision": "bfloat16" if bf16 else "float32", "batch_size": int(batch_size),
            "weights": weights, "tiles": tiles, "masks": masks, "cuda_overhead": CUDA_OVERHEAD,
            "bytes": int(CUDA_OVERHEAD + weights + max(tiles, masks)),
            "peak_step": "network" if tiles >= masks else "masks", "read_voxels": int(read_voxels)}
