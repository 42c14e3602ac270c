"""The run's logger: every record carries this run's rank on its communicator.

All phases log through ``mpicellpose.run`` so that a user reads one name for the whole run;
the rank comes from a context variable set by :func:`mpicellpose.runner.driver.run`, which is
correct also for in-situ runs on a sub-communicator (the world rank would not be).
"""
from __future__ import annotations

import contextvars
import logging

RANK = contextvars.ContextVar("mpicellpose_rank", default=0)


class _RankAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("rank", RANK.get())
        kwargs["extra"] = extra
        return msg, kwargs


log = _RankAdapter(logging.getLogger("mpicellpose.run"), {})
