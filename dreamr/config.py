"""``ReasonerConfig``: the settings of a reasoner and of each request (validated once, when built).

A low layer: it names the modes and checks values, and imports nothing above the verdict defaults, so
engines, the front, evaluation and training can all take it (see ``docs/architecture.md``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Optional, Union

from dreamr.verify.threshold import check_gamma, check_target_acceptance
from dreamr.verify.verdicts import DEFAULT_NEGATIVE_WORDS, DEFAULT_POSITIVE_WORDS, DEFAULT_TEMPLATE, check_alpha

__all__ = ["MODES", "VERIFIED_MODES", "DRAFT_POLICIES", "TOKEN_SPECULATION_SOURCES", "ReasonerConfig",
           "token_speculation_sources"]

# The modes, one engine each (dreamr.engines.ENGINES holds exactly these).
MODES = ("target", "draft", "speculative", "fpsr", "token")
# The modes that run both models and verify the draft's steps (their requests carry a verifier).
VERIFIED_MODES = ("speculative", "fpsr")
# draft_policy: draft every step, or stop drafting while it does not pay (dreamr.speculation.policy).
DRAFT_POLICIES = ("always", "adaptive")
# token_speculation's proposal sources (dreamr.speculation): the draft's rejected step (fallback steps
# only), n-gram lookup in the context. Written best first, joined by "+", or "off".
TOKEN_SPECULATION_SOURCES = ("step", "ngram")


def token_speculation_sources(setting: object, name: str = "token_speculation") -> tuple[str, ...]:
    """The sources a ``token_speculation`` setting names: "off" -> (), "step+ngram" -> ("step", "ngram").

    Raises ValueError naming ``name`` for anything else (an unknown or repeated source, not a string)."""
    allowed = list(TOKEN_SPECULATION_SOURCES)
    if not isinstance(setting, str) or not setting.strip():
        raise ValueError(f"{name} must be 'off' or sources from {allowed} joined by '+', got {setting!r}")
    text = setting.strip().lower()
    if text == "off":
        return ()
    sources = tuple(s.strip() for s in text.split("+"))
    if any(s not in TOKEN_SPECULATION_SOURCES for s in sources) or len(set(sources)) != len(sources):
        raise ValueError(f"{name} must be 'off' or sources from {allowed} joined by '+' (each once), got "
                         f"{setting!r}")
    return sources


def _adaptive(policy: Optional[str], mode: str, adaptive_modes: tuple[str, ...]) -> bool:
    """Whether a policy setting (None: the mode's default, "adaptive" in ``adaptive_modes``) is "adaptive"."""
    return (policy if policy is not None else "adaptive" if mode in adaptive_modes else "always") == "adaptive"


@dataclass(frozen=True)
class ReasonerConfig:
    """Settings of a reasoner; any field can also be overridden per call of ``generate``.

    Attributes
    ----------
    mode : "speculative" (draft, verify with CPN, the target writes rejected steps), "fpsr" (the same
        steps, fully parallel: a lookahead window of drafted steps, verifications and the target's
        fallback steps run together; see dreamr.engines.fpsr), "token" (the target alone with lossless
        token-level speculation: the same text as "target", fewer forwards), "target" (the target alone,
        plain decoding) or "draft" (the draft alone).
    alpha : acceptance threshold in [0, 1]: a drafted step is accepted iff cpn > alpha (paper: 0.7); or
        "auto": an online threshold that holds ``target_acceptance`` (:class:`dreamr.verify.AdaptiveAlpha`,
        carried across the requests of a reasoner; each step records the alpha it was judged with).
    target_acceptance : alpha="auto": the share of drafted steps to accept, in (0, 1) (default 0.5).
    alpha_gamma : alpha="auto": the step size of the update ``alpha += gamma * (accepted - target)``.
    calibrate : correct each verdict by the judge's verdict on a content-free step ("N/A") at the same
        prefix, ``cpn = sigmoid(l - l_null)`` (contextual calibration; the null step reuses the prefix's KV
        cache). A verdict head fitted on calibrated features calibrates whatever this says.
    verdict_head : None (the target's own Yes/No verdict), a folder written by ``python -m dreamr.calibrate
        fit``, or a :class:`dreamr.verify.VerdictHead`: the head scores the verdict position's hidden state
        instead of the LM head's verdict rows (refused with ValueError for another target).
    step_delimiter : a step ends where this appears (default a blank line).
    max_step_tokens : the largest step, in the writing model's tokens.
    max_new_tokens : the budget of committed tokens (each step counted in its writer's tokens).
    verdict_template : the verdict prompt the target reads after a step (None: the default).
    positive_words, negative_words : verdict words; their single-token forms make the CPN sets.
    answer_marker : stop after a committed step containing this text (e.g. "####"); None: no marker.
    temperature : 0 is greedy (the default); > 0 samples.
    top_p : nucleus sampling mass in (0, 1] (sampling only).
    seed : seed of the samplers (each model gets its own stream); None is nondeterministic sampling.
    window : mode "fpsr": the lookahead window W, steps open at once per request (>= 1; paper: 4).
    token_speculation : lossless token-level speculation inside the steps a model writes
        (:mod:`dreamr.speculation`): proposal sources best first, joined by "+" -- "step" (the draft's
        rejected step, in the target's fallback step) and "ngram" (lookup in the context) -- or "off"
        (one forward per token). Used by mode "token" and by modes "speculative" and "fpsr" (the target's
        fallback steps with all sources; fpsr inside its batched branch forwards); modes "target" and
        "draft" stay plain decoding (the baselines).
    draft_token_speculation : the same inside the draft's steps in modes "speculative" and "fpsr": "ngram",
        "off", or None (the default: "ngram" in-process, "off" over vLLM servers, where a server's own
        ``--speculative-config`` does it). Measured faster for modes "speculative" and "fpsr" on the 2-core
        CPU with the default pair (``docs/method.md``). "step" does not apply to the draft.
    num_speculative_tokens : most tokens per proposal (>= 1).
    draft_policy : "always" (draft every step), "adaptive" (stop drafting while the judge rejects too
        many steps to pay, probe again later: :class:`dreamr.speculation.AdaptiveDrafting`), or None: the
        mode's default ("adaptive" for "speculative" and "fpsr").
    proposal_policy : "always" (check every proposal token-level speculation makes), "adaptive" (stop
        checking a model's proposals while they emit fewer tokens than the checking forwards cost, probe
        again later: :class:`dreamr.speculation.ProposalGate`; lossless either way), or None: the mode's
        default ("adaptive" for "token", "speculative" and "fpsr").
    """

    mode: str = "speculative"
    alpha: Union[float, str] = 0.7
    step_delimiter: str = "\n\n"
    max_step_tokens: int = 128
    max_new_tokens: int = 512
    verdict_template: str = DEFAULT_TEMPLATE
    positive_words: tuple[str, ...] = DEFAULT_POSITIVE_WORDS
    negative_words: tuple[str, ...] = DEFAULT_NEGATIVE_WORDS
    answer_marker: Optional[str] = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = 0
    window: int = 4
    target_acceptance: float = 0.5
    alpha_gamma: float = 0.05
    calibrate: bool = False
    verdict_head: Any = None
    token_speculation: str = "step+ngram"
    draft_token_speculation: Optional[str] = None
    num_speculative_tokens: int = 10
    draft_policy: Optional[str] = None
    proposal_policy: Optional[str] = None

    @property
    def speculation_sources(self) -> tuple[str, ...]:
        """The sources ``token_speculation`` names (() for "off")."""
        return token_speculation_sources(self.token_speculation)

    @property
    def draft_speculation_sources(self) -> tuple[str, ...]:
        """The sources ``draft_token_speculation`` names (() for "off"; ("ngram",) for None, the default)."""
        if self.draft_token_speculation is None:
            return ("ngram",)
        return token_speculation_sources(self.draft_token_speculation, "draft_token_speculation")

    @property
    def adaptive_drafting(self) -> bool:
        """Whether drafting stops while it does not pay (``draft_policy``, or the mode's default)."""
        return _adaptive(self.draft_policy, self.mode, ("speculative", "fpsr"))

    @property
    def adaptive_proposals(self) -> bool:
        """Whether a model's proposals go unchecked while checking them does not pay (``proposal_policy``,
        or the mode's default)."""
        return _adaptive(self.proposal_policy, self.mode, ("token", "speculative", "fpsr"))

    @property
    def auto_alpha(self) -> bool:
        """alpha is "auto" (the adaptive threshold)."""
        return self.alpha == "auto"

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if not (isinstance(self.alpha, str) and self.alpha == "auto"):
            if isinstance(self.alpha, str):
                raise ValueError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
            object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "target_acceptance", check_target_acceptance(self.target_acceptance))
        object.__setattr__(self, "alpha_gamma", check_gamma(self.alpha_gamma))
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate must be True or False, got {self.calibrate!r}")
        head = self.verdict_head
        if isinstance(head, str) and head.strip().lower() in ("", "none"):
            object.__setattr__(self, "verdict_head", None)
        elif head is not None and not isinstance(head, (str, os.PathLike)) and not _is_verdict_head(head):
            raise ValueError(f"verdict_head must be None, a head folder or a dreamr.verify.VerdictHead, got "
                             f"{type(head).__name__}")
        if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
            raise ValueError(f"step_delimiter must be a non-empty string, got {self.step_delimiter!r}")
        token_speculation_sources(self.token_speculation)
        if "step" in self.draft_speculation_sources:
            raise ValueError(f"draft_token_speculation={self.draft_token_speculation!r}: 'step' proposes a rejected "
                             "drafted step to the target; the draft's own steps take 'ngram' or 'off'")
        for name in ("draft_policy", "proposal_policy"):
            value = getattr(self, name)
            if value is not None and value not in DRAFT_POLICIES:
                raise ValueError(f"{name} must be None (the mode's default) or one of {list(DRAFT_POLICIES)}, "
                                 f"got {value!r}")
        for name in ("max_step_tokens", "max_new_tokens", "window", "num_speculative_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.verdict_template, str) or not self.verdict_template.strip():
            raise ValueError(f"verdict_template must be a non-empty string, got {self.verdict_template!r}")
        for name in ("positive_words", "negative_words"):
            words = getattr(self, name)
            if isinstance(words, str) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {words!r}")
            object.__setattr__(self, name, tuple(words))
        if self.answer_marker is not None and (not isinstance(self.answer_marker, str) or not self.answer_marker):
            raise ValueError(f"answer_marker must be None or a non-empty string, got {self.answer_marker!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


def _is_verdict_head(obj: Any) -> bool:
    from dreamr.verify.head import VerdictHead
    return isinstance(obj, VerdictHead)
