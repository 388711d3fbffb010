"""GRPO pieces for SAPO: group-normalised advantages, per-token log-probs, the clipped objective, KL.

All functions are pure tensor code (no models, no distributed state), so tests can check them against
hand-computed values.

Conventions
-----------
* A batch holds ``N = num_groups * G`` completions; the completions of one group are contiguous.
* Per-token tensors are ``[N, T]`` with a ``mask`` (1 for completion tokens, EOS included; 0 for padding).
* KL is the k3 estimator of KL(pi_theta || pi_ref) (Schulman, "Approximating KL divergence"):
  ``k3 = exp(ref - logp) - (ref - logp) - 1``, unbiased and >= 0 per token. It is what TRL's and
  DeepSeekMath's GRPO use.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["group_advantages", "sampling_logits", "token_logprobs", "kl_k3", "grpo_loss"]


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """``A_i = (R_i - mean(R_group)) / (std(R_group) + eps)`` for each group of ``group_size``.

    ``rewards`` is ``[N]`` with groups contiguous (``N % group_size == 0``). ``std`` is the sample
    standard deviation (Bessel-corrected, as ``torch.std``; TRL does the same). ``scale=False`` gives
    the mean-centred reward only (Dr. GRPO). A group whose rewards are all equal gets zero advantages.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages compare completions in a group), got {group_size}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    # Exactly zero for a group of equal rewards (the mean of equal floats can be off by an ulp).
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return centred.masked_fill(equal, 0.0).reshape(-1)


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """The logits of the distribution the draft samples from: divided by ``temperature``, then the
    nucleus of mass ``top_p`` kept and every other token set to ``-inf``.

    The same transform, in the same order, as ``generate(do_sample=True, temperature=..., top_p=...,
    top_k=0)`` (transformers' ``TemperatureLogitsWarper`` then ``TopPLogitsWarper``): in ascending order of
    probability, tokens whose cumulative probability is ``<= 1 - top_p`` are removed, the most probable
    token always stays. The nucleus is a discrete choice and carries no gradient; the kept logits do.

    Parameters
    ----------
    logits : Tensor ``[..., V]``
    temperature : float > 0
    top_p : float in (0, 1]; 1 keeps every token

    Returns
    -------
    Tensor ``[..., V]``, the dtype of ``logits``
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the log-probabilities of a sampling distribution), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    scaled = logits / temperature if temperature != 1.0 else logits
    if top_p >= 1.0:
        return scaled
    with torch.no_grad():
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
        remove_sorted[..., -1] = False  # the most probable token is always kept
        remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scaled.masked_fill(remove, float("-inf"))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   top_p: float = 1.0) -> torch.Tensor:
    """log-probability of each target under the sampling distribution of ``logits``.

    ``log softmax(sampling_logits(logits, temperature, top_p))[target]`` per position: ``logits [N, T, V]``,
    ``targets [N, T]`` -> ``[N, T]``. A target outside the nucleus (possible only for a policy other than
    the one that sampled it) gets ``-inf``. With the defaults it is the plain ``log softmax``.

    Computed in float32 at least (float64 stays float64), one row at a time to bound memory.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = []
    for row_logits, row_t in zip(logits, targets):
        row = torch.log_softmax(sampling_logits(row_logits.to(dtype), temperature, top_p), dim=-1)
        out.append(row.gather(-1, row_t.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1``."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    ref_logp: Optional[torch.Tensor] = None,
    loss_type: str = "token",
    num_tokens: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO objective, negated (a loss to minimise).

    Per token ``t`` of completion ``i``::

        r = exp(logp - old_logp)
        obj = min(r * A_i, clip(r, 1 - epsilon, 1 + epsilon_high) * A_i) - beta * k3(logp, ref_logp)
        loss_t = -obj

    ``loss_type="token"`` averages over all unmasked tokens of the batch (DAPO-style token-level
    averaging: every token weighs the same, long completions are not down-weighted): ``sum(loss_t *
    mask) / num_tokens``, where ``num_tokens`` defaults to ``mask.sum()``; pass the token count of the
    whole global batch to make gradient accumulation and data parallelism exact. ``"sequence"``
    averages within each completion, then over completions (the original GRPO).

    Returns ``(loss, stats)`` with ``stats`` (detached sums over unmasked tokens, so they add up across
    micro-batches): ``tokens``, ``kl_sum``, ``clipped_sum`` (tokens whose ratio was clipped, i.e. the
    clipped term was the smaller one and differed), ``ratio_sum``; and ``ratio_dev_max``, the largest
    ``|r - 1|`` over unmasked tokens (combine micro-batches with ``max``): 0 where ``old_logp`` is the
    current policy's own value, as on the first optimisation step of a batch sampled by this policy.

    Shapes: ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` ``[N, T]``; ``advantages`` ``[N]``. ``logp``
    may be ``-inf`` at a token outside the current policy's nucleus (ratio 0, no gradient); ``old_logp``
    must be finite where ``mask`` is 1 (the sampler drew those tokens).
    """
    if loss_type not in ("token", "sequence"):
        raise ValueError(f"loss_type must be 'token' or 'sequence', got {loss_type!r}")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the frozen reference model's log-probs)")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high) * adv
    obj = torch.minimum(unclipped, clipped)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    # padding may sit outside a nucleus (-inf log-probs): keep its non-finite terms out of the sums
    kl = torch.where(mask > 0, kl, torch.zeros_like(kl))
    if beta:
        obj = obj - beta * kl
    per_token = -obj
    if loss_type == "token":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype)
        loss = (per_token * mask).sum() / denom.clamp(min=1.0)
    else:
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        loss = per_seq.mean()
    with torch.no_grad():
        was_clipped = (clipped < unclipped) & (clipped != unclipped)
        stats = {
            "tokens": mask.sum(),
            "kl_sum": (kl * mask).sum(),
            "clipped_sum": (was_clipped.to(mask.dtype) * mask).sum(),
            "ratio_sum": (ratio * mask).sum(),
            "ratio_dev_max": ((ratio - 1.0).abs() * mask).max() if mask.numel() else torch.zeros((), dtype=mask.dtype),
        }
    return loss, stats
