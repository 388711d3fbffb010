"""Step boundaries and stop conditions.

A reasoning step ends at the step delimiter (a blank line by default), at EOS, or at the step cap.
Generation stops at EOS, at the final-answer marker where one is configured, or when the token budget
is spent. Everything here works on decoded text, so it holds for any tokenizer.

Where a step ends, cheaply
--------------------------
:class:`StepWriter` decides "the step ends here" exactly as ``ends_step(tokenizer.decode(step ids))``
after every token, but it decodes the step only at tokens that can end it. That test is exact for
tokenizers whose decoding is *tail-local* (:func:`tail_local`): a ``transformers`` fast tokenizer whose
``decode`` is the library's own and whose backend decoder is built only from per-token maps
(``Replace`` of a literal string, ``Metaspace``, ``Strip`` from the left) followed by joiners (``Fuse``,
``ByteFallback``, ``ByteLevel``), as every byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) and
SentencePiece-style BPE (Gemma, Llama 2, Mistral) tokenizer is. For such a tokenizer, appending a token
``t`` to the step changes its text only by (a) appending ``t``'s own piece (mapped; the same string
wherever ``t`` stands, except that the first token may lose a leading space), (b) completing a
multi-byte character left open at the end, and (c) for ``ByteFallback`` byte tokens (``<0x0A>``),
re-decoding the run of byte tokens at the end (such a run decodes as a whole, so a byte can show up or
vanish with its neighbours). So when the delimiter's last character is ASCII (a byte that lossy UTF-8
decoding never merges into another character) and ``t`` is not a byte token, a new occurrence of the
delimiter must end inside ``t``'s piece: ``t``'s decoded text must contain that character. Tokens that
cannot end the step are recognised once per token id (decoding ``[t, t]``, whose second copy is ``t``'s
piece away from the start) and skipped; leading whitespace (``ends_step``'s ``lstrip``) does not change
this, since the first non-space character of the text only ever moves later. Every other tokenizer (a
slow or custom tokenizer, another decoder, a delimiter ending in a non-ASCII character) decodes the
whole step after every token, as before. The step's ``text`` is decoded once, when asked for.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Literal, Optional

__all__ = ["WriterEnd", "ends_step", "has_answer", "split_steps", "tail_local", "StepWriter"]

# Why a StepWriter's step ended (text level). Not dreamr.scheduler.StepEnd, the C++ scheduler's enum of how
# a reported step ends its request (none, EOS, answer marker).
WriterEnd = Literal["delimiter", "eos", "cap"]


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


# Backend decoders (``tokenizers.decoders``, by their serialized "type") that map each token's string on
# its own, and those that join the tokens' strings (see "Where a step ends, cheaply" above).
_PER_TOKEN_DECODERS = ("Replace", "Metaspace", "Strip")
_JOINING_DECODERS = ("Fuse", "ByteFallback", "ByteLevel")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # a ByteFallback piece: one raw byte
_BYTE_TOKEN_CHARS = set("<>x0123456789ABCDEFabcdef")

# Per tokenizer (weakly held): None where decoding is not tail-local, else (byte_fallback, token id ->
# whether the token's own text holds a character, per character asked about).
_TAIL_LOCAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decoder_parts(tokenizer) -> Optional[list[dict]]:
    """The backend decoder of a ``transformers`` fast tokenizer as a list of serialized parts, or None."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or not isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return None
    # Only the library's own decode: a subclass that post-processes the text could be non-local.
    cls = type(tokenizer)
    own = getattr(getattr(cls, "decode", None), "__module__", "") == "transformers.tokenization_utils_base" and \
        getattr(getattr(cls, "_decode", None), "__module__", "").startswith("transformers.tokenization_utils")
    if not own or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        state = json.loads(decoder.__getstate__())
    except (TypeError, ValueError, AttributeError):
        return None
    return list(state.get("decoders") or []) if state.get("type") == "Sequence" else [state]


def tail_local(tokenizer) -> bool:
    """Whether ``tokenizer``'s decoding is tail-local (module docstring), so that :class:`StepWriter` may
    skip decoding at tokens that cannot end a step. Looked up once per tokenizer object."""
    return _tail_local_state(tokenizer) is not None


