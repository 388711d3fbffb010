"""Plain PyTorch references for dreamr's compiled ops.

These are the definitions the compiled kernels are tested against: short, obviously right and slow.
They take the same arguments as the ops in :mod:`dreamr.ops` (but do little input checking) and return
the same outputs. Nothing in the library calls the op references on a hot path; :func:`accepts` and
:func:`accepts_value` are the exception: they are the library's acceptance rule in Python (the mirror of
``dreamr::accepts`` in ``csrc/include/dreamr/common.h``), used wherever Python decides on a cpn.
"""

from __future__ import annotations

import math
import struct
from typing import Optional, Sequence

import torch


def round_to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (as C++'s ``static_cast<float>``), returned as a Python float.

    Out-of-range values become +-inf and NaN stays NaN, as in the cast; the ops receive alpha as a double
    and narrow it this way before comparing.
    """
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(x))[0]
    except OverflowError:  # |x| above the largest float32: the C cast gives an infinity
        return math.copysign(math.inf, x)


_FLOAT32 = struct.Struct("f")


def accepts(cpn: torch.Tensor, alpha: float) -> torch.Tensor:
    """The threshold rule shared by every op: ``cpn > alpha`` in float32, with the ends exact.

    Mirrors ``dreamr::accepts`` in ``csrc/include/dreamr/common.h``: the kernels compare their float32 cpn
    with alpha narrowed to float32, so a float32 cpn of 0.85 does not pass alpha 0.85 (in double it would:
    round_to_float32(0.85) = 0.8500000238...). alpha >= 1 rejects every step (also a cpn that rounded to 1, or any
    value above 1), alpha <= 0 accepts every finite verdict (also one whose cpn underflowed to 0), and a NaN
    cpn (non-finite verdict logits) is always rejected.

    Parameters
    ----------
    cpn : Tensor, any shape
        Scores; narrowed to float32 first (the kernels compute in float64 for float64 inputs, then store
        float32 and decide on that).
    alpha : float
        The threshold.

    Returns
    -------
    Tensor, cpn's shape, bool
    """
    cpn = cpn.float()
    threshold = round_to_float32(alpha)
    finite = ~torch.isnan(cpn)
    if threshold >= 1.0:
        return torch.zeros_like(finite)
    if threshold <= 0.0:
        return finite
    return finite & (cpn > threshold)  # a float32 tensor against a float32-exact scalar: compared in float32


def accepts_value(cpn: float, alpha: float) -> bool:
    """:func:`accepts` for one Python number: the decision the kernel takes on this cpn at this alpha.

    Every Python caller that thresholds a scalar cpn (SAPO's rewards, evaluation, metrics) uses this
    instead of ``cpn > alpha``, which compares in double and so accepts a float32 cpn equal to alpha.

    Parameters
    ----------
    cpn : float
        A score (a Python float, or anything ``float()`` takes: a NumPy scalar, a one-element tensor).
    alpha : float
        The threshold.

    Returns
    -------
    bool
        ``round_to_float32(cpn) > round_to_float32(alpha)``; False for a NaN cpn and for alpha >= 1, True for any non-NaN cpn
        where alpha <= 0.
    """
    value, threshold = round_to_float32(float(cpn)), round_to_float32(float(alpha))
    if math.isnan(value) or threshold >= 1.0:
        return False
    return threshold <= 0.0 or value > threshold


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


def kv_compact(
    cache: Sequence[torch.Tensor],
    src_rows: torch.Tensor,
    columns: torch.Tensor,
    counts: torch.Tensor,
) -> None:
    """Reference compaction, one layer at a time: a gather from a copy of each layer taken before the
    writes (what the in-place kernels must equal under the order rules); see :func:`dreamr.ops.kv_compact`."""
    src_rows, columns, counts = (torch.as_tensor(t).long().cpu() for t in (src_rows, columns, counts))
    longest = int(counts.max()) if counts.numel() else 0  # past it the caller crops; left untouched
    for layer in cache:
        original = layer.clone()
        for i in range(src_rows.numel()):
            n = int(counts[i])
            layer[i, :, :n] = original[int(src_rows[i]), :, columns[i, :n].to(layer.device)]
            layer[i, :, n:longest] = 0


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
