"""Step boundaries and stop conditions.

A reasoning step ends at the step delimiter (a blank line by default), at EOS, or at the step cap.
Generation stops at EOS, at the final-answer marker where one is configured, or when the token budget
is spent. Everything here works on decoded text, so it holds for any tokenizer.
"""

from __future__ import annotations

from typing import Literal, Optional

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