def _tail_local_state(tokenizer):
    try:
        return _TAIL_LOCAL[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: never cached, always the plain path
        return None
    parts = _decoder_parts(tokenizer)
    state = None
    if parts:
        joined, ok = False, True
        for part in parts:
            kind = part.get("type")
            if kind in _JOINING_DECODERS:
                joined = True
            elif kind == "Strip" and int(part.get("stop", 1)) == 0:
                pass  # a left strip: per token before a join, of the text's start after one
            elif kind in _PER_TOKEN_DECODERS and not joined:
                # a map of each token's string (after a join it would act on the whole text); of the
                # Replace forms only the literal one, that SentencePiece conversions write ("▁" -> " ")
                if kind == "Replace" and "String" not in (part.get("pattern") or {}):
                    ok = False
            else:
                ok = False  # another decoder, or a right strip / map of the joined text
            if not ok:
                break
        byte_fallback = any(p.get("type") == "ByteFallback" for p in parts)
        replaced = "".join(str(p.get("content", "")) + str((p.get("pattern") or {}).get("String", ""))
                           for p in parts if p.get("type") == "Replace")
        if byte_fallback and _BYTE_TOKEN_CHARS & set(replaced):
            ok = False  # such a Replace could make a byte token's "<0x..>" out of another piece, or unmake one
        if ok:
            state = (byte_fallback, {})
    _TAIL_LOCAL[tokenizer] = state
    return state


class StepWriter:
    """Tracks one step while a model writes it token by token.

    ``add(token)`` returns the reason the step ended ("delimiter", "eos", "cap") or None to go on, with
    the same ends as testing :func:`ends_step` on the decoded step after every token; the text is
    decoded from all of the step's tokens (not token by token), so byte-level pieces of one character
    join correctly. For a tail-local tokenizer (:func:`tail_local`) the step is decoded only after tokens
    that can end it (see the module docstring); ``text`` is decoded when read.

    Parameters
    ----------
    tokenizer : the writing model's tokenizer
    eos_ids : set of int
        Tokens that end the step (and the request) as "eos"; they are not part of the text.
    delimiter : str
        The step delimiter.
    max_tokens : int
        The step cap: the step ends as "cap" after this many tokens (EOS included).
    """

    def __init__(self, tokenizer, eos_ids: set[int], delimiter: str, max_tokens: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.delimiter = delimiter
        self.max_tokens = max_tokens
        self.ids: list[int] = []  # every generated token, EOS included
        self.end: Optional[WriterEnd] = None
        self._text, self._decoded = "", 0  # the text of ids[:_decoded] (without a final EOS)
        state = _tail_local_state(tokenizer) if delimiter and delimiter[-1].isascii() else None
        if state is not None:
            byte_fallback, marks = state
            self._byte_fallback = byte_fallback
            self._marks = marks.setdefault(delimiter[-1], {})
        self._tail_local = state is not None

    @property
    def text(self) -> str:
        """The step's text: its tokens without a final EOS, decoded (special tokens skipped)."""
        n = len(self.content_ids)
        if self._decoded != n:
            self._text, self._decoded = self.tokenizer.decode(self.ids[:n], skip_special_tokens=True), n
        return self._text

    def _may_end(self, token: int) -> bool:
        """False only where appending ``token`` cannot complete the delimiter (tail-local tokenizers)."""
        if not self._tail_local:
            return True
        mark = self._marks.get(token)
        if mark is None:
            tok = self.tokenizer
            byte = self._byte_fallback and bool(_BYTE_TOKEN.match(str(tok.convert_ids_to_tokens(token))))
            mark = byte or self.delimiter[-1] in tok.decode([token, token], skip_special_tokens=True)
            self._marks[token] = mark
        return mark

    def add(self, token: int) -> Optional[WriterEnd]:
        self.ids.append(token)
        if token in self.eos_ids:
            self.end = "eos"
            return self.end
        if self._may_end(token) and ends_step(self.text, self.delimiter):
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
