"""CPN verification of reasoning steps by the target model (TBVM with CPN; see ``docs/method.md``).

The target reads the committed context, the drafted step and a verdict prompt ("Is the last step
correct? Answer Yes or No.\\nAnswer:"). At the verdict position its final hidden state is scored by
:func:`dreamr.ops.cpn_verify` against the rows of the LM head that belong to the positive and negative
verdict tokens: ``cpn = s+ / (s+ + s-)``, accept iff ``cpn > alpha``. No full-vocab logits are formed.
The context's KV cache is reused, and the verdict prompt's entries are rolled back afterwards, so
verification leaves nothing in the reasoning cache (an accepted step's own entries stay: it is now
committed context).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from dreamr.cache import CachedSequence
from dreamr.lm import lm_head_of, logit_scale, logit_softcap, split_processor
from dreamr.verify.head import VerdictHead, calibrated_cpn
from dreamr.verify.prompt import VerdictPrompt
from dreamr.verify.verdicts import check_alpha

if TYPE_CHECKING:  # for the annotation only: the config imports dreamr.verify
    from dreamr.config import ReasonerConfig

__all__ = ["StepVerifier"]


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
        A vision-language target's processor, kept as :attr:`processor` for the callers that encode an
        image prompt for this target (a processor given as ``tokenizer`` is taken as both).
    head : VerdictHead, optional
        A trained verdict head (:mod:`dreamr.verify.head`) scoring the verdict position's hidden state in
        place of the LM head's verdict rows; checked against the target and the template (ValueError
        naming ``verdict_head``).
    calibrate : bool
        Contextual calibration: each verdict is corrected by the verdict on the content-free step
        :data:`dreamr.verify.head.NULL_STEP` at the same prefix, ``cpn = sigmoid(l - l_null)``; the null
        step is fed on the prefix's KV cache (no second prefill). Always on with a head fitted on
        calibrated features (``head.calibrated``).
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
        head: Optional[VerdictHead] = None,
        calibrate: bool = False,
    ):
        inner_processor, tokenizer = split_processor(tokenizer)
        processor = inner_processor if processor is None else processor
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.alpha = check_alpha(alpha)
        # the prompt's tokens and the verdict sets (shared with the remote verifier)
        self.prompt = VerdictPrompt(tokenizer, template=template, positive_words=positive_words,
                                    negative_words=negative_words, delimiter=delimiter)
        self.template, self.delimiter = self.prompt.template, delimiter
        self.positive_words, self.negative_words = self.prompt.positive_words, self.prompt.negative_words
        self.verdict_ids = self.prompt.verdict_ids
        lm_head = lm_head_of(model)
        self._head = lm_head
        self.logit_softcap = logit_softcap(model)
        # Cohere / Granite scale the LM head's logits. Without a head bias, scaling the hidden state scales
        # the logits exactly (soft-capping, if any, comes after), so the fused op still scores them; a biased
        # head would need the scale between the product and the bias, which the op does not take.
        self.logit_scale = logit_scale(model)
        if self.logit_scale != 1.0 and getattr(lm_head, "bias", None) is not None:
            model_type = getattr(getattr(model, "config", None), "model_type", "?")
            raise ValueError(f"model: {model_type} scales its logits (logit scaling {self.logit_scale}) and its LM head "
                             "has a bias; CPN cannot score that combination")
        if head is not None:
            if not isinstance(head, VerdictHead):
                raise ValueError(f"verdict_head: expected a dreamr.verify.VerdictHead, got {type(head).__name__}")
            head.check_target(model)
            head.check_template(self.template)
        self.head = head
        self.calibrate = bool(calibrate) or (head is not None and head.calibrated)

    @classmethod
    def for_config(cls, model, tokenizer, config: "ReasonerConfig", *, head: Optional[VerdictHead] = None,
                   processor=None) -> "StepVerifier":
        """The verifier of ``config``'s verdict settings: template, verdict words, step delimiter, calibration,
        and ``alpha`` (0.5 stands in for alpha="auto", whose value each request's threshold supplies).

        The one place a :class:`dreamr.config.ReasonerConfig` becomes a verifier (the reasoner and SAPO's
        scorer both call it). ``head`` is the resolved verdict head (None: the target's own Yes/No verdict);
        resolving ``config.verdict_head`` ("auto", a folder) is the caller's, as it depends on the model's name.

        Example
        -------
        >>> from dreamr.config import ReasonerConfig                      # doctest: +SKIP
        >>> v = StepVerifier.for_config(model, tokenizer, ReasonerConfig(alpha=0.8))  # doctest: +SKIP
        """
        return cls(model, tokenizer, template=config.verdict_template, positive_words=config.positive_words,
                   negative_words=config.negative_words, alpha=0.5 if config.auto_alpha else config.alpha,
                   delimiter=config.step_delimiter, processor=processor, head=head, calibrate=config.calibrate)

    def suffix_ids(self, step_text: str) -> list[int]:
        """Token ids of the verdict prompt that follows ``step_text`` (:meth:`VerdictPrompt.suffix_ids`)."""
        return self.prompt.suffix_ids(step_text)

    def null_ids(self) -> list[int]:
        """Token ids of the content-free step and its verdict prompt (:meth:`VerdictPrompt.null_ids`)."""
        return self.prompt.null_ids()

    @property
    def hidden_size(self) -> int:
        """H, the size of the hidden states :meth:`cpn` scores (the LM head's input size)."""
        return int(self._head.weight.shape[1])

    @property
    def reserve(self) -> int:
        """Room a step leaves in the target's context for its verdict prompt (:attr:`VerdictPrompt.reserve`)."""
        return self.prompt.reserve

    @torch.no_grad()
    def cpn(self, hidden: torch.Tensor, alpha: Optional[float] = None,
            null_hidden: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CPN and acceptance from final hidden states ``[B, H]`` at the verdict positions.

        ``null_hidden [B, H]``: the null step's hidden states at the same prefixes; required where the
        verifier calibrates (:attr:`calibrate`), ignored otherwise. The verdict comes from :attr:`head`
        where there is one, else from the LM head's verdict rows; both through :func:`dreamr.ops.cpn_verify`.
        """
        from dreamr import ops
        from dreamr.reference import accepts

        alpha = self.alpha if alpha is None else alpha
        if self.calibrate and null_hidden is None:
            raise ValueError("null_hidden: this verifier calibrates its verdicts (calibrate=True or a calibrated "
                             "verdict head); pass the null step's hidden states at the same prefixes")
        null_hidden = null_hidden if self.calibrate else None
        if self.head is not None:
            return self.head.cpn(hidden, alpha, null_hidden)
        weight = self._head.weight
        bias = getattr(self._head, "bias", None)
        if self.logit_scale != 1.0:  # see __init__: exact for a head without bias
            hidden = hidden * self.logit_scale
            null_hidden = None if null_hidden is None else null_hidden * self.logit_scale
        if null_hidden is None:
            return ops.cpn_verify(
                hidden.to(weight.dtype).contiguous(), weight, *self.verdict_ids,
                alpha, lm_head_bias=bias, logit_softcap=self.logit_softcap,
            )
        both = torch.cat([hidden, null_hidden.expand_as(hidden)]).to(weight.dtype).contiguous()
        raw, _ = ops.cpn_verify(both, weight, *self.verdict_ids, 0.0, lm_head_bias=bias,
                                logit_softcap=self.logit_softcap)
        n = hidden.shape[0]
        cpn = calibrated_cpn(raw[:n], raw[n:])
        return cpn, accepts(cpn, float(alpha))

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
        then rolls the cache back (when calibrating, a second, short pass on the same cached prefix scores
        the null step first): the verdict prompt's entries always go. The step is committed to
        ``seq`` (its ids appended, its cache entries kept) when ``commit`` is True, or, with the default
        ``commit=None``, when it is accepted; otherwise its entries are rolled back too.

        Returns ``(cpn, accepted)``; cpn is NaN (and accepted False) where the verdict was not finite.
        """
        committed = len(seq.ids)
        step_ids = [int(t) for t in step_ids]
        null_hidden = None
        if self.calibrate:
            # The null step first, on the cached prefix (its pending tokens are fed with it and stay cached),
            # then only its own entries are rolled back: the step's pass below adds no prefill.
            null_hidden = seq.last_hidden(self.prompt.null_ids())
            seq.uncache_to(committed)
        hidden = seq.last_hidden(step_ids + self.suffix_ids(step_text))
        # (a judge swapped in for tests takes (hidden, alpha) only: the null goes only where there is one)
        cpn_t, accept_t = self.cpn(hidden, alpha) if null_hidden is None else self.cpn(hidden, alpha, null_hidden)
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
