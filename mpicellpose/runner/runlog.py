"""The run's logger: every record carries this run's rank on its communicator.

All phases log through ``mpicellpose.run`` so that a user reads one name for the whole run;
the rank comes from a context variable set by :func:`mpicellpose.runner.driver.run`, which is
correct also for in-situ runs on a sub-communicator (the world rank would not be).

And library chatter that tells a user nothing is silenced for the length of a run.

Torch warns from inside Cellpose's mask finding on every block (``torch.sparse_coo_tensor``:
"Sparse invariant checks are implicitly disabled"), torch's TorchScript deprecation warnings
come with importing Cellpose, and Cellpose logs every stage (and its tqdm bars) at INFO.  None
of it is something a user can act on.  :func:`quiet_libraries` is installed by
:func:`mpicellpose.runner.driver.run` around the whole run and puts everything back afterwards, so an
in-situ host (a notebook, a workflow engine) keeps its own warning filters and logger levels.
Our own warnings and the libraries' errors are untouched.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings

RANK = contextvars.ContextVar("mpicellpose_rank", default=0)


class _RankAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("rank", RANK.get())
        kwargs["extra"] = extra
        return msg, kwargs


log = _RankAdapter(logging.getLogger("mpicellpose.run"), {})


# --------------------------------------------------------------------------- library chatter
#: (category, regular expression matched against the start of the message)
FILTERS = (
    # torch, inside Cellpose's dynamics.get_masks_torch, once per block
    (UserWarning, r"Sparse invariant checks are implicitly disabled"),
    # torch >= 2.x: TorchScript is deprecated (Cellpose's networks still use script_method)
    (DeprecationWarning, r"`torch\.jit\.[a-z_]+` is (deprecated|not supported)"),
    (FutureWarning, r"`torch\.jit\.[a-z_]+` is (deprecated|not supported)"),
    # torch.load in Cellpose 3 on torch versions that still default to weights_only=False
    (FutureWarning, r"You are using `torch\.load` with `weights_only=False`"),
)

#: loggers whose INFO messages (stage timings, tqdm bars through Cellpose's TqdmToLogger) only
#: repeat what our progress line says; their warnings and errors still show
CHATTY_LOGGERS = ("cellpose",)


class RankFormatter(logging.Formatter):
    """The command line's line format: time, rank (the process's world rank when the record has
    none), level, logger, message.  Used by the CLI and by the library calls' progress lines."""

    def __init__(self, rank: int):
        super().__init__("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.rank = rank

    def format(self, record):
        if not hasattr(record, "rank"):
            record.rank = self.rank
        return super().format(record)


@contextlib.contextmanager
def quiet_libraries():
    """Filter :data:`FILTERS` and raise :data:`CHATTY_LOGGERS` to WARNING while inside;
    the caller's warning filters and logger levels are restored on the way out."""
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for category, message in FILTERS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for lg in loggers:
            if lg.getEffectiveLevel() < logging.WARNING:
                lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
