"""The engines, one per mode; all take requests and return results (see :class:`base.Engine`)."""

from __future__ import annotations

from dreamr.config import MODES
from dreamr.engines.base import Engine
from dreamr.engines.draft import DraftEngine
from dreamr.engines.fpsr import FpsrEngine
from dreamr.engines.speculative import SpeculativeEngine
from dreamr.engines.target import TargetEngine
from dreamr.engines.token import TokenEngine

ENGINES: dict[str, type[Engine]] = {
    "target": TargetEngine,
    "draft": DraftEngine,
    "speculative": SpeculativeEngine,
    "fpsr": FpsrEngine,
    "token": TokenEngine,
}
if tuple(ENGINES) != MODES:  # the config validates modes against MODES: the two lists are one
    raise ImportError(f"dreamr.engines: ENGINES {tuple(ENGINES)} and dreamr.config.MODES {MODES} differ")

__all__ = ["ENGINES", "Engine", "TargetEngine", "DraftEngine", "SpeculativeEngine", "FpsrEngine", "TokenEngine"]
