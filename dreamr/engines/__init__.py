"""The engines, one per mode; all take requests and return results (see :class:`base.Engine`)."""

from __future__ import annotations

from dreamr.engines.base import Engine, LM, Request
from dreamr.engines.draft import DraftEngine
from dreamr.engines.fpsr import FpsrEngine
from dreamr.engines.speculative import SpeculativeEngine
from dreamr.engines.target import TargetEngine

ENGINES: dict[str, type[Engine]] = {
    "target": TargetEngine,
    "draft": DraftEngine,
    "speculative": SpeculativeEngine,
    "fpsr": FpsrEngine,
}

__all__ = ["ENGINES", "Engine", "LM", "Request", "TargetEngine", "DraftEngine", "SpeculativeEngine", "FpsrEngine"]
