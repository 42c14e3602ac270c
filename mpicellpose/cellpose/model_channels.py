"""How many input channels a model segments, and the check that the input's channels fit it.

A multi-channel input given to a one-channel model does not fail inside Cellpose: Cellpose 3 takes
the first two channels as cytoplasm and nucleus, a nuclear model trained on one channel then sees
nothing it knows, and the run ends with no object after all the GPU-hours.  So the channel count is
checked against the model at plan time, before anything heavy runs, and a mismatch is refused with
the option that resolves it (``--channel``).
"""
from __future__ import annotations

import logging

from ..errors import InputError

log = logging.getLogger("mpicellpose")

#: Cellpose 3 built-ins trained on one channel (nuclear stains); the others take cytoplasm + nucleus.
ONE_CHANNEL_BUILTINS = frozenset({"nuclei", "bact_fluor_cp3", "bact_phase_cp3", "deepbacs_cp3"})


def model_channels(resolved, cellpose_major) -> tuple | None:
    """(fewest, most) input channels the resolved model segments, None when not known (a custom file).

    >>> model_channels({"name": "demo", "kind": "path"}, 3), model_channels({"name": "cpsam"}, 4)
    ((1, 1), (1, 3))
    """
    res = resolved or {}
    name, loader = str(res.get("name") or ""), res.get("loader")
    if name == "demo" or name.startswith(("demo_nuclei", "demo_cp4")):
        return (1, 1)  # the shipped nuclear demo models (Cellpose 3 and the Cellpose 4 stand-in)
    if name.startswith("demo_cyto2ch") or loader == "cp3-small-cpnet":
        return (1, 2)
    if res.get("kind") == "builtin" or name in ONE_CHANNEL_BUILTINS:
        if name in ONE_CHANNEL_BUILTINS:
            return (1, 1)
        return (1, 3) if (cellpose_major or 0) >= 4 else (1, 2)
    if (cellpose_major or 0) >= 4:
        return (1, 3)  # Cellpose 4 takes the first three channels in order
    return None


def check_channels(n_channels: int, resolved, cellpose_major, *, chosen, cellpose_channels, what, axes,
                   channel_axis) -> None:
    """Refuse an input whose channel count does not fit the model, unless the user chose the channels.

    ``chosen``: ``--channel`` was given; ``cellpose_channels``: Cellpose 3's own ``channels`` eval
    argument was given (the user mapped the channels themselves).
    """
    if n_channels <= 1 or cellpose_channels:
        return
    fits = model_channels(resolved, cellpose_major)
    name = (resolved or {}).get("name") or "the model"
    where = f"{what} has {n_channels} channels (axis {channel_axis} of {','.join(a.upper() for a in axes)})"
    if fits is not None and n_channels > fits[1]:
        if chosen:
            raise InputError(f"--channel chose {n_channels} channels but {name} segments "
                             f"{'one channel' if fits[1] == 1 else f'at most {fits[1]}'}: give "
                             f"{'one channel, e.g. --channel 0' if fits[1] == 1 else f'at most {fits[1]}'}")
        hint = ("--channel 0 (or the index of the channel to segment)" if fits[1] == 1 else
                "--channel C,N (cytoplasm, nucleus) or --channel C")
        raise InputError(f"{where} but {name} segments {'one channel' if fits[1] == 1 else f'up to {fits[1]}'}: "
                         f"choose with {hint}; without it the model would see channels it was not trained on and "
                         f"find nothing")
    if fits is None and not chosen:
        if n_channels > 2:
            raise InputError(f"{where}; a Cellpose 3 model takes at most two (cytoplasm, nucleus): choose them "
                             f"with --channel C,N, or one with --channel C")
        log.info("%s; %s gets channel 0 as cytoplasm and channel 1 as nucleus (give --channel to choose)",
                 where, name)
