"""Prompt lookup: propose what followed the last occurrence of the context's final n-gram.

The same idea as transformers' prompt-lookup decoding and vLLM's ``NgramProposer``: a reasoning text
repeats names, numbers and phrases of the question and of its own earlier steps, so the tokens that
followed the previous occurrence of the last ``n`` tokens are a good guess of the next ones. It costs no
model forward.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["NgramProposer", "continuation"]


def continuation(haystack: np.ndarray, pattern: Sequence[int], k: int, *, before: int) -> list[int]:
    """Up to ``k`` tokens that follow the latest occurrence of ``pattern`` in ``haystack[:before]``.

    Parameters
    ----------
    haystack : ndarray, shape ``[L]``, int64
        Where to look.
    pattern : sequence of int, length n >= 1
        The tokens to find.
    k : int
        Most tokens to return.
    before : int
        Occurrences must end before this index (``haystack[i:i+n]`` with ``i + n < before``), so that at
        least one token follows them inside ``haystack[:before]``; with ``before = len(haystack)`` the
        search never matches the haystack's own tail (the pattern itself).

    Returns
    -------
    list of int
        ``haystack[i + n : i + n + k]`` for the largest such ``i`` (its tokens may reach past ``before``
        into the rest of ``haystack``); empty where ``pattern`` does not occur.
    """
    n = len(pattern)
    last_start = before - n - 1  # the occurrence must leave one token after it inside [:before]
    if n == 0 or k <= 0 or last_start < 0:
        return []
    match = haystack[:last_start + 1] == pattern[0]
    for j in range(1, n):
        match &= haystack[j:last_start + 1 + j] == pattern[j]
    hits = np.flatnonzero(match)
    if hits.size == 0:
        return []
    i = int(hits[-1]) + n
    return haystack[i:i + k].tolist()


class NgramProposer:
    """Propose the continuation of the latest earlier occurrence of the context's last n tokens, trying
    ``n = max_ngram, ..., min_ngram`` (longest first: a longer match is a safer guess).

    Parameters
    ----------
    max_ngram, min_ngram : int
        Longest and shortest suffix to look up (transformers' prompt lookup: 2 and 1; vLLM: configurable).

    Examples
    --------
    >>> NgramProposer().propose([5, 6, 7, 8, 1, 5, 6], step=[5, 6], k=3)
    [7, 8, 1]
    >>> NgramProposer().propose([3, 9, 4, 9, 4, 9], step=[9], k=5)   # a loop of period 2 goes on
    [4, 9, 4, 9, 4]
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if isinstance(min_ngram, bool) or not isinstance(min_ngram, int) or min_ngram < 1:
            raise ValueError(f"NgramProposer: min_ngram must be an integer >= 1, got {min_ngram!r}")
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < min_ngram:
            raise ValueError(f"NgramProposer: max_ngram must be an integer >= min_ngram={min_ngram}, got {max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], step: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``context`` (the whole sequence so far, ``step`` at its end)."""
        if k <= 0 or len(context) < 2:
            return []
        ctx = np.asarray(context, dtype=np.int64)
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            found = continuation(ctx, ctx[-n:].tolist(), k, before=len(ctx))
            if found:
                # Cut short only where the continuation runs into the present: the context then repeats
                # with period len(found) (the match lies that far back), so the guess goes on repeating,
                # as an overlapping copy does (a loop "0 0 0" proposes k zeros, not one).
                return (found * -(-k // len(found)))[:k]
        return []
