"""Verification of drafted steps by the target: verdict words and token sets (:mod:`.verdicts`), the verdict
prompt in the judge's tokens and CPN from log-probabilities (:mod:`.prompt`), CPN scoring with the target's hidden state (:mod:`.verifier`), trained verdict heads and contextual
calibration (:mod:`.head`) and the adaptive threshold (:mod:`.threshold`). See ``docs/method.md``."""

from __future__ import annotations

from dreamr.verify.verdicts import (DEFAULT_NEGATIVE_WORDS, DEFAULT_POSITIVE_WORDS, DEFAULT_TEMPLATE,
                                    build_verdict_token_ids, check_alpha)
from dreamr.verify.head import NULL_STEP, VerdictHead, resolve_verdict_head, shipped_head_dir
from dreamr.verify.prompt import VerdictPrompt, cpn_from_logprobs
from dreamr.verify.threshold import AdaptiveAlpha
from dreamr.verify.verifier import StepVerifier

__all__ = [
    "DEFAULT_TEMPLATE",
    "DEFAULT_POSITIVE_WORDS",
    "DEFAULT_NEGATIVE_WORDS",
    "check_alpha",
    "build_verdict_token_ids",
    "StepVerifier",
    "VerdictHead",
    "NULL_STEP",
    "shipped_head_dir",
    "resolve_verdict_head",
    "AdaptiveAlpha",
    "VerdictPrompt",
    "cpn_from_logprobs",
]
