"""Mode "draft": the draft model writes every step alone, unverified (the quality floor)."""

from __future__ import annotations

from dreamr.engines.single import SingleModelEngine


class DraftEngine(SingleModelEngine):
    mode = "draft"
    source = "draft"
