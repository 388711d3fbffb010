"""A thin Python face for the C++ FPSR scheduler (``torch.classes.dreamr.FpsrScheduler``).

The state machine itself lives in ``csrc/scheduler/fpsr_scheduler.h`` (rules, action encoding, epochs,
budgets); this module gives its numbers names: :class:`ActionKind`, :class:`StepEnd`, :class:`FinishReason`,
:class:`TargetLaunch` and the cancel bits are built from the tables the compiled core exports
(``FpsrScheduler.enum_values``, in ``csrc/bindings.cpp``), and :class:`Action` is a namedtuple over the
tuples that ``poll()`` returns.

    from dreamr.scheduler import Scheduler, ActionKind
    s = Scheduler(window=4, alpha=0.7)
    r = s.add_request(budget_tokens=256)
    for a in s.poll():
        if a.kind == ActionKind.LAUNCH_DRAFT: ...
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

__all__ = ["ActionKind", "StepEnd", "FinishReason", "TargetLaunch", "WORK_DRAFT", "WORK_VERIFY",
           "WORK_TARGET", "Action", "Scheduler", "enum_values"]


def _scheduler_class():
    import dreamr.ops  # noqa: F401 - loads the compiled library that registers the class

    return torch.classes.dreamr.FpsrScheduler


def enum_values(name: str) -> dict[str, int]:
    """``{member name: number}`` of one of the C++ scheduler's enums ("ActionKind", "StepEnd",
    "FinishReason", "TargetLaunch", "Work"), read from the compiled core (``csrc/bindings.cpp``)."""
    return dict(_scheduler_class().enum_values(name))


def _enum(name: str) -> type[enum.IntEnum]:
    values = enum_values(name)
    return enum.IntEnum(name, sorted(values.items(), key=lambda kv: kv[1]), module=__name__)


# The numbers are the C++ header's (csrc/scheduler/fpsr_scheduler.h), never copied here.
ActionKind = _enum("ActionKind")
ActionKind.__doc__ = "What an action asks of the executor (``Action.kind``)."
StepEnd = _enum("StepEnd")
StepEnd.__doc__ = "How a reported step ended."
FinishReason = _enum("FinishReason")
FinishReason.__doc__ = "Why a request finished (a FINISH action's ``aux``)."
TargetLaunch = _enum("TargetLaunch")
TargetLaunch.__doc__ = "When the target's fallback step is launched (``Scheduler(target_launch=...)``)."

# Bits of a CANCEL action's aux.
_WORK = enum_values("Work")
WORK_DRAFT = _WORK["WORK_DRAFT"]
WORK_VERIFY = _WORK["WORK_VERIFY"]
WORK_TARGET = _WORK["WORK_TARGET"]


class Action(NamedTuple):
    kind: ActionKind
    request: int
    slot: int
    epoch: int
    step: int
    tokens: int
    aux: int

    def __str__(self) -> str:
        return (f"{self.kind.name} r={self.request} slot={self.slot} epoch={self.epoch} step={self.step} "
                f"tokens={self.tokens} aux={self.aux}")


class Scheduler:
    """``torch.classes.dreamr.FpsrScheduler`` with :class:`Action` results; other calls pass through.

    Parameters are those of the C++ ``Config``: ``window`` (W >= 1), ``alpha`` in [0, 1],
    ``target_launch`` (:class:`TargetLaunch`), ``max_active_requests`` (0 = no limit),
    ``max_step_tokens`` (0 = no cap). Bad values raise ValueError.
    """

    def __init__(self, window: int = 4, alpha: float = 0.7, target_launch: int = TargetLaunch.EAGER,
                 max_active_requests: int = 0, max_step_tokens: int = 0):
        self._s = _scheduler_class()(int(window), float(alpha), int(target_launch), int(max_active_requests),
                                     int(max_step_tokens))

    def poll(self) -> list[Action]:
        return [Action(ActionKind(k), *rest) for k, *rest in self._s.poll()]

    def __getattr__(self, name):
        return getattr(self._s, name)
