"""SAPO rewards: ``R = w_outcome * R_outcome + w_draft * R_draft + w_length * R_length`` (docs/method.md, SAPO).

Each component is a plain callable with the signature of TRL GRPOTrainer's ``reward_funcs``::

    reward(prompts, completions, **kwargs) -> list[float]

``completions`` may be strings (TRL's "standard" format) or lists of chat messages (TRL's
"conversational" format, the last message's ``content`` is used); extra dataset columns arrive as keyword
lists with one entry per completion (the reference answer as ``answer=[...]``). They run without TRL
installed; with TRL, pass e.g. ``reward_funcs=[OutcomeReward(), DraftReward(verifier), LengthReward()]``
and ``reward_weights=[1, 1, 1]``.

Answers are read and compared by :mod:`dreamr.answers` and steps split by :func:`dreamr.steps.split_steps`,
the library's own, which evaluation and the reasoner use too; a step is accepted by
:func:`dreamr.reference.accepts_value`, the kernels' rule.

:func:`reward_funcs` gives the three components and their weights for ``trl.GRPOTrainer``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional, Sequence

from dreamr.answers import answers_match, extract_answer
from dreamr.reference import accepts_value
from dreamr.steps import split_steps

__all__ = [
    "completion_text",
    "prompt_text",
    "OutcomeReward",
    "DraftReward",
    "LengthReward",
    "SAPOReward",
    "check_weights",
    "reward_funcs",
]

# --------------------------------------------------------------------------------------------------
# Text helpers (answers and steps come from the library: dreamr.answers, dreamr.steps)
# --------------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or (TRL conversational) a list of messages -> last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        last = completion[-1]
        if isinstance(last, dict):
            return str(last.get("content", ""))
    raise ValueError(f"completions: expected a string or a list of chat messages, got {type(completion).__name__}")


def prompt_text(prompt: Any) -> str:
    """The question of a prompt: a string, or (chat) the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        for msg in reversed(list(prompt)):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return str(msg.get("content", ""))
        if prompt and isinstance(prompt[-1], dict):
            return str(prompt[-1].get("content", ""))
    raise ValueError(f"prompts: expected a string or a list of chat messages, got {type(prompt).__name__}")


def _check_len(name: str, values, n: int) -> list:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} completions")
    return values


def _reference_answers(kwargs: dict, n: int) -> list:
    for key in ("answer", "answers", "solution", "ground_truth", "reference"):
        if key in kwargs and kwargs[key] is not None:
            return _check_len(key, kwargs[key], n)
    raise ValueError("OutcomeReward needs the reference answers as answer=[...] (one per completion)")


# --------------------------------------------------------------------------------------------------
# Reward components
# --------------------------------------------------------------------------------------------------


class OutcomeReward:
    """1.0 when the completion's final answer equals the reference answer, else 0.0.

    TRL signature: ``OutcomeReward()(prompts, completions, answer=[...])``; ``answer`` entries may be a
    GSM8K solution (``... #### 72``) or a bare number.
    """

    __name__ = "outcome_reward"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        refs = _reference_answers(kwargs, len(completions))
        return [1.0 if answers_match(extract_answer(completion_text(c)), r) else 0.0
                for c, r in zip(completions, refs)]


