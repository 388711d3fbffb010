"""Token-level auto-disable: stop checking proposals while they do not pay, check one again later.

A checked proposal of K tokens is one forward over K + 1 tokens, ``check_cost(K)`` one-token decode
forwards (:class:`~dreamr.speculation.cost.ForwardCost`: about 1 on a GPU, where decoding is
memory-bound; 1.5 to 2.7 on the development CPU for K = 1 to 20), and it emits the accepted tokens plus one. So
it pays only where ``(accepted + 1) / check_cost(K) > 1``. Where a forward's cost grows with its tokens,
a proposer whose guesses the model seldom takes (text that does not repeat, a model that does not follow
the draft) makes every step slower than plain decoding; the gate stops that. Per model (over the requests
an engine runs) it keeps a running mean of that ratio over the checked proposals; while the mean is below
1 the next ``interval`` forwards decode plainly, then a proposal is checked again as a probe (the
interval doubles up to ``max_interval`` while probes fail, and resets once checks pay). Which forwards
check a proposal never changes the text (each check is lossless); the decisions are counted, not timed.
"""

from __future__ import annotations

from dreamr.speculation.cost import ForwardCost
from dreamr.speculation.probing import Probing, RunningMean, check_count, check_weight

__all__ = ["ProposalGate"]


class ProposalGate(Probing):
    """One model's decision, forward by forward: check a proposal, or decode plainly.

    Parameters
    ----------
    cost : ForwardCost
        The model's forward costs (what a check of K tokens costs against a plain forward).
    weight : float
        Weight of the newest check in the running mean, in (0, 1].
    max_interval : int
        Most plain forwards between two probes.

    Examples
    --------
    >>> from dreamr.speculation.cost import ForwardCost
    >>> gate = ProposalGate(ForwardCost(seconds=0.1, check=((0, 1.0), (10, 2.0)), verify=((8, 0.7), (32, 1.0))))
    >>> gate.should_propose()
    True
    >>> gate.checked(proposed=10, emitted=1)   # nothing accepted: 1 token for 2 forwards' cost
    >>> gate.should_propose(), gate.should_propose()
    (False, True)
    >>> gate.checked(proposed=10, emitted=11)  # all accepted: 11 tokens for 2 forwards' cost
    >>> gate.efficiency                        # 0.5 + 0.3 * (5.5 - 0.5): pays again
    2.0
    """

    def __init__(self, cost: ForwardCost, *, weight: float = 0.3, max_interval: int = 16):
        if not isinstance(cost, ForwardCost):
            raise ValueError(f"ProposalGate: cost must be a ForwardCost, got {type(cost).__name__}")
        weight = check_weight("ProposalGate", weight)
        super().__init__(check_count("ProposalGate", "max_interval", max_interval))
        self.cost = cost
        self._efficiency = RunningMean(None, weight)  # tokens emitted per check / the check's cost

    @property
    def efficiency(self) -> float | None:
        """The running mean of tokens emitted per check over the check's cost (None before a check)."""
        return self._efficiency.value

    def should_propose(self) -> bool:
        """Whether the next forward checks a proposal (where the proposer has one)."""
        return not self.waiting()

    def checked(self, *, proposed: int, emitted: int) -> None:
        """Record a checked proposal: ``proposed`` tokens, ``emitted`` (the accepted ones plus one)."""
        self._efficiency.update(emitted / self.cost.check_cost(proposed))
        if self.efficiency >= 1.0:
            self.paid()
        else:
            self.failed()
