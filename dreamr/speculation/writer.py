"""Writing one step, token by token or by verified proposals: every engine's one step writer.

    while the step has not ended (delimiter, EOS, cap):
        tokens = carry (verified earlier, past the previous step's end), else
        proposal = proposer(context, step so far, k)         # no model run; none while the gate is closed
        if proposal:  logits = model(pending + proposal)      # one forward, [K + 1, V]
                      tokens = greedy_verify / speculative_sample(proposal, logits)  # accepted + 1
        else:         tokens = [sample(model(pending))]       # plain decoding
        the step takes tokens until it ends; what is left over is carried to the next step

Losslessness: greedy_verify keeps a proposed token only where it is the argmax (ties to the lowest id, as
:class:`~dreamr.sampling.Sampler`), and speculative_sample with a point-mass proposal keeps ``x`` with
probability ``p(x)`` and otherwise draws from ``p`` without ``x``, renormalised: exactly ``p``. So the
text is the model's own, token for token (greedy, up to the last bits of batched arithmetic) or in
distribution (sampling).
"""

from __future__ import annotations

from typing import Optional

import torch

from dreamr import ops
from dreamr.cache import CachedSequence
from dreamr.lm import LM
from dreamr.result import Metrics
from dreamr.sampling import Sampler
from dreamr.speculation.gate import ProposalGate
from dreamr.speculation.proposer import Proposer
from dreamr.steps import StepWriter

__all__ = ["accept_proposal", "count_forward", "proposal_verdict", "propose", "take_tokens", "verify_proposal",
           "write_step"]


def propose(proposer: Optional[Proposer], context: list[int], writer: StepWriter, num_speculative_tokens: int,
            gate: Optional[ProposalGate] = None) -> list[int]:
    """The proposal to check next for the step ``writer`` tracks (empty: decode one token plainly).

    A proposal of K tokens emits up to K + 1, so K stays below the step's room left
    (``writer.max_tokens - len(writer.ids)``): every fed position lies inside the step's cap (and so
    inside the model's context, which the cap respects). ``context`` is the writing model's whole
    sequence, ending with the step so far. A closed ``gate`` (:class:`ProposalGate`; its turn is counted
    off) proposes nothing; :func:`count_forward` reports a checked proposal to it.
    """
    if gate is not None and not gate.should_propose():
        return []
    k = min(num_speculative_tokens, writer.max_tokens - len(writer.ids) - 1) if proposer is not None else 0
    return proposer.propose(context, writer.ids, k)[:k] if k > 0 else []


