"""Adaptive drafting: stop drafting steps while the judge rejects too many of them to pay, probe again later.

Drafting a step pays only where enough drafted steps are accepted: a rejected step costs the drafted
step, its verification and the target's own step in series. The policy keeps running estimates (over the
requests an engine runs at one threshold: a request has few steps to learn from) of the acceptance and of
each kind of step's cost, in the target's one-token forwards
(:class:`~dreamr.speculation.cost.ForwardCost`, measured once per machine; the decisions are counted from
the run, not timed, so within a run the same text gives the same decisions):

    drafting, per committed token:  (D + V + (1 - a) * F) / (a * L_draft + (1 - a) * L_fallback)
    target alone, per token:        A / L_alone

with ``a`` the running step acceptance, ``D`` a drafted step's cost (the draft's forwards, priced at the
draft's cost relative to the target's), ``V`` its verification, ``F`` and ``A`` the cost of a step the
target writes after a rejection and alone (with token-level speculation either way), and ``L`` tokens per
step of each kind. While drafting costs more, the target writes steps alone; after ``interval`` such
steps one step is drafted again as a probe (the interval doubles up to ``max_interval`` while probes keep
failing, and resets once drafting pays again). Where drafting would cost more even if every step were
accepted, ``(D + V) / L_draft >= A / L_alone``, no acceptance can make it pay and the policy waits
``max_interval`` steps at once. Where every drafted step is accepted there is no target-written step to
weigh drafting against, so after ``price_alone_after`` of them the target writes one step alone to price
it (an accepting judge with a draft that writes slower than the target with token-level speculation is
otherwise never noticed). At a fixed alpha >= 1, where no verdict can accept, no step is drafted at all.
Greedy output at alpha = 1 does not change: every step is the target's either way (vLLM users know this
as speculative decoding's "auto-disable").
"""

from __future__ import annotations

from dreamr.speculation.probing import Probing, RunningMean, check_count, check_weight

__all__ = ["AdaptiveDrafting"]


