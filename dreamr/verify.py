"""CPN verification of reasoning steps by the target model (TBVM with CPN).

The target reads the committed context, the drafted step and a verdict prompt ("Is the last step
correct? Answer Yes or No.\\nAnswer:"). At the verdict position its final hidden state is scored by
:func:`dreamr.ops.cpn_verify` against the rows of the LM head that belong to the positive and negative
verdict tokens: ``cpn = s+ / (s+ + s-)``, accept iff ``cpn > alpha``. No full-vocab logits are formed.
The context's KV cache is reused, and the verdict prompt's entries are rolled back afterwards, so
verification leaves nothing in the reasoning cache (an accepted step's own entries stay: it is now
committed context).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from numbers import Real
from typing import Optional, Sequence

import torch

from dreamr.cache import CachedSequence
from dreamr.multimodal import (ImagePrefix, encode_prefix, is_vision_language, prepare_prompt, processor_inputs,
                               split_processor)

__all__ = [
    "DEFAULT_TEMPLATE",
    "DEFAULT_POSITIVE_WORDS",
    "DEFAULT_NEGATIVE_WORDS",
    "check_alpha",
    "build_verdict_token_ids",
    "StepVerifier",
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


class StepVerifier:
    """Scores steps with CPN using ``model`` (the target) and its ``tokenizer``.

    Parameters
    ----------
    model : transformers causal LM
        The judge; its output embedding supplies the verdict rows.
    tokenizer : its tokenizer
    template : str, optional
        The verdict prompt appended after the step (default :data:`DEFAULT_TEMPLATE`). Where the step
        does not already end with ``delimiter`` the delimiter is put in front of it.
    positive_words, negative_words : sequence of str, optional
        Verdict words (default "Yes" / "No"), expanded by :func:`build_verdict_token_ids`.
    alpha : float
        Default acceptance threshold in [0, 1].
    delimiter : str
        The step delimiter (default a blank line).
    processor : transformers processor, optional
        A vision-language target's processor, for :meth:`score_steps` with images (a processor given as
        ``tokenizer`` is taken as both).

    :meth:`score_steps` keeps the image prefix of its last call with images: consecutive calls on the
    same prompt and images (a SAPO row's completions, scored one call each) encode the images once.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: Optional[str] = None,
        positive_words: Optional[Sequence[str]] = None,
        negative_words: Optional[Sequence[str]] = None,
        alpha: float = 0.7,
        delimiter: str = "\n\n",
        processor=None,
    ):
        inner_processor, tokenizer = split_processor(tokenizer)
        processor = inner_processor if processor is None else processor
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.alpha = check_alpha(alpha)
        self.template = DEFAULT_TEMPLATE if template is None else template
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError(f"template must be a non-empty string, got {template!r}")
        self.delimiter = delimiter
        self.positive_words = tuple(positive_words or DEFAULT_POSITIVE_WORDS)
        self.negative_words = tuple(negative_words or DEFAULT_NEGATIVE_WORDS)
        self.verdict_ids = build_verdict_token_ids(tokenizer, self.positive_words, self.negative_words)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or getattr(head, "weight", None) is None:
            raise ValueError("model: the target has no output embedding (LM head) to score verdicts with")
        self._head = head
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.logit_softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        # Verdict prompt tokens, with and without the delimiter in front.
        self._suffix = {
            True: tokenizer.encode(self.template, add_special_tokens=False),
            False: tokenizer.encode(delimiter + self.template, add_special_tokens=False),
        }
        self._kept_prefix: Optional[tuple[dict, tuple, ImagePrefix]] = None  # (inputs, weights' state, prefix)

    def suffix_ids(self, step_text: str) -> list[int]:
        """Token ids of the verdict prompt that follows ``step_text``."""
        return self._suffix[step_text.endswith(self.delimiter)]

    @torch.no_grad()
    def cpn(self, hidden: torch.Tensor, alpha: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CPN and acceptance from final hidden states ``[B, H]`` at the verdict positions."""
        from dreamr import ops

        weight = self._head.weight
        bias = getattr(self._head, "bias", None)
        return ops.cpn_verify(
            hidden.to(weight.dtype).contiguous(), weight, *self.verdict_ids,
            self.alpha if alpha is None else alpha, lm_head_bias=bias, logit_softcap=self.logit_softcap,
        )

    def verify(
        self,
        seq: CachedSequence,
        step_ids: Sequence[int],
        step_text: str,
        *,
        alpha: Optional[float] = None,
        commit: Optional[bool] = None,
    ) -> tuple[float, bool]:
        """Verify one step against the target's committed sequence ``seq``; one forward pass.

        Feeds the pending context, ``step_ids`` and the verdict prompt, scores the last hidden state,
        then rolls the cache back: the verdict prompt's entries always go. The step is committed to
        ``seq`` (its ids appended, its cache entries kept) when ``commit`` is True, or, with the default
        ``commit=None``, when it is accepted; otherwise its entries are rolled back too.

        Returns ``(cpn, accepted)``; cpn is NaN (and accepted False) where the verdict was not finite.
        """
        committed = len(seq.ids)
        step_ids = [int(t) for t in step_ids]
        hidden = seq.last_hidden(step_ids + self.suffix_ids(step_text))
        cpn_t, accept_t = self.cpn(hidden, alpha)
        cpn, accepted = float(cpn_t[0]), bool(accept_t[0])
        keep = accepted if commit is None else commit
        if keep:
            seq.extend(step_ids)
            # Keep the step's entries but its last token pending, so the next decode step feeds one token.
            seq.uncache_to(max(len(seq.ids) - 1, 0))
        else:
            seq.uncache_to(committed)
        return cpn, accepted

    verify = torch.no_grad()(verify)

    @torch.no_grad()
    def score_steps(self, prompt: str, steps: Sequence[str], images=None) -> list[float]:
        """cpn of each step ``i`` given ``prompt + steps[:i]``, reusing one KV cache across the steps.

        Steps are concatenated as given (include their separators, e.g. a trailing blank line). One
        forward pass per step; NaN where a verdict was not finite. With ``images`` (one or a list: PIL
        images, paths, tensors ``[C, H, W]``; a vision-language target with its processor), the prompt
        becomes one user message, the images then the text, through the processor's chat template;
        the images are encoded once and the steps follow the generation prompt; the next call on the
        same prompt and images reuses that encoding (a copy of its cache; see :meth:`clear_prefix_cache`).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if isinstance(steps, str):
            raise ValueError("steps must be a sequence of step strings, not one string")
        mm = prepare_prompt(prompt, images)
        if mm is None:
            seq = CachedSequence(self.model, self.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            if not is_vision_language(self.model):
                raise ValueError(f"images: {len(mm.images)} image(s) given but the target model "
                                 f"({type(self.model).__name__}) is text-only and cannot see them")
            if self.processor is None:
                raise ValueError("images: the target is a vision-language model but the verifier has no processor; "
                                 "pass processor=AutoProcessor.from_pretrained(...) (or the processor as tokenizer)")
            prefix = self._image_prefix(processor_inputs(self.processor, mm, "target"))
            seq = CachedSequence(self.model, prefix.ids, prefix=prefix)
        scores = []
        for step in steps:
            ids = self.tokenizer.encode(step, add_special_tokens=False)
            cpn, _ = self.verify(seq, ids, step, commit=True)
            scores.append(cpn)
        return scores

    def _weights_state(self) -> tuple:
        """Changes whenever the target's parameters are replaced, moved or updated in place."""
        return tuple((id(p), p.device, p.dtype, p._version) for p in self.model.parameters())

    def _image_prefix(self, inputs: dict) -> ImagePrefix:
        """The image prefix of ``inputs`` (a copy of its cache: scoring extends it), encoded once for
        consecutive calls with equal inputs while the target's weights stay as they were."""
        state = self._weights_state()
        kept = self._kept_prefix
        if kept is None or kept[1] != state or not _same_inputs(kept[0], inputs):
            self._kept_prefix = None  # free the old prefix before encoding the new one
            kept = self._kept_prefix = (inputs, state, encode_prefix(self.model, inputs))
        prefix = kept[2]
        return dataclasses.replace(prefix, cache=copy.deepcopy(prefix.cache))

    def clear_prefix_cache(self) -> None:
        """Drop the kept image prefix (its KV cache); needed only where the target's weights were changed
        without autograd seeing it (through ``.data``), which the reuse check cannot detect."""
        self._kept_prefix = None


def _same_inputs(a: dict, b: dict) -> bool:
    """Two processor outputs hold the same keys and equal values (tensors compared element-wise)."""
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor) or isinstance(w, torch.Tensor):
            if not (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and v.shape == w.shape
                    and v.dtype == w.dtype and torch.equal(v, w)):
                return False
        elif v != w:
            return False
    return True
