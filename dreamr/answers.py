"""Answer extraction and comparison: the one extractor evaluation, the command line and SAPO share.

The final numeric answer of a reasoning text is found by :func:`extract_answer` (``#### N``, ``\\boxed{N}``,
"the answer is N", else the last number), written canonically by :func:`normalize_number`, and two
answers are compared as numbers by :func:`answers_match`. The answer format dreamr's prompts ask for,
"The answer is N.", lives in :mod:`dreamr.prompts`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

__all__ = ["extract_answer", "normalize_number", "answers_match"]

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

    Parameters
    ----------
    text : str or None
        One number as written, e.g. ``"$1,234.50"``.

    Returns
    -------
    str or None
        The canonical decimal form, or None when ``text`` is None or not a number.
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

    Parameters
    ----------
    text : str or None
        A reasoning text or a reference solution.

    Returns
    -------
    str or None
        The answer in the form of :func:`normalize_number`; None for None, blank text or text without a
        number.
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

    Parameters
    ----------
    pred, ref : str or None
        The prediction and the reference.

    Returns
    -------
    bool
        True when both hold a number and the numbers are equal as decimals (``"18"`` == ``"18.00"``).
    """
    a, b = extract_answer(pred), extract_answer(ref)
    if a is None or b is None:
        return False
    return Decimal(a) == Decimal(b)
