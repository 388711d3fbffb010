"""Token-level speculation inside the steps a model writes (lossless; see ``docs/method.md``).

A *proposer* guesses the next tokens of the step being written at no or little cost; one forward of the
writing model over the guess checks all of it, and the compiled ops decide what is kept:
``ops.greedy_verify`` (greedy) or ``ops.speculative_sample`` (sampling, the proposal a point mass), so the
text is the model's own, token for token (greedy) or in distribution (sampling).

| file | what |
| --- | --- |
| ``ngram.py`` | n-gram lookup in the context (prompt lookup: reasoning repeats itself) |
| ``rejected_step.py`` | the draft's rejected step, re-tokenized for the target: it was written for this prefix |
| ``proposer.py`` | the proposer interface, the first-non-empty chain, and the chain for a setting's sources |
| ``writer.py`` | writing one step with proposals (the sequential engines' step writer; mode "fpsr" shares its parts) |
| ``policy.py`` | adaptive drafting: stop drafting steps while the judge rejects too many to pay |
| ``gate.py`` | token-level auto-disable: stop checking proposals while they do not pay |
| ``cost.py`` | what each kind of forward costs on this machine, measured once: the policies' units |
| ``probing.py`` | what both policies share: running means, and probing again after doubling waits |
"""

from dreamr.speculation.ngram import NgramProposer
from dreamr.speculation.cost import ForwardCost, PairCost
from dreamr.speculation.cost import measure as measure_forward_cost
from dreamr.speculation.gate import ProposalGate
from dreamr.speculation.policy import AdaptiveDrafting
from dreamr.speculation.proposer import ChainProposer, Proposer, proposer_for
from dreamr.speculation.rejected_step import RejectedStepProposer
from dreamr.speculation.writer import (accept_proposal, count_forward, proposal_verdict, propose, take_tokens,
                                      verify_proposal, write_step)

__all__ = ["NgramProposer", "RejectedStepProposer", "ChainProposer", "Proposer", "proposer_for", "AdaptiveDrafting",
           "ProposalGate", "ForwardCost", "PairCost", "measure_forward_cost", "accept_proposal", "count_forward",
           "proposal_verdict", "propose", "take_tokens", "verify_proposal", "write_step"]