def accept_proposal(sampler: Sampler, proposal: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
    """Decide a proposal from the model's logits over it: the tokens it emits and how many it accepted.

    Parameters
    ----------
    sampler : Sampler
        Greedy: ``ops.greedy_verify``; else ``ops.speculative_sample`` on the sampler's distribution and
        random stream (the proposal a point mass).
    proposal : list of int, length K >= 1
    logits : torch.Tensor, shape ``[K + 1, V]``
        Row i predicts the token after the context plus ``proposal[:i]``.

    Returns
    -------
    tokens : list of int, length ``accepted + 1``
        ``proposal[:accepted]`` then the model's own token (the correction, or the bonus token).
    accepted : int, in ``[0, K]``
    """
    ids = torch.tensor([proposal], dtype=torch.long, device=logits.device)  # [1, K]
    tokens, accepted = proposal_verdict(sampler, ids, logits)
    n = int(accepted[0])
    return tokens[0, :n + 1].tolist(), n


def proposal_verdict(sampler: Sampler, ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`accept_proposal` without reading the device (a batched caller reads many verdicts at once).

    Parameters
    ----------
    sampler : Sampler
    ids : torch.Tensor, shape ``[1, K]``, int64, on ``logits``'s device
        The proposal.
    logits : torch.Tensor, shape ``[K + 1, V]``

    Returns
    -------
    tokens : torch.Tensor, shape ``[1, K + 1]``, int64
        The accepted tokens, then the model's own token; what follows them is padding.
    accepted : torch.Tensor, shape ``[1]``, int64
    """
    if ids.dim() != 2 or ids.shape[0] != 1 or logits.shape[0] != ids.shape[1] + 1:
        raise ValueError(f"proposal_verdict: logits {tuple(logits.shape)} for proposal ids {tuple(ids.shape)}; give "
                         "ids [1, K] and the K + 1 logits after the context and after each proposed token")
    if sampler.greedy:
        return ops.greedy_verify(ids, logits[None])
    p = sampler.probs(logits)[None]  # [1, K + 1, V]
    q = torch.zeros(1, ids.shape[1], p.shape[-1], dtype=p.dtype, device=p.device)
    q.scatter_(-1, ids[..., None], 1.0)  # a deterministic proposal: a point mass on each token
    return ops.speculative_sample(q, ids, p, generator=sampler.generator(p.device))


def verify_proposal(seq: CachedSequence, sampler: Sampler, proposal: list[int]) -> tuple[list[int], int]:
    """One forward of ``seq``'s model over ``proposal``, decided by :func:`accept_proposal`; the tokens it
    emits and how many it accepted.

    Parameters
    ----------
    seq : CachedSequence
        The writing model's sequence; its cache holds ``proposal`` afterwards (the caller rolls back).
    sampler : Sampler
    proposal : list of int, length K >= 1

    Returns
    -------
    tokens : list of int, length ``accepted + 1``
    accepted : int, in ``[0, K]``
    """
    return accept_proposal(sampler, proposal, seq.logits_over(proposal))  # logits [K + 1, V]


def count_forward(metrics: Optional[Metrics], role: str, proposal: list[int], accepted: int = 0,
                  gate: Optional[ProposalGate] = None) -> None:
    """Count one forward spent writing a step of ``role`` ("target" or "draft") in ``metrics`` (None:
    nothing): ``<role>_step_forwards``, and where it checked a ``proposal``, ``<role>_proposals``,
    ``<role>_proposed_tokens`` and ``<role>_accepted_tokens`` (vLLM's definitions; see
    :class:`dreamr.result.Metrics`). A checked proposal is also reported to ``gate``: it emitted the
    accepted tokens plus one."""
    if gate is not None and proposal:
        gate.checked(proposed=len(proposal), emitted=accepted + 1)
    if metrics is None:
        return
    counts = {"step_forwards": 1}
    if proposal:
        counts.update(proposals=1, proposed_tokens=len(proposal), accepted_tokens=accepted)
    for name, n in counts.items():
        field = f"{role}_{name}"
        setattr(metrics, field, getattr(metrics, field) + n)


def take_tokens(writer: StepWriter, tokens: list[int]) -> tuple[list[int], list[int]]:
    """Hand decided ``tokens`` to the step ``writer`` tracks until the step ends.

    Returns ``(kept, rest)``: the tokens that join the model's sequence (those the writer took, a final EOS
    left out) and those past the step's end (``len(tokens) - len(rest)`` were taken)."""
    for i, token in enumerate(tokens):
        end = writer.add(token)
        if end is not None:
            return tokens[:i] if end == "eos" else tokens[:i + 1], tokens[i + 1:]
    return list(tokens), []


def write_step(seq: CachedSequence, lm: LM, sampler: Sampler, delimiter: str, max_tokens: int, *,
               proposer: Optional[Proposer] = None, num_speculative_tokens: int = 0,
               carry: Optional[list[int]] = None, metrics: Optional[Metrics] = None,
               role: str = "target", gate: Optional[ProposalGate] = None) -> StepWriter:
    """Let ``lm`` write one step onto ``seq`` until the delimiter, EOS or the cap.

    Parameters
    ----------
    seq : CachedSequence
        The model's sequence; the step's tokens (without a final EOS) are appended to ``seq.ids`` and the
        last one stays pending (the cache never holds a token past the committed ones).
    lm, sampler, delimiter, max_tokens : the model, its sampler, the step delimiter and the step cap.
    proposer : Proposer, optional
        Guesses checked by one forward each (at most ``num_speculative_tokens`` tokens per guess); None
        or ``num_speculative_tokens = 0``: one forward per token.
    carry : list of int, optional
        Tokens the model already emitted past the previous step's end on this very prefix: they are taken
        first, without a forward; tokens emitted past this step's end are left in it (in place). Drop it
        whenever the sequence changes under it (another model's step committed).
    metrics, role : where to count forwards and proposals: ``metrics.<role>_step_forwards``,
        ``<role>_proposals``, ``<role>_proposed_tokens``, ``<role>_accepted_tokens`` (role "target" or
        "draft").
    gate : ProposalGate, optional
        Decides, forward by forward, whether a proposal is checked at all (the request's gate for this
        model, kept across its steps); None: every proposal is checked.

    Returns
    -------
    StepWriter
        With ``ids``, ``text`` and ``end`` ("delimiter", "eos" or "cap").
    """
    writer = StepWriter(lm.tokenizer, lm.eos_ids, delimiter, max_tokens)
    pending = carry if carry is not None else []
    while writer.end is None:
        verified = False
        if pending:
            tokens = pending[:]
            pending.clear()
        else:
            # [] with no room, no k or the gate closed
            proposal = propose(proposer, seq.ids, writer, num_speculative_tokens, gate)
            verified, accepted = bool(proposal), 0
            if verified:
                tokens, accepted = verify_proposal(seq, sampler, proposal)
            else:
                tokens = [sampler(seq.next_logits())]
            count_forward(metrics, role, proposal, accepted, gate)
        kept, rest = take_tokens(writer, tokens)
        seq.extend(kept)
        pending.extend(rest)
        if verified:  # the cache holds the whole proposal: keep the committed tokens, the last one pending
            seq.uncache_to(max(len(seq.ids) - 1, seq.min_cached))
    return writer
