"""Verdict words and their token sets, and the acceptance threshold's check.

The target answers a verdict prompt (:data:`DEFAULT_TEMPLATE`) after each drafted step; the single-token
forms of the positive and negative words are the two token sets CPN compares (see ``docs/method.md``).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

__all__ = [
    "DEFAULT_TEMPLATE",
    "DEFAULT_POSITIVE_WORDS",
    "DEFAULT_NEGATIVE_WORDS",
    "check_alpha",
    "build_verdict_token_ids",
]

DEFAULT_TEMPLATE = "Is the last step correct? Answer Yes or No.\nAnswer:"
DEFAULT_POSITIVE_WORDS = ("Yes",)
DEFAULT_NEGATIVE_WORDS = ("No",)


def check_alpha(alpha, name: str = "alpha") -> float:
    """Return ``alpha`` as a float, or raise ValueError unless it is a real number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(float(alpha)) \
            or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (accept a step iff cpn > {name}), got {alpha!r}")
    return float(alpha)


def _variants(word: str) -> list[str]:
    """Each verdict word in common cases, with and without a leading space."""
    word = word.strip()
    forms = []
    for w in (word, word.lower(), word.capitalize(), word.upper()):
        for f in (w, " " + w):
            if f not in forms:
                forms.append(f)
    return forms


def _single_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for form in (f for w in words for f in _variants(w)):
        encoded = tokenizer.encode(form, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


def build_verdict_token_ids(
    tokenizer, positive_words: Sequence[str], negative_words: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Token ids of the positive and negative verdicts in ``tokenizer``.

    Each word is tried as written, lower-case, capitalised and upper-case, each with and without a
    leading space; only forms that encode to exactly one token count. Raises ValueError when either
    set comes out empty, or when the two sets share a token.
    """
    for name, words in (("positive_words", positive_words), ("negative_words", negative_words)):
        if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words) or not words:
            raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {words!r}")
    pos = _single_token_ids(tokenizer, positive_words)
    neg = _single_token_ids(tokenizer, negative_words)
    for name, words, ids in (("positive_words", positive_words, pos), ("negative_words", negative_words, neg)):
        if not ids:
            raise ValueError(
                f"{name}={list(words)!r}: no form of these words (cases, with or without a leading space) "
                "is a single token in the target's tokenizer; pick verdict words the tokenizer has as one token"
            )
    shared = sorted(set(pos) & set(neg))
    if shared:
        raise ValueError(
            f"positive_words and negative_words share tokens {shared} "
            f"({[tokenizer.decode([t]) for t in shared]!r}); the verdict sets must be disjoint"
        )
    if len(pos) > 64 or len(neg) > 64:
        raise ValueError(f"at most 64 verdict tokens per side, got {len(pos)} positive and {len(neg)} negative")
    return pos, neg
