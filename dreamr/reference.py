"""Plain PyTorch references for dreamr's compiled ops.

These are the definitions the compiled kernels are tested against: short, obviously right and slow.
They take the same arguments as the ops in :mod:`dreamr.ops` (but do little input checking) and return
the same outputs. Nothing in the library calls them on a hot path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def accepts(cpn: torch.Tensor, alpha: float) -> torch.Tensor:
    """The threshold rule shared by every op: ``cpn > alpha``, with the ends exact.

    alpha = 0 accepts every finite verdict (also one whose cpn underflowed to 0), alpha = 1 rejects every
    step, and a NaN cpn (non-finite verdict logits) is always rejected.
    """
    finite = ~torch.isnan(cpn)
    if alpha <= 0.0:
        return finite
    return finite & (cpn > alpha)


def cpn_verify(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: Optional[torch.Tensor],
    positive_ids: Sequence[int],
    negative_ids: Sequence[int],
    alpha: float,
    logit_softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference CPN verification; see :func:`dreamr.ops.cpn_verify`."""
    pos = torch.as_tensor(list(positive_ids), dtype=torch.long, device=hidden.device)
    neg = torch.as_tensor(list(negative_ids), dtype=torch.long, device=hidden.device)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(acc)

    def verdict_logits(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = h @ lm_head_weight[ids].to(acc).T  # [B, len(ids)]
        if lm_head_bias is not None:
            logits = logits + lm_head_bias[ids].to(acc)
        finite = torch.isfinite(logits).all(dim=1)  # before capping: tanh maps +-inf to +-cap
        if logit_softcap > 0.0:
            logits = torch.tanh(logits / logit_softcap) * logit_softcap
        return logits, finite

    (lp, finite_p), (ln, finite_n) = verdict_logits(pos), verdict_logits(neg)
    finite = finite_p & finite_n
    cpn = torch.sigmoid(torch.logsumexp(lp, dim=1) - torch.logsumexp(ln, dim=1)).float()
    cpn = torch.where(finite, cpn, torch.full_like(cpn, float("nan")))
    return cpn, accepts(cpn, alpha)


def cpn_verify_naive(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: Optional[torch.Tensor],
    positive_ids: Sequence[int],
    negative_ids: Sequence[int],
    alpha: float,
    logit_softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPN the way a model's forward would give it: full LM head, softmax over the vocab, gather.

    Kept as the benchmark baseline (it materialises ``[B, V]``); equal to :func:`cpn_verify` up to
    rounding.
    """
    logits = torch.nn.functional.linear(hidden, lm_head_weight, lm_head_bias).float()  # [B, V]
    if logit_softcap > 0.0:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    probs = torch.softmax(logits, dim=-1)
    s_pos = probs[:, list(positive_ids)].sum(dim=1)
    s_neg = probs[:, list(negative_ids)].sum(dim=1)
    cpn = s_pos / (s_pos + s_neg)
    return cpn, accepts(cpn, alpha)


def cpn_window_accept(
    cpn: torch.Tensor, valid: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference window acceptance; see :func:`dreamr.ops.cpn_window_accept`."""
    accept = accepts(cpn.float(), alpha) & valid  # [R, W]
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # leading run of accepted slots
    return num_accepted, accept


def kv_rollback(
    cache: Sequence[torch.Tensor],
    lengths: torch.Tensor,
    copy_src_row: Optional[torch.Tensor] = None,
    copy_src_start: Optional[torch.Tensor] = None,
    copy_length: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference step-level rollback, one layer and one row at a time; see :func:`dreamr.ops.kv_rollback`."""
    lengths = lengths.long().cpu()
    batch = lengths.numel()
    new_lengths = lengths.clone()
    if copy_src_row is not None:
        src_row, src_start, n_copy = (t.long().cpu() for t in (copy_src_row, copy_src_start, copy_length))
        new_lengths = torch.where(src_row >= 0, lengths + n_copy, lengths)
    longest = int(new_lengths.max()) if batch else 0  # past it the caller crops; left untouched
    for layer in cache:
        original = layer.clone()  # copies read the cache as it was before the call
        for b in range(batch):
            start = int(lengths[b])
            if copy_src_row is not None and int(src_row[b]) >= 0:
                s, a, n = int(src_row[b]), int(src_start[b]), int(n_copy[b])
                layer[b, :, start : start + n] = original[s, :, a : a + n]
                start += n
            layer[b, :, start:longest] = 0
    return new_lengths


def speculative_sample(
    draft_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference chain speculative sampling (Leviathan et al. 2023) with explicit uniforms.

    ``uniforms[:, :K]`` decide acceptance of each draft token (accept iff ``u * q(x) < p(x)``, i.e.
    with probability ``min(1, p/q)``), ``uniforms[:, K]`` draws the one extra token by inverse CDF from the
    residual ``norm(max(0, p - q))`` at the first rejection, or from ``p`` at position K when all K were
    accepted (the bonus token). See :func:`dreamr.ops.speculative_sample`.
    """
    batch, k = draft_ids.shape
    tokens = torch.full((batch, k + 1), -1, dtype=torch.long)
    num_accepted = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        n = 0
        while n < k:
            x = int(draft_ids[b, n])
            p, q = float(target_probs[b, n, x]), float(draft_probs[b, n, x])
            if float(uniforms[b, n]) * q < p:
                tokens[b, n] = x
                n += 1
            else:
                break
        if n < k:
            dist = (target_probs[b, n].double() - draft_probs[b, n].double()).clamp_min(0)
            if float(dist.sum()) <= 0.0:  # p == q exactly: the residual is empty, fall back to p
                dist = target_probs[b, n].double()
        else:
            dist = target_probs[b, k].double()
        tokens[b, n] = inverse_cdf(dist, float(uniforms[b, k]))
        num_accepted[b] = n
    return tokens.to(draft_ids.device), num_accepted.to(draft_ids.device)


def inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """Smallest index i with cumsum(weights)[i] > u * sum(weights), skipping zero-weight entries."""
    cdf = torch.cumsum(weights.double(), dim=0)
    target = u * float(cdf[-1])
    idx = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True)[0])
    idx = min(idx, weights.numel() - 1)
    while float(weights[idx]) <= 0.0 and idx > 0:  # u == 1 - eps can land past the last positive weight
        idx -= 1
    return idx


def greedy_verify(draft_ids: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference greedy token verification; see :func:`dreamr.ops.greedy_verify`."""
    batch, k = draft_ids.shape
    target_argmax = target_logits.argmax(dim=-1)  # [B, K+1]
    tokens = torch.full((batch, k + 1), -1, dtype=torch.long, device=draft_ids.device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=draft_ids.device)
    for b in range(batch):
        n = 0
        while n < k and int(draft_ids[b, n]) == int(target_argmax[b, n]):
            tokens[b, n] = draft_ids[b, n]
            n += 1
        tokens[b, n] = target_argmax[b, n]
        num_accepted[b] = n
    return tokens, num_accepted
