"""``EvalSettings``: what an evaluation runs and how (the variants' modes and alphas, generation settings)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from dreamr.eval.data import DEFAULT_FIELDS
from dreamr.eval.variants import VERIFIER_OPTIONS
from dreamr.prompts import ANSWER_MARKER, SYSTEM_PROMPT

__all__ = ["EvalSettings", "normalized", "note"]


@dataclass
class EvalSettings:
    """What an evaluation runs and how.

    Generation settings (``max_new_tokens`` ... ``extra``) go to every ``reasoner.generate`` call and
    make the run's fingerprint: resuming into a folder written with other generation settings, another
    dataset or other models raises ValueError. ``modes``, ``alphas``, ``verifiers``, ``limit`` and
    ``offset`` may change between resumes (new variants or problems are run, finished ones are kept).

    Attributes
    ----------
    modes : tuple of str
        Variant specs (see :func:`dreamr.eval.variants.make_variants`): a mode name ("speculative"), run
        once per alpha and verifier, or one variant ("speculative@0.7", "speculative@auto+calibrate").
    alphas : tuple of float or "auto"
        The alphas of the verifying modes given by name; "auto" is the adaptive threshold.
    verifiers : tuple of str
        Verifier specs crossed with the verifying modes given by name ("" or "default": the reasoner's
        own; e.g. "calibrate", "verdict_head=none", "verdict_head=DIR+calibrate"); empty: the reasoner's.
    """

    modes: tuple[str, ...] = ("target", "draft", "speculative")
    alphas: tuple[Union[float, str], ...] = (0.7,)
    verifiers: tuple[str, ...] = ()
    limit: Optional[int] = None  # at most this many problems (after offset)
    offset: int = 0  # skip this many problems first
    max_new_tokens: int = 128
    max_step_tokens: int = 64
    answer_marker: Optional[str] = ANSWER_MARKER
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = 0
    chat: bool = True  # send [system, user] chat messages (False: the question as plain text)
    system_prompt: Optional[str] = SYSTEM_PROMPT
    # Other ReasonerConfig overrides for every call (e.g. an FPSR window size).
    extra: dict = field(default_factory=dict)
    # Field names in the JSONL: question, answer (reference) and optional id.
    fields: dict = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    # Before extraction the prediction is cut at the first of these strings (a base model that goes
    # on to invent the next "Question:" would otherwise be scored on its invented text). Scoring only.
    cut_at: tuple[str, ...] = ("\nQuestion:",)
    warmup: bool = True  # one short untimed generation per variant before the timed ones
    retry_failed: bool = False  # on resume, run again the (problem, variant) pairs that raised

    def generation(self) -> dict:
        """The settings every ``reasoner.generate`` call gets (the variant adds mode, alpha, verifier)."""
        out = dict(max_new_tokens=self.max_new_tokens, max_step_tokens=self.max_step_tokens,
                   answer_marker=self.answer_marker, temperature=self.temperature, top_p=self.top_p,
                   seed=self.seed)
        out.update(self.extra)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("modes", "alphas", "verifiers", "cut_at"):
            d[name] = list(getattr(self, name))
        return d


def _tuple(value, scalar) -> tuple:
    return (value,) if isinstance(value, scalar) and not isinstance(value, bool) else tuple(value)


def normalized(settings: EvalSettings) -> EvalSettings:
    """``settings`` with ``modes`` / ``alphas`` / ``verifiers`` / ``cut_at`` as tuples (one name or number
    taken as one); ValueError for an ``extra`` that is not a dict or sets what a variant sets."""
    if not isinstance(settings.extra, dict):
        raise ValueError(f"extra must be a dict of ReasonerConfig overrides, got {settings.extra!r}")
    clash = sorted(set(settings.extra) & {"mode", "alpha", *VERIFIER_OPTIONS})
    if clash:
        raise ValueError(f"extra: {clash} are set per variant; use modes= / alphas= / verifiers= (--modes / --alphas "
                         f"/ --verifiers), got extra={settings.extra!r}")
    return dataclasses.replace(settings, modes=_tuple(settings.modes, str),
                               alphas=_tuple(settings.alphas, (int, float, str)),
                               verifiers=_tuple(settings.verifiers, str), cut_at=_tuple(settings.cut_at, str))


def note(message: str) -> None:
    """A warning the user must see: through :mod:`warnings` (once per message), on stderr."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)
