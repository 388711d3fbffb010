"""The proposer interface, the chain that asks proposers best first, and the setting that names them.

A proposer guesses the next tokens of the step being written; it never runs a model. The setting
``token_speculation`` of :class:`dreamr.config.ReasonerConfig` names the sources, best first, joined by
"+" ("step+ngram", the default), or "off" (parsed by ``dreamr.config.token_speculation_sources``).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

from dreamr.speculation.ngram import NgramProposer
from dreamr.speculation.rejected_step import RejectedStepProposer

__all__ = ["Proposer", "ChainProposer", "proposer_for"]


class Proposer(Protocol):
    name: str

    def propose(self, context: Sequence[int], step: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``context`` (the model's whole sequence so far, ending with
        ``step``, the tokens of the step being written); empty: no guess."""
        ...


class ChainProposer:
    """Ask ``proposers`` in order; the first non-empty proposal is used."""

    name = "chain"

    def __init__(self, proposers: Sequence[Proposer]):
        self.proposers = list(proposers)

    def propose(self, context: Sequence[int], step: Sequence[int], k: int) -> list[int]:
        for p in self.proposers:
            found = p.propose(context, step, k)
            if found:
                return found
        return []


def proposer_for(sources: Sequence[str], rejected_step: Optional[Sequence[int]] = None) -> Optional[ChainProposer]:
    """The chain of ``sources`` (``ReasonerConfig.speculation_sources``, best first) for one step; "step"
    joins only where a ``rejected_step`` (the drafted step in the writing model's tokens) is given.
    None: no proposer."""
    chain: list[Proposer] = []
    for s in sources:
        if s == "step" and rejected_step is not None:
            chain.append(RejectedStepProposer(rejected_step))
        elif s == "ngram":
            chain.append(NgramProposer())
    return ChainProposer(chain) if chain else None
