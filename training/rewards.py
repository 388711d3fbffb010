"""SAPO rewards: ``R = w_outcome * R_outcome + w_draft * R_draft + w_length * R_length`` (METHOD.md, section 3).

Each component is a plain callable with the signature of TRL GRPOTrainer's ``reward_funcs``::

    reward(prompts, completions, **kwargs) -> list[float]

``completions`` may be strings (TRL's "standard" format) or lists of chat messages (TRL's
"conversational" format, the last message's ``content`` is used); extra dataset columns arrive as keyword
lists with one entry per completion (the reference answer as ``answer=[...]``). They run without TRL
installed; with TRL, pass e.g. ``reward_funcs=[OutcomeReward(), DraftReward(verifier), LengthReward()]``
and ``reward_weights=[1, 1, 1]``.

The answer extraction used by training and by evaluation lives here, in one place:
:func:`extract_answer` and :func:`answers_match`.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from numbers import Real
from typing import Any, Callable, Optional, Sequence

__all__ = [
    "extract_answer",
    "normalize_number",
    "answers_match",
    "split_steps",
    "completion_text",
    "prompt_text",
    "OutcomeReward",
    "DraftReward",
    "LengthReward",
    "SAPOReward",
    "check_weights",
]

# --------------------------------------------------------------------------------------------------
# Answer extraction (shared with evaluation)
# --------------------------------------------------------------------------------------------------

# A number: optional sign, optional currency, digits with optional thousands commas, optional decimals,
# then optionally a decimal exponent ("1e3", "2.5E-4") or a fraction bar with an integer denominator
# ("3/4"; not a date such as "3/4/2020", whose parts stay separate numbers).
_NUM_CORE = (r"(?:[-\u2212]?\s*\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-\u2212]?\s*\$?\s*\.\d+)"
             r"(?:[eE][-+]?\d+(?!\w|\.\d))?")
_NUM = rf"(?:(?<![/\d.]){_NUM_CORE}/\d+(?!/|\d|\.\d)|{_NUM_CORE})"
_NUM_RE = re.compile(_NUM)
_HASH_RE = re.compile(r"####\s*(" + _NUM + r")")
_PHRASE_RE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:=]?\s*(?:\\boxed\{)?\s*(" + _NUM + r")",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\boxed\{\s*(" + _NUM + r")")


def normalize_number(text: str) -> Optional[str]:
    """Canonical form of a number written as text: no sign noise, currency, commas or trailing zeros.

    ``"$1,234.50"`` -> ``"1234.5"``, ``"-18.00"`` -> ``"-18"``, ``"\u22123"`` -> ``"-3"``, ``".5"`` ->
    ``"0.5"``, ``"1e3"`` -> ``"1000"``, ``"3/4"`` -> ``"0.75"`` (a fraction is divided out; one that does
    not terminate keeps 28 significant digits, so ``"1/3"`` matches ``"2/6"`` but not ``"0.33"``).
    Returns None when ``text`` is not a number (or is a fraction over zero).
    """
    if text is None:
        return None
    s = str(text).strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
    s = s.rstrip(".")  # "18." at the end of a sentence
    if not s:
        return None
    num, bar, den = s.partition("/")
    try:
        d = Decimal(num)
        if bar:
            q = Decimal(den)
            if not q.is_finite() or q == 0:
                return None
            d = d / q
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d.adjusted() > 60:  # too large to write out digit by digit: canonical scientific form
        return str(d.normalize())
    if d == d.to_integral_value():
        return str(int(d))
    out = format(d.normalize(), "f")
    return out


def extract_answer(text: Optional[str]) -> Optional[str]:
    """The final numeric answer in ``text``, normalised by :func:`normalize_number`, or None.

    In order of preference: the last GSM8K marker ``#### N``; the last ``\\boxed{N}``; the last
    "answer is N" / "answer: N" phrase; otherwise the last number in the text. Handles ``$18.00``,
    ``1,234``, negatives and decimals: ``"#### 18"``, ``"The answer is 18."`` and ``"$18.00"`` all give
    ``"18"``.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    for regex in (_HASH_RE, _BOXED_RE, _PHRASE_RE):
        found = regex.findall(text)
        if found:
            value = normalize_number(found[-1])
            if value is not None:
                return value
    found = _NUM_RE.findall(text)
    for candidate in reversed(found):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def answers_match(pred: Optional[str], ref: Optional[str]) -> bool:
    """True when ``pred`` and ``ref`` are the same number.

    Each side may be a bare number (``"18"``, ``"18.00"``, ``"$1,234"``) or a text with an answer in it
    (a GSM8K solution ending ``#### 18``); it is normalised by :func:`extract_answer`. None or text
    without a number never matches.
    """
    a, b = extract_answer(pred), extract_answer(ref)
    if a is None or b is None:
        return False
    return Decimal(a) == Decimal(b)


