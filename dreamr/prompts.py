"""The prompts dreamr sends, in one place: evaluation, the command line and SAPO training use these.

The system prompt asks for blank-line-separated steps (the default step delimiter, see
:mod:`dreamr.steps`) and for the final answer as "The answer is N." (:data:`ANSWER_FORMAT`), which the
reasoner's default answer marker (:data:`ANSWER_MARKER`) stops on and :func:`dreamr.answers.extract_answer`
reads back.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["SYSTEM_PROMPT", "ANSWER_MARKER", "ANSWER_FORMAT", "format_answer", "chat_messages"]

ANSWER_MARKER = "The answer is"
"""The phrase that opens the final answer; generation stops after a step containing it."""

ANSWER_FORMAT = ANSWER_MARKER + " {answer}."
"""The final answer as the prompts ask for it: ``ANSWER_FORMAT.format(answer=18)`` -> "The answer is 18."."""

SYSTEM_PROMPT = (
    "Solve the problem step by step. Write each step as one short paragraph and leave a blank line "
    "between steps. End with 'The answer is N.'"
)
"""The one system prompt (its last sentence is :data:`ANSWER_FORMAT` with N for the answer)."""


def format_answer(answer) -> str:
    """The final-answer step in the prompts' format.

    Parameters
    ----------
    answer : str or number
        The answer, e.g. ``18`` or ``"18"``.

    Returns
    -------
    str
        ``"The answer is 18."``.
    """
    text = str(answer).strip()
    if not text:
        raise ValueError(f"answer: expected a non-empty answer, got {answer!r}")
    return ANSWER_FORMAT.format(answer=text)


def chat_messages(question: str, system_prompt: Optional[str] = SYSTEM_PROMPT) -> list[dict]:
    """The chat conversation dreamr sends for one question: ``[system, user]``, or ``[user]`` alone.

    Parameters
    ----------
    question : str
        The problem text.
    system_prompt : str or None
        The system message; None or "" sends the question alone.

    Returns
    -------
    list of dict
        Chat messages (``{"role": ..., "content": ...}``) for a chat template.
    """
    if not isinstance(question, str):
        raise ValueError(f"question: expected a string, got {type(question).__name__}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return messages
