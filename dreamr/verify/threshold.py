"""An adaptive acceptance threshold: ``alpha="auto"`` holds a requested step acceptance rate online.

Adaptive conformal inference (Gibbs and Candes 2021; see ``docs/method.md``, calibrating the verdict)
toward a target acceptance rate ``rho``: after each verified step,

    alpha_{t+1} = clip(alpha_t + gamma * (accepted_t - rho), 0, 1)

An accepted step raises the bar, a rejected one lowers it, so whatever the judge's bias (a judge that
says "Yes" to everything, or "No"), the long-run acceptance rate is ``rho``: over ``T`` steps it is
within ``(1 + gamma) / (gamma * T)`` of ``rho`` for any sequence of verdicts, because alpha stays in
[0, 1] (alpha 0 accepts every finite verdict, 1 rejects every step). One controller is carried across
the requests of a batch or an evaluation, so the operating point learnt on earlier requests is kept.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

__all__ = ["AdaptiveAlpha", "check_target_acceptance", "check_gamma"]


def check_target_acceptance(value, name: str = "target_acceptance") -> float:
    """``value`` as a float, or ValueError naming ``name`` unless it lies strictly inside (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1) (the share of drafted steps to accept), got {value!r}")
    return float(value)


def check_gamma(value, name: str = "alpha_gamma") -> float:
    """``value`` as a float, or ValueError naming ``name`` unless it lies in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) \
            or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the step size of the alpha update), got {value!r}")
    return float(value)


class AdaptiveAlpha:
    """The online threshold rule ``alpha_{t+1} = clip(alpha_t + gamma * (accepted_t - rho), 0, 1)``.

    Parameters
    ----------
    target_acceptance : float in (0, 1)
        ``rho``, the acceptance rate to hold.
    gamma : float in (0, 1]
        The step size (default 0.05): larger follows a changing judge faster and jitters more.
    start : float in [0, 1], optional
        The first alpha (default 0.5).

    Attributes
    ----------
    alpha : float
        The threshold the next step is judged with.
    steps, accepted : int
        Verdicts seen and accepted so far.
    history : list of float
        The alpha each verdict was taken at, in the order the verdicts were reported.
    """

    def __init__(self, target_acceptance: float, gamma: float = 0.05, start: Optional[float] = None):
        from dreamr.verify.verdicts import check_alpha

        self.target_acceptance = check_target_acceptance(target_acceptance)
        self.gamma = check_gamma(gamma)
        self.alpha = 0.5 if start is None else check_alpha(start, "alpha_start")
        self.steps = 0
        self.accepted = 0
        self.history: list[float] = []

    def update(self, accepted: bool, at: Optional[float] = None) -> float:
        """Record a verdict and move alpha; returns the alpha the verdict was taken at.

        ``at``: that alpha where it is not the current one (mode "fpsr" judges a window of steps at once
        and reports each verdict when its step is resolved: a delayed update, which keeps the rate
        guarantee, since that rests only on alpha staying in [0, 1])."""
        used = self.alpha if at is None else float(at)
        self.history.append(used)
        self.steps += 1
        self.accepted += bool(accepted)
        self.alpha = min(1.0, max(0.0, self.alpha + self.gamma * (float(bool(accepted)) - self.target_acceptance)))
        return used

    @property
    def acceptance_rate(self) -> Optional[float]:
        """Accepted over verified so far (None before the first verdict)."""
        return self.accepted / self.steps if self.steps else None

    def state(self) -> dict:
        return {"target_acceptance": self.target_acceptance, "gamma": self.gamma, "alpha": self.alpha,
                "steps": self.steps, "accepted": self.accepted}

    def __repr__(self) -> str:
        return (f"AdaptiveAlpha(target_acceptance={self.target_acceptance}, gamma={self.gamma}, alpha={self.alpha:.4f}, "
                f"steps={self.steps}, accepted={self.accepted})")
