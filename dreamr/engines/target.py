"""Mode "target": the target model writes every step alone (the baseline every speedup is measured against)."""

from __future__ import annotations

from dreamr.engines.single import SingleModelEngine


class TargetEngine(SingleModelEngine):
    mode = "target"
    source = "target"
