"""CPN verification on the target's vLLM server: the verdict tokens' log-probabilities after the step.

    verifier = RemoteVerifier(target, VerdictPrompt.for_config(target.tokenizer, config), config.calibrate)
    cpn, accepted = await verifier.score(prefix_ids, step_ids, step_text, alpha)

A verdict is one request over the prefix, the step and the verdict prompt with ``max_tokens=1`` and the
verdict tokens' log-probabilities (``logprob_token_ids``): ``cpn = sigmoid(logsumexp(P) - logsumexp(N))``
(:func:`dreamr.verify.cpn_from_logprobs`, with the fused op's rule for numbers that are not finite). The
prefix is served from the server's prefix cache, so the request prefills the step and the verdict prompt
only. With calibration the null step's verdict on the same prefix goes in flight beside it, and
``cpn = sigmoid(l - l_null)`` (:func:`dreamr.verify.head.calibrated_cpn`). A trained verdict head scores
hidden states, which a server does not return: it is in-process only.
"""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

import torch

from dreamr.backends.vllm.model import RemoteModel
from dreamr.reference import accepts_value
from dreamr.result import Metrics
from dreamr.verify import VerdictPrompt, cpn_from_logprobs
from dreamr.verify.head import calibrated_cpn

__all__ = ["RemoteVerifier"]


class RemoteVerifier:
    """The target server's verdicts on drafted steps.

    Parameters
    ----------
    target : RemoteModel, the judge
    prompt : VerdictPrompt, the verdict prompt and token sets in the target's tokens
    calibrate : bool, contextual calibration by the null step's verdict at the same prefix
    """

    def __init__(self, target: RemoteModel, prompt: VerdictPrompt, calibrate: bool = False):
        self.target, self.prompt, self.calibrate = target, prompt, bool(calibrate)

    @property
    def reserve(self) -> int:
        """Room a step leaves in the target's context for its verdict prompt (calibrating: or for the null step's
        verdict prompt at the step's prefix, whichever is longer)."""
        return max(self.prompt.reserve, len(self.prompt.null_ids()) - 1) if self.calibrate else self.prompt.reserve

    def suffix_ids(self, step_text: str) -> list[int]:
        return self.prompt.suffix_ids(step_text)

    async def raw_cpn(self, ids: Sequence[int], metrics: Optional[Metrics] = None) -> float:
        """Uncalibrated cpn at the end of ``ids [L]`` (the verdict prompt's last token is the last id)."""
        pos, neg = self.prompt.verdict_ids
        out = await self.target.client.complete(ids, max_tokens=1, logprob_token_ids=[*pos, *neg])
        if metrics is not None:
            metrics.target_requests += 1
        lp = out.logprobs or {}
        return float(cpn_from_logprobs([[lp.get(t) for t in pos]], [[lp.get(t) for t in neg]])[0])

    async def score(self, prefix_ids: Sequence[int], step_ids: Sequence[int], step_text: str, alpha: float,
                    metrics: Optional[Metrics] = None) -> tuple[float, bool]:
        """``(cpn, accepted)`` of a drafted step, accepted iff ``cpn > alpha``
        (:func:`dreamr.reference.accepts_value`; NaN, a verdict that was not finite, rejects).

        Parameters
        ----------
        prefix_ids : [P] the committed context in the target's tokens
        step_ids : [S] the drafted step in the target's tokens
        step_text : the step's text (it decides the verdict prompt's form)
        alpha : the threshold
        metrics : where the requests are counted (``target_requests``)
        """
        prefix = list(prefix_ids)
        ids = prefix + list(step_ids) + self.prompt.suffix_ids(step_text)
        if self.calibrate:
            raw, null = await asyncio.gather(self.raw_cpn(ids, metrics),
                                             self.raw_cpn(prefix + self.prompt.null_ids(), metrics))
            cpn = float(calibrated_cpn(torch.tensor([raw]), torch.tensor([null]))[0])
        else:
            cpn = await self.raw_cpn(ids, metrics)
        return cpn, accepts_value(cpn, alpha)
