"""The verdict prompt in a judge's tokens: what the target reads after a step, and which tokens answer it.

Tokenizer work only, no model: the in-process verifier (:class:`dreamr.verify.StepVerifier`, which scores
the verdict position's hidden state) and the remote one (:mod:`dreamr.backends.vllm.verifier`, which scores
a server's log-probabilities) both build their prompts here, so the two send the same tokens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from dreamr.verify.head import NULL_STEP
from dreamr.verify.verdicts import (DEFAULT_NEGATIVE_WORDS, DEFAULT_POSITIVE_WORDS, DEFAULT_TEMPLATE,
                                    build_verdict_token_ids)

if TYPE_CHECKING:  # for the annotation only: the config imports dreamr.verify
    from dreamr.config import ReasonerConfig

__all__ = ["VerdictPrompt", "cpn_from_logprobs"]


class VerdictPrompt:
    """The verdict prompt after a step, the content-free null step, and the verdict token sets.

    Parameters
    ----------
    tokenizer : the judge's (target's) tokenizer
    template : str, optional
        The verdict prompt appended after the step (default :data:`DEFAULT_TEMPLATE`). Where the step
        does not already end with ``delimiter`` the delimiter is put in front of it.
    positive_words, negative_words : sequence of str, optional
        Verdict words (default "Yes" / "No"), expanded by :func:`build_verdict_token_ids`.
    delimiter : str
        The step delimiter (default a blank line).

    Attributes
    ----------
    verdict_ids : (list of int, list of int)
        The positive and negative verdict tokens.

    Example
    -------
    >>> from transformers import AutoTokenizer                                     # doctest: +SKIP
    >>> vp = VerdictPrompt(AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"))  # doctest: +SKIP
    >>> vp.suffix_ids("2 + 3 = 5.\\n\\n")[:3], vp.verdict_ids                     # doctest: +SKIP
    """

    def __init__(self, tokenizer, *, template: Optional[str] = None, positive_words: Optional[Sequence[str]] = None,
                 negative_words: Optional[Sequence[str]] = None, delimiter: str = "\n\n"):
        self.template = DEFAULT_TEMPLATE if template is None else template
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError(f"template must be a non-empty string, got {template!r}")
        self.delimiter = delimiter
        self.positive_words = tuple(positive_words or DEFAULT_POSITIVE_WORDS)
        self.negative_words = tuple(negative_words or DEFAULT_NEGATIVE_WORDS)
        self.verdict_ids = build_verdict_token_ids(tokenizer, self.positive_words, self.negative_words)
        # Verdict prompt tokens, with and without the delimiter in front.
        self._suffix = {
            True: tokenizer.encode(self.template, add_special_tokens=False),
            False: tokenizer.encode(delimiter + self.template, add_special_tokens=False),
        }
        # The content-free step, as a drafted step reads (ending with the delimiter), and its verdict prompt.
        null_text = NULL_STEP + delimiter
        self._null_ids = tokenizer.encode(null_text, add_special_tokens=False) + self.suffix_ids(null_text)

    @classmethod
    def for_config(cls, tokenizer, config: "ReasonerConfig") -> "VerdictPrompt":
        """The verdict prompt of ``config``'s verdict settings (template, words, step delimiter)."""
        return cls(tokenizer, template=config.verdict_template, positive_words=config.positive_words,
                   negative_words=config.negative_words, delimiter=config.step_delimiter)

    def suffix_ids(self, step_text: str) -> list[int]:
        """Token ids of the verdict prompt that follows ``step_text``."""
        return self._suffix[step_text.endswith(self.delimiter)]

    def null_ids(self) -> list[int]:
        """Token ids of the content-free step and its verdict prompt, scored at a step's prefix when
        calibrating."""
        return list(self._null_ids)

    @property
    def reserve(self) -> int:
        """Room a step leaves in the target's context for its verdict prompt: the longer of the prompt's
        two forms (with and without the delimiter in front), whichever way the step ends."""
        return max(len(ids) for ids in self._suffix.values())


def cpn_from_logprobs(positive: Sequence[Sequence[float]], negative: Sequence[Sequence[float]]) -> torch.Tensor:
    """CPN from the log-probabilities of the verdict tokens at the verdict position, as a server returns them.

    ``cpn = sigmoid(logsumexp(positive) - logsumexp(negative))``, which is ``s+ / (s+ + s-)`` of
    :func:`dreamr.ops.cpn_verify` (log-probabilities are logits less one shared constant, which cancels),
    with its rule for bad numbers: a row with a log-probability that is not finite (NaN, +-inf) or is
    missing (None) gives NaN (the step is rejected).

    Parameters
    ----------
    positive : B rows of floats (or None), ``[B, P]``
        The positive verdict tokens' log-probabilities, one row per verified step.
    negative : ``[B, N]``, the same for the negative verdict tokens.

    Returns
    -------
    torch.Tensor
        cpn ``[B]`` float32 (NaN where a row is not finite).

    Example
    -------
    >>> cpn_from_logprobs([[-0.5, -2.0]], [[-1.5]])
    tensor([0.7688])
    """
    if len(positive) != len(negative):
        raise ValueError(f"positive and negative: one row per step each, got {len(positive)} and {len(negative)} rows")
    out = []
    for p, n in zip(positive, negative):
        if not p or not n:
            raise ValueError("positive and negative: every row needs at least one verdict token's log-probability")
        values = [float("nan") if v is None else float(v) for v in (*p, *n)]
        if not all(math.isfinite(v) for v in values):
            out.append(float("nan"))
            continue
        lp = torch.logsumexp(torch.tensor(values[:len(p)], dtype=torch.float64), 0)
        ln = torch.logsumexp(torch.tensor(values[len(p):], dtype=torch.float64), 0)
        out.append(float(torch.sigmoid(lp - ln)))
    return torch.tensor(out, dtype=torch.float32)
