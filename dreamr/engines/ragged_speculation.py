"""Token-level speculation over the rows of a :class:`~dreamr.engines.ragged.RaggedBatch`: FPSR's batched
decode forwards (its fallback branches and draft steps) decide, take and cut every row's tokens here.

One forward feeds each row its pending token and, where it has one, a proposal
(:meth:`RaggedBatch.next_token_logits`, logits at every fed position, packed row after row);
:func:`decide` reads every row's tokens from it, :func:`take` hands them to the row's step writer, and
:func:`cut_rows` drops the rejected proposed tokens of every row with one ``kv_rollback`` call
(docs/method.md, token-level speculation).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dreamr.engines.ragged import RaggedBatch, Row, host_to_device
from dreamr.sampling import Sampler, sample_rows
from dreamr.speculation import proposal_verdict, take_tokens
from dreamr.steps import StepWriter

__all__ = ["cut_rows", "decide", "take"]


def decide(samplers: Sequence[Sampler], proposals: Sequence[list], logits: torch.Tensor) -> list:
    """Each row's tokens from one batched decode forward: ``(tokens, accepted)`` per row.

    ``logits`` is packed as :meth:`RaggedBatch.next_token_logits` returns it (row i's ``len(proposals[i])
    + 1`` rows after the previous rows'). A row with a proposal is decided by
    :func:`dreamr.speculation.proposal_verdict` (``ops.greedy_verify`` / ``ops.speculative_sample``, as
    :func:`~dreamr.speculation.accept_proposal` in the sequential modes), one without by its sampler. When
    every row is greedy the whole pass is read from the device once (its argmaxes and verdicts together);
    sampled rows draw as their samplers do."""
    if not any(proposals):
        return [([t], 0) for t in sample_rows(samplers, logits)]
    (ids,) = host_to_device(logits.device, torch.tensor([[t for p in proposals for t in p]], dtype=torch.long))
    greedy = all(s.greedy for s in samplers)
    parts = [logits.argmax(dim=-1)] if greedy else []  # [N]: the plain rows' tokens
    plain, at, start = {}, 0, 0
    for i, (sampler, proposal) in enumerate(zip(samplers, proposals)):
        k = len(proposal)
        if k:
            tokens, accepted = proposal_verdict(sampler, ids[:, start:start + k], logits[at:at + k + 1])
            parts += [tokens[0], accepted]
            start += k
        elif not greedy:
            plain[i] = sampler(logits[at])
        at += k + 1
    values = torch.cat(parts).tolist()  # one device read for every verdict of the pass
    out, at, read = [], 0, len(logits) if greedy else 0
    for i, proposal in enumerate(proposals):
        k = len(proposal)
        if k:
            n = values[read + k + 1]
            out.append((values[read:read + n + 1], n))
            read += k + 2
        else:
            out.append(([int(values[at])] if greedy else [plain[i]], 0))
        at += k + 1
    return out


def take(row: Row, writer: StepWriter, proposal: list, tokens: list) -> tuple[int, Optional[tuple]]:
    """Hand a row's decided ``tokens`` to its step's ``writer`` until the step ends (tokens past its end
    are dropped: FPSR keeps no carry); ``row`` (its ids already extended by ``proposal``, all of it
    cached) then stands for its prefix plus the step.

    Returns the number of tokens the writer took (EOS included) and, where a proposal was fed, the cut
    for :func:`cut_rows`: ``(row, n, ids)``, the row's ids to keep and its cache cut to ``n`` (the
    rejected proposed tokens dropped, the step's last token left pending, as after a plain decode)."""
    base = len(row.ids) - len(proposal)
    kept, rest = take_tokens(writer, tokens)
    taken = len(tokens) - len(rest)
    if not proposal:
        row.ids.extend(kept)
        return taken, None
    ids = row.ids[:base] + kept  # kept[:accepted] is proposal[:accepted], cached at these positions
    return taken, (row, max(len(ids) - 1, row.floor), ids)


def cut_rows(batch: RaggedBatch, cuts: list) -> None:
    """Apply :func:`take`'s cuts of one pass: one :meth:`RaggedBatch.truncate_rows` call, then each
    row's kept ids (the token after its cache, if any, pending)."""
    if not cuts:
        return
    batch.truncate_rows([(row, n) for row, n, _ in cuts])
    for row, _, ids in cuts:
        row.ids = ids
