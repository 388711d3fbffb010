"""Turning logits into tokens: greedy decoding, or temperature / top-p sampling from a seeded generator.

One :class:`Sampler` per model of a request, so one model's draws never shift the other's. Token-level
speculation (:mod:`dreamr.speculation`) reads the same sampler's distribution (:meth:`Sampler.probs`) and
random stream (:attr:`Sampler.generator`), so a speculated token is drawn from exactly the distribution
the sampler would have drawn it from.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["Sampler", "sample_rows"]


class Sampler:
    """Greedy decoding (temperature 0) or temperature / top-p sampling from a seeded generator.

    Each model has its own sampler, so with a fixed seed and ``token_speculation="off"`` alpha = 1
    reproduces the target-only text and alpha = 0 the draft-only text even when sampling (with token-level
    speculation they do in distribution: a checked proposal consumes other random numbers).

    Examples
    --------
    >>> import torch
    >>> Sampler()(torch.tensor([0.1, 2.0, -1.0]))
    1
    >>> Sampler(temperature=1.0, seed=0).probs(torch.tensor([[0.0, 0.0]]))
    tensor([[0.5000, 0.5000]])
    """

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None):
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self._generator: Optional[torch.Generator] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """The sampler's random stream on ``device`` (made from the seed on first use; None without a seed:
        torch's global stream)."""
        if self._generator is None and self.seed is not None:
            self._generator = torch.Generator(device=device).manual_seed(int(self.seed))
        return self._generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from, float32, same shape as ``logits`` (``[..., V]``):
        softmax at the temperature, restricted to the top-p nucleus and renormalised. Sampling only."""
        if self.greedy:
            raise ValueError("Sampler.probs: a greedy sampler (temperature 0) has no distribution to sample")
        weights = self._weights(logits)
        return weights / weights.sum(dim=-1, keepdim=True) if self.top_p < 1.0 else weights

    def _weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax at the temperature with the mass outside the top-p nucleus zeroed (not renormalised:
        ``torch.multinomial`` takes weights)."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > self.top_p  # keep the nucleus
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return probs

    def __call__(self, logits: torch.Tensor) -> int:
        """One token from ``logits`` ``[V]``: the argmax (ties: the lowest id), or a draw from :meth:`probs`."""
        if self.greedy:
            return int(torch.argmax(logits))
        weights = self._weights(logits)
        return int(torch.multinomial(weights, 1, generator=self.generator(weights.device)))


def sample_rows(samplers: Sequence[Sampler], logits: torch.Tensor) -> list[int]:
    """One token per row of ``logits`` ``[N, V]``, row i drawn by ``samplers[i]``. When every row is greedy
    this is one batched argmax and one device-to-host copy (a loop over rows would wait on the device N
    times); ties go to the lowest id either way."""
    if all(s.greedy for s in samplers):
        return [int(t) for t in logits.argmax(dim=-1).tolist()]
    return [s(row) for s, row in zip(samplers, logits)]
