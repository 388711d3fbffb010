"""A thin Python face for the C++ FPSR scheduler (``torch.classes.dreamr.FpsrScheduler``).

The state machine itself lives in ``csrc/scheduler/fpsr_scheduler.h`` (rules, action encoding, epochs,
budgets); this module only names its numbers: :class:`ActionKind`, :class:`StepEnd`,
:class:`FinishReason`, :class:`TargetLaunch`, the cancel bits, and an :class:`Action` namedtuple over the
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
           "WORK_TARGET", "Action", "Scheduler"]


class ActionKind(enum.IntEnum):
    LAUNCH_DRAFT = 0
    LAUNCH_VERIFY = 1
    LAUNCH_TARGET = 2
    CANCEL = 3
    COMMIT_DRAFT = 4
    COMMIT_TARGET = 5
    FINISH = 6


class StepEnd(enum.IntEnum):
    NONE = 0
    EOS = 1
    ANSWER_MARKER = 2


class FinishReason(enum.IntEnum):
    NONE = 0
    EOS = 1
    ANSWER_MARKER = 2
    BUDGET = 3
    ABORTED = 4


class TargetLaunch(enum.IntEnum):
    EAGER = 0
    ON_REJECT = 1


# Bits of a CANCEL action's aux.
WORK_DRAFT = 1
WORK_VERIFY = 2
WORK_TARGET = 4


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


def _scheduler_class():
    import dreamr.ops  # noqa: F401 - loads the compiled library that registers the class

    return torch.classes.dreamr.FpsrScheduler


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