class AdaptiveDrafting(Probing):
    """The decision, step by step, over the requests at one threshold: draft the next step, or let the
    target write it alone.

    Costs are in the target's one-token decode forwards (see :class:`~dreamr.speculation.cost.ForwardCost`;
    the engine prices each step before reporting it).

    Parameters
    ----------
    weight : float
        Weight of the newest observation in each running estimate, in (0, 1]. A request has few steps, so
        the default reacts at once from the neutral prior (one rejection at a hopeless cost turns drafting
        off) but does not drop drafting after one rejection among accepted steps.
    max_interval : int
        Most target-alone steps between two probes.
    price_alone_after : int
        Drafted steps after which, while no step written by the target has been seen (every drafted step
        accepted), the target writes one step alone to price the alternative.
    accepts_nothing : bool
        The threshold rejects every verdict (a fixed alpha >= 1): never draft.

    Examples
    --------
    >>> policy = AdaptiveDrafting()
    >>> policy.should_draft()
    True
    >>> policy.drafted(accepted=False, draft_cost=12.0, draft_tokens=20, verify_cost=1.0, fallback_cost=9.0,
    ...                fallback_tokens=20)
    >>> policy.should_draft()   # even accepted, a drafted step would cost more than the target's own
    False
    >>> policy.skip             # so no acceptance can pay: the next probe waits max_interval steps
    15
    """

    def __init__(self, *, weight: float = 0.3, max_interval: int = 16, price_alone_after: int = 2,
                 accepts_nothing: bool = False):
        weight = check_weight("AdaptiveDrafting", weight)
        super().__init__(check_count("AdaptiveDrafting", "max_interval", max_interval))
        self.price_alone_after = check_count("AdaptiveDrafting", "price_alone_after", price_alone_after)
        self._unweighed = 0  # drafted steps since the start with no target-written step to weigh them against
        self.acceptance = RunningMean(0.5, weight)  # neutral prior: the first verdict decides
        # the costs are read only once observed (a drafted step before any decision, a fallback or a step
        # alone before it is weighed)
        self.draft_step_cost, self.draft_step_tokens = RunningMean(None, weight), RunningMean(None, weight)
        self.verify_step_cost = RunningMean(None, weight)
        self.fallback_step_cost, self.fallback_step_tokens = RunningMean(None, weight), RunningMean(None, weight)
        self.alone_step_cost, self.alone_step_tokens = RunningMean(None, weight), RunningMean(None, weight)
        # a fixed alpha >= 1 rejects every verdict (dreamr::accepts): no drafted step can be kept, so none is
        # drafted (the text is the target's either way)
        self.accepts_nothing = bool(accepts_nothing)

    def should_draft(self) -> bool:
        """Whether the next step is drafted (and verified) or written by the target alone (a step alone is
        counted off the wait)."""
        return not (self.accepts_nothing or self.waiting())

    def drafts_next(self) -> bool:
        """What :meth:`should_draft` would answer now, counting nothing off (mode "fpsr" tells its
        scheduler ahead of the step, and counts the step off once it is opened)."""
        return not (self.accepts_nothing or self.skip > 0)

    def drafting_cost(self, acceptance: float | None = None) -> float | None:
        """Expected cost per committed token while drafting, at the running acceptance (or ``acceptance``);
        None before a drafted step is recorded, or below acceptance 1 before a target-written one is."""
        a = self.acceptance.value if acceptance is None else acceptance
        target = self._target_step(prefer_alone=False)
        if self.draft_step_cost.value is None or (a < 1.0 and target is None):
            return None
        cost = self.draft_step_cost.value + self.verify_step_cost.value
        tokens = a * self.draft_step_tokens.value
        if a < 1.0:
            cost += (1.0 - a) * target[0]
            tokens += (1.0 - a) * target[1]
        return cost / max(tokens, 1e-9)

    def alone_cost(self) -> float | None:
        """Expected cost per committed token with the target alone; None before the target wrote a step."""
        target = self._target_step(prefer_alone=True)
        return None if target is None else target[0] / max(target[1], 1e-9)

    def _target_step(self, prefer_alone: bool) -> tuple[float, float] | None:
        """(cost, tokens) of a step the target writes, as observed: a fallback step or a step alone (the
        kind asked for where both were seen; they are written the same way, a fallback step with the
        rejected step as its first proposal)."""
        fallback = (self.fallback_step_cost.value, self.fallback_step_tokens.value)
        alone = (self.alone_step_cost.value, self.alone_step_tokens.value)
        fallback, alone = (x if x[0] is not None else None for x in (fallback, alone))  # (None: not seen yet)
        return (alone or fallback) if prefer_alone else (fallback or alone)

    def drafted(self, *, accepted: bool, draft_cost: float, draft_tokens: int, verify_cost: float,
                fallback_cost: float = 0.0, fallback_tokens: int = 0) -> None:
        """Record a drafted step's outcome: its cost and tokens, its verification's cost, and where it was
        rejected the target's fallback step's cost and tokens."""
        self.acceptance.update(1.0 if accepted else 0.0)
        self.draft_step_cost.update(draft_cost)
        self.draft_step_tokens.update(max(draft_tokens, 1))
        self.verify_step_cost.update(verify_cost)
        if not accepted:
            self.fallback_step_cost.update(fallback_cost)
            self.fallback_step_tokens.update(max(fallback_tokens, 1))
        alone = self.alone_cost()
        if alone is None:  # every step accepted so far: nothing the target wrote to weigh drafting against
            self._unweighed += 1
            if self._unweighed >= self.price_alone_after:
                self.skip = 1  # the target writes the next step alone, to price it
            return
        if self.drafting_cost() < alone:
            self.paid()
        else:  # no acceptance pays where even acceptance 1 does not: probe seldom
            self.failed(hopeless=self.drafting_cost(acceptance=1.0) >= alone)

    def alone(self, *, cost: float, tokens: int) -> None:
        """Record a step the target wrote alone: its cost and its tokens."""
        self.alone_step_cost.update(cost)
        self.alone_step_tokens.update(max(tokens, 1))