# --------------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------------


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    """Split reasoning into steps at ``delimiter``; each step keeps its trailing delimiter.

    Pieces that are only whitespace are merged into the step before them (a step is never blank).
    ``"a\\n\\nb\\n\\n\\n\\nc"`` -> ``["a\\n\\n", "b\\n\\n\\n\\n", "c"]``.
    """
    if not isinstance(text, str) or not text.strip():
        return []
    steps: list[str] = []
    pieces = text.split(delimiter)
    for i, piece in enumerate(pieces):
        chunk = piece if i == len(pieces) - 1 else piece + delimiter
        if not piece.strip():
            if steps:
                steps[-1] += chunk
            continue
        steps.append(chunk)
    return steps


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

    ``mode="fraction"`` (default): the fraction of steps with ``cpn > alpha``; ``mode="mean"``: the mean
    cpn. A completion without steps scores 0; a NaN verdict counts as rejected (0 in the mean).

    Parameters
    ----------
    verifier : dreamr.verify.StepVerifier, or any object with ``score(prompt, steps) -> list[float]``
        or ``score_steps(prompt: str, steps) -> list[float]``.
    alpha : acceptance threshold (defaults to ``verifier.alpha``).
    target_prompt : callable(question) -> str, optional
        The text the target reads before the steps (default ``"Question: {q}\\nAnswer:"``, which is
        what dreamr's plain chat template gives the base gemma-3-270m). The verifier's own
        ``score_steps`` adds the tokenizer's special tokens (BOS).
    """

    __name__ = "draft_reward"

    def __init__(self, verifier, alpha: Optional[float] = None, mode: str = "fraction",
                 target_prompt: Optional[Callable[[str], str]] = None, delimiter: str = "\n\n"):
        if mode not in ("fraction", "mean"):
            raise ValueError(f"mode must be 'fraction' or 'mean', got {mode!r}")
        if not (hasattr(verifier, "score_steps") or hasattr(verifier, "score")):
            raise ValueError("verifier must have score_steps(prompt, steps) (a dreamr.verify.StepVerifier)")
        from dreamr.verify import check_alpha

        self.verifier = verifier
        self.alpha = check_alpha(getattr(verifier, "alpha", 0.7) if alpha is None else alpha)
        self.mode, self.delimiter = mode, delimiter
        self.target_prompt = target_prompt or (lambda q: f"Question: {q}\nAnswer:")
        self.last_cpns: list[list[float]] = []  # per completion, the cpn of each step (for logging)

    def scores(self, prompt: str, steps: list[str], images=None) -> list[float]:
        if not steps:
            return []
        if images:  # the row's images, for a target that sees them (StepVerifier.score_steps(images=...))
            return list(self.verifier.score_steps(prompt, steps, images=images))
        if hasattr(self.verifier, "score"):
            return list(self.verifier.score(prompt, steps))
        return list(self.verifier.score_steps(prompt, steps))

    def reduce(self, cpns: Sequence[float]) -> float:
        if not cpns:
            return 0.0
        if self.mode == "fraction":
            return sum(1.0 for c in cpns if not math.isnan(c) and c > self.alpha) / len(cpns)
        return sum(0.0 if math.isnan(c) else c for c in cpns) / len(cpns)

    def __call__(self, prompts, completions, images=None, **kwargs) -> list[float]:
        """``images``: optional, per completion None or the images the target sees with the prompt."""
        prompts = _check_len("prompts", prompts, len(completions))
        images = [None] * len(completions) if images is None else _check_len("images", images, len(completions))
        out, self.last_cpns = [], []
        for p, c, imgs in zip(prompts, completions, images):
            steps = split_steps(completion_text(c), self.delimiter)
            cpns = self.scores(self.target_prompt(prompt_text(p)), steps, imgs)
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
