"""What both adaptive policies share: running means, and probing with doubling waits.

Adaptive drafting (:mod:`~dreamr.speculation.policy`, step by step) and the proposal gate
(:mod:`~dreamr.speculation.gate`, forward by forward) each keep running means of what their choice costs,
and where it does not pay they stop for ``interval`` turns, then try once more as a probe: the interval
doubles up to ``max_interval`` while probes fail and resets once the choice pays again.
"""

from __future__ import annotations

__all__ = ["RunningMean", "Probing", "check_weight", "check_count"]


def check_weight(owner: str, weight: object) -> float:
    """``weight`` as a float in (0, 1]; ValueError naming ``owner`` otherwise."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 < weight <= 1.0:
        raise ValueError(f"{owner}: weight must be in (0, 1], got {weight!r}")
    return float(weight)


def check_count(owner: str, name: str, value: object) -> int:
    """``value`` as an integer >= 1; ValueError naming ``owner`` and ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
    return value


class RunningMean:
    """Exponential moving average; ``value`` is ``prior`` until the first update (None: the first value
    observed, for costs, which have no neutral value)."""

    def __init__(self, prior: float | None, weight: float):
        self.value, self.weight = prior, weight

    def update(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


class Probing:
    """Stop for ``interval`` turns where a choice does not pay, then probe it again.

    Attributes
    ----------
    interval : int
        Turns to wait at the next failure (1, 2, 4, ... up to ``max_interval``).
    skip : int
        Turns left to wait before the next probe.
    switches : int
        Times the choice went off (for metrics and tests).
    """

    def __init__(self, max_interval: int):
        self.max_interval = max_interval
        self.interval, self.skip, self.switches = 1, 0, 0

    def waiting(self) -> bool:
        """Whether this turn waits (it is counted off), else the choice is tried."""
        if self.skip > 0:
            self.skip -= 1
            return True
        return False

    def paid(self) -> None:
        """The choice paid: the next failure waits one turn again."""
        self.interval = 1

    def failed(self, *, hopeless: bool = False) -> None:
        """The choice did not pay: wait ``interval`` turns (``max_interval`` at once where ``hopeless``),
        and twice as long after the next failure."""
        if hopeless:
            self.interval = self.max_interval
        self.skip = self.interval
        self.interval = min(2 * self.interval, self.max_interval)
        self.switches += 1