class LengthReward:
    """A penalty in [-1, 0] for reasoning beyond a budget of steps and of tokens.

    ``R_length = -(min(1, excess_steps / max_steps) + min(1, excess_tokens / max_tokens)) / 2`` where
    ``excess = max(0, count - budget)``; 0 within budget, -1 at twice the budget or more on both. Token
    counts come from ``completion_ids`` (TRL passes it) or ``tokenizer`` when given, else from
    whitespace-separated words.
    """

    __name__ = "length_reward"

    def __init__(self, max_steps: int = 8, max_tokens: int = 256, tokenizer=None, delimiter: str = "\n\n"):
        for name, v in (("max_steps", max_steps), ("max_tokens", max_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.max_steps, self.max_tokens = max_steps, max_tokens
        self.tokenizer, self.delimiter = tokenizer, delimiter

    def penalty(self, n_steps: int, n_tokens: int) -> float:
        es = max(0, n_steps - self.max_steps) / self.max_steps
        et = max(0, n_tokens - self.max_tokens) / self.max_tokens
        return -(min(1.0, es) + min(1.0, et)) / 2.0

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        ids = kwargs.get("completion_ids")
        if ids is not None:
            ids = _check_len("completion_ids", ids, len(completions))
        out = []
        for i, c in enumerate(completions):
            text = completion_text(c)
            if ids is not None:
                n_tok = len(ids[i])
            elif self.tokenizer is not None:
                n_tok = len(self.tokenizer.encode(text, add_special_tokens=False))
            else:
                n_tok = len(text.split())
            out.append(self.penalty(len(split_steps(text, self.delimiter)), n_tok))
        return out


class DraftReward:
    """How well the target accepts the completion's steps under CPN (in [0, 1]).

    ``mode="fraction"`` (default): the fraction of steps the target accepts at ``alpha``
    (:func:`dreamr.reference.accepts_value`: ``cpn > alpha`` in float32, as the kernels decide);
    ``mode="mean"``: the mean cpn. A completion without steps scores 0; a NaN verdict counts as rejected
    (0 in the mean).

    Parameters
    ----------
    scorer : training.scoring.StepScorer, a dreamr.verify.StepVerifier, or any object with
        ``score(question, steps, images=None) -> list[float]``
        The judge. A StepVerifier is wrapped in a :class:`training.scoring.StepScorer`, which judges each
        step in the reasoner's context (the question as chat messages with the system prompt, through
        the target's chat template; then the previous steps; then the verdict prompt).
    alpha : acceptance threshold (defaults to ``scorer.alpha``).
    delimiter : the step delimiter.
    """

    __name__ = "draft_reward"

    def __init__(self, scorer, alpha: Optional[float] = None, mode: str = "fraction", delimiter: str = "\n\n"):
        if mode not in ("fraction", "mean"):
            raise ValueError(f"mode must be 'fraction' or 'mean', got {mode!r}")
        from dreamr.verify import StepVerifier, check_alpha

        if isinstance(scorer, StepVerifier):
            from training.scoring import StepScorer

            scorer = StepScorer(scorer)
        if not callable(getattr(scorer, "score", None)):
            raise ValueError(f"scorer must have score(question, steps, images=None) (a training.scoring.StepScorer "
                             f"or a dreamr.verify.StepVerifier), got {type(scorer).__name__}")
        self.scorer = scorer
        self.alpha = check_alpha(getattr(scorer, "alpha", 0.7) if alpha is None else alpha)
        self.mode, self.delimiter = mode, delimiter
        self.last_cpns: list[list[float]] = []  # per completion, the cpn of each step (for logging)

    def scores(self, question: str, steps: list[str], images=None) -> list[float]:
        """cpn of each step after ``question`` and the steps before it (``images``: what the target sees)."""
        if not steps:
            return []
        if images:
            return list(self.scorer.score(question, steps, images=images))
        return list(self.scorer.score(question, steps))

    def reduce(self, cpns: Sequence[float]) -> float:
        if not cpns:
            return 0.0
        if self.mode == "fraction":
            return sum(1.0 for c in cpns if accepts_value(c, self.alpha)) / len(cpns)
        return sum(0.0 if math.isnan(c) else c for c in cpns) / len(cpns)

    def __call__(self, prompts, completions, images=None, **kwargs) -> list[float]:
        """``images``: optional, per completion None or the images the target sees with the prompt."""
        prompts = _check_len("prompts", prompts, len(completions))
        images = [None] * len(completions) if images is None else _check_len("images", images, len(completions))
        out, self.last_cpns = [], []
        for p, c, imgs in zip(prompts, completions, images):
            steps = split_steps(completion_text(c), self.delimiter)
            cpns = self.scores(prompt_text(p), steps, imgs)
            self.last_cpns.append(cpns)
            out.append(self.reduce(cpns))
        return out


def check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(w_outcome, w_draft, w_length)``: three finite numbers >= 0, not all zero."""
    weights = tuple(weights)
    if len(weights) != 3 or not all(isinstance(w, Real) and not isinstance(w, bool) and math.isfinite(w)
                                    and w >= 0 for w in weights):
        raise ValueError(f"weights must be three finite numbers >= 0 (outcome, draft, length), got {weights!r}")
    if not any(w > 0 for w in weights):
        raise ValueError(f"weights are all zero {weights!r}: the reward would be constant and nothing would train")
    return tuple(float(w) for w in weights)


class SAPOReward:
    """The SAPO reward ``w1 * R_outcome + w2 * R_draft + w3 * R_length`` (default weights 1:1:1).

    ``components(prompts, completions, **kw)`` returns each component's list; ``__call__`` the weighted
    sum (TRL signature). A component whose weight is zero is not computed (so a zero draft weight never
    runs the target).
    """

    __name__ = "sapo_reward"

    def __init__(self, outcome: OutcomeReward, draft: Optional[DraftReward], length: LengthReward,
                 weights: Sequence[float] = (1.0, 1.0, 1.0)):
        self.weights = check_weights(weights)
        if draft is None and self.weights[1] > 0:
            raise ValueError("weights: the draft weight is > 0 but no DraftReward (target verifier) was given")
        self.outcome, self.draft, self.length = outcome, draft, length

    def components(self, prompts, completions, **kwargs) -> dict[str, list[float]]:
        n = len(completions)
        w1, w2, w3 = self.weights
        return {
            "outcome": self.outcome(prompts, completions, **kwargs) if w1 > 0 else [0.0] * n,
            "draft": self.draft(prompts, completions, **kwargs) if w2 > 0 else [0.0] * n,
            "length": self.length(prompts, completions, **kwargs) if w3 > 0 else [0.0] * n,
        }

    def combine(self, comps: dict[str, list[float]]) -> list[float]:
        w1, w2, w3 = self.weights
        return [w1 * o + w2 * d + w3 * l for o, d, l in zip(comps["outcome"], comps["draft"], comps["length"])]

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.combine(self.components(prompts, completions, **kwargs))


def reward_funcs(scorer=None, *, alpha: float = 0.7, mode: str = "fraction", length_max_steps: int = 8,
                 length_max_tokens: int = 192, delimiter: str = "\n\n", weights: Sequence[float] = (1.0, 1.0, 1.0),
                 tokenizer=None) -> tuple[list, list[float]]:
    """SAPO's rewards as ``trl.GRPOTrainer`` takes them: ``(reward_funcs, reward_weights)``.

    Each function has TRL's signature ``f(prompts, completions, **kwargs) -> list[float]`` (standard or
    conversational completions; the dataset's ``answer`` column arrives as ``answer=[...]``, TRL's
    ``completion_ids`` give the token counts). Pass them as ``GRPOTrainer(reward_funcs=funcs, ...)`` with
    ``GRPOConfig(reward_weights=weights)``; TRL's weighted sum is then SAPO's ``R``. A zero draft weight
    leaves the draft reward out (no target runs).

    Parameters
    ----------
    scorer : StepScorer or StepVerifier, optional
        The judge (required where the draft weight is > 0).
    alpha, mode : the draft reward's threshold and reduction (:class:`DraftReward`).
    length_max_steps, length_max_tokens, delimiter, tokenizer : the length penalty (:class:`LengthReward`).
    weights : (w_outcome, w_draft, w_length).
    """
    w = check_weights(weights)
    if w[1] > 0 and scorer is None:
        raise ValueError("scorer is missing: the draft reward (weights[1] > 0) needs the target's verifier; set the "
                         "draft weight to 0 to train without it")
    funcs, out_w = [OutcomeReward()], [w[0]]
    if w[1] > 0:
        funcs.append(DraftReward(scorer, alpha=alpha, mode=mode, delimiter=delimiter))
        out_w.append(w[1])
    funcs.append(LengthReward(length_max_steps, length_max_tokens, tokenizer=tokenizer, delimiter=delimiter))
    out_w.append(w[2])
    return funcs, out_w
