"""Step boundaries and stop conditions.

A reasoning step ends at the step delimiter (a blank line by default), at EOS, or at the step cap.
Generation stops at EOS, at the final-answer marker where one is configured, or when the token budget
is spent. Everything here works on decoded text, so it holds for any tokenizer.
"""

from __future__ import annotations

from typing import Literal, Optional

__all__ = ["StepEnd", "ends_step", "has_answer", "split_steps", "StepWriter"]

StepEnd = Literal["delimiter", "eos", "cap"]


def ends_step(text: str, delimiter: str) -> bool:
    """True once ``text`` (the step so far) contains the delimiter after some content.

    Leading delimiters (a step that starts with blank lines) do not end the step, so a step is never
    only whitespace: ``"\\n\\nThe sum is 4.\\n\\n"`` is one step.
    """
    return delimiter in text.lstrip()


def has_answer(text: str, marker: Optional[str]) -> bool:
    """True when a final-answer marker is configured and ``text`` contains it."""
    return bool(marker) and marker in text


def split_steps(text: Optional[str], delimiter: str = "\n\n") -> list[str]:
    """Split a finished reasoning text into steps at ``delimiter``; each step keeps its trailing delimiter.

    The one step splitter of dreamr (SAPO's step counts and rewards, ``eval_sapo`` and evaluation use it).
    It agrees with :func:`ends_step`: pieces that are only whitespace are merged into the step before
    them, so a step is never blank. ``"a\\n\\nb\\n\\n\\n\\nc"`` -> ``["a\\n\\n", "b\\n\\n\\n\\n", "c"]``.

    Parameters
    ----------
    text : str or None
        The text to split; None or blank text has no steps.
    delimiter : str
        The step delimiter (a blank line by default).

    Returns
    -------
    list of str
        The steps, in order; ``"".join(steps)`` is ``text`` without its leading whitespace-only pieces.
    """
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError(f"delimiter: expected a non-empty string, got {delimiter!r}")
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


class StepWriter:
    """Tracks one step while a model writes it token by token.

    ``add(token)`` returns the reason the step ended ("delimiter", "eos", "cap") or None to go on. The
    text is decoded from all of the step's tokens each time (not token by token), so byte-level pieces
    of one character join correctly.
    """

    def __init__(self, tokenizer, eos_ids: set[int], delimiter: str, max_tokens: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.delimiter = delimiter
        self.max_tokens = max_tokens
        self.ids: list[int] = []  # every generated token, EOS included
        self.text = ""
        self.end: Optional[StepEnd] = None

    def add(self, token: int) -> Optional[StepEnd]:
        self.ids.append(token)
        if token in self.eos_ids:
            self.end = "eos"
            return self.end
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if ends_step(self.text, self.delimiter):
            self.end = "delimiter"
        elif len(self.ids) >= self.max_tokens:
            self.end = "cap"
        return self.end

    @property
    def content_ids(self) -> list[int]:
        """The step's tokens without a trailing EOS (what stays in the model's context)."""
        if self.ids and self.ids[-1] in self.eos_ids:
            return self.ids[:-1]
        return self.ids
