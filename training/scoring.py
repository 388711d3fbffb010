"""The target's verdicts on a completion's steps, judged as the reasoner judges them (SAPO's draft reward
and ``eval_sapo.py``).

One judge context (see ``docs/method.md``, SAPO): the target reads the question in the same framing as at
inference, the chat conversation ``[system, user]`` of :func:`training.data.draft_messages` (the draft's
own prompt, :func:`dreamr.prompts.chat_messages`) through its
chat template, encoded by :func:`dreamr.request.build` (the images of a vision-language target through
its processor); then the steps, one at a time, each scored and committed by
:meth:`dreamr.verify.StepVerifier.verify`, which is what mode "speculative" calls. So the cpn SAPO rewards
for a step is the cpn the reasoner computes for the same step after the same prefix.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence

import torch

from dreamr.cache import CachedSequence, ImagePrefix, encode_prefix
from dreamr.config import ReasonerConfig
from dreamr.lm import LM
from dreamr.prompts import SYSTEM_PROMPT
from dreamr.request import build
from dreamr.verify import StepVerifier, VerdictHead, resolve_verdict_head
from training.data import draft_messages

__all__ = ["StepScorer", "verifier_for"]


def verifier_for(model, tokenizer, config: ReasonerConfig, *, processor=None) -> StepVerifier:
    """The target's verifier for ``config``, as :meth:`dreamr.reasoner.SpeculativeReasoner.verifier_for`
    builds it: the verdict template and words, the step delimiter, the verdict head (a folder is loaded and
    checked against ``model``) and contextual calibration; ``alpha`` as given ("auto" has no fixed value
    and is refused by SAPO's config before this runs).

    Parameters
    ----------
    model : transformers causal LM, the target
    tokenizer : its tokenizer or processor
    config : ReasonerConfig
    processor : a vision-language target's processor, optional

    Raises
    ------
    ValueError
        Verdict words without a single-token form, or a verdict head for another target or template.
    """
    head = config.verdict_head
    if head is not None and not isinstance(head, VerdictHead):
        head = VerdictHead.load(head, model)
    return StepVerifier.for_config(model, tokenizer, config, head=head, processor=processor)


class StepScorer:
    """cpn of each step of a completion, in the reasoner's judge context.

    Parameters
    ----------
    verifier : StepVerifier
        The target's verifier (:func:`verifier_for`); its model, tokenizer and processor are the target.
    system_prompt : str or None
        The system message the question is sent with (default :data:`dreamr.prompts.SYSTEM_PROMPT`, as
        evaluation and ``python -m dreamr``); a target without a chat template reads the question as plain
        text, as ``python -m dreamr --no-chat`` sends it.

    Consecutive :meth:`score` calls on the same question and images (a SAPO group's completions, one call
    each) encode the images once: the prefix is kept, and each call extends a copy of its cache, while the
    target's weights stay as they were.
    """

    def __init__(self, verifier: StepVerifier, system_prompt: Optional[str] = SYSTEM_PROMPT):
        if not isinstance(verifier, StepVerifier):
            raise ValueError(f"verifier: expected a dreamr.verify.StepVerifier, got {type(verifier).__name__}")
        self.verifier = verifier
        self.target = LM(verifier.model, verifier.tokenizer, "target", verifier.processor)
        self.system_prompt = system_prompt
        self.alpha = verifier.alpha
        self._kept: Optional[tuple[dict, tuple, ImagePrefix]] = None  # (inputs, weights' state, prefix)

    def prompt(self, question: str, n_images: int = 0):
        """The prompt the target reads for ``question``: chat messages where its tokenizer has a chat
        template (or the row has images: a processor's template places them), else the plain question."""
        if n_images or getattr(self.target.tokenizer, "chat_template", None):
            return draft_messages(question, self.system_prompt, n_images)
        return question

    def context(self, question: str, images: Optional[Sequence[Any]] = None) -> tuple[list[int], Optional[ImagePrefix]]:
        """The target's prompt ids for ``question`` and, with images, its image prefix (a copy of the kept
        one's cache where the inputs and the weights are unchanged).

        Built by :func:`dreamr.request.build` for the target alone (mode "target" encodes only the
        target's prompt), so the checks and the encoding are the reasoner's."""
        images = list(images) if images else None
        config = ReasonerConfig(mode="target")
        request = build(self.prompt(question, len(images) if images else 0), images, config,
                        target=self.target, draft=self.target, name="question")
        if request.target_inputs is None:
            return list(request.target_ids), None
        return list(request.target_ids), self._image_prefix(request.target_inputs)

    @torch.no_grad()
    def score(self, question: str, steps: Sequence[str], images: Optional[Sequence[Any]] = None) -> list[float]:
        """cpn of each step ``i`` after the question and ``steps[:i]``: one target forward per step on one
        KV cache (:meth:`StepVerifier.verify` with ``commit=True``, as an accepted step is committed).

        Steps are the text pieces of :func:`dreamr.steps.split_steps` (their delimiters included), each
        encoded by the target's tokenizer, as the reasoner re-tokenizes a drafted step for a target with
        another tokenizer. NaN where a verdict was not finite.

        Raises
        ------
        ValueError
            An empty question, ``steps`` given as one string, or images the target cannot see.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if isinstance(steps, str):
            raise ValueError("steps must be a sequence of step strings, not one string")
        if not steps:
            return []
        ids, prefix = self.context(question, images)
        seq = CachedSequence(self.target.model, ids, prefix=prefix)
        scores = []
        for step in steps:
            cpn, _ = self.verifier.verify(seq, self.target.encode_text(step), step, commit=True)
            scores.append(cpn)
        return scores

    def _weights_state(self) -> tuple:
        """Changes whenever the target's parameters are replaced, moved or updated in place."""
        return tuple((id(p), p.device, p.dtype, p._version) for p in self.target.model.parameters())

    def _image_prefix(self, inputs: dict) -> ImagePrefix:
        """The image prefix of ``inputs`` (a copy of its cache: scoring extends it), encoded once for
        consecutive calls with equal inputs while the target's weights stay as they were."""
        state = self._weights_state()
        kept = self._kept
        if kept is None or kept[1] != state or not _same_inputs(kept[0], inputs):
            self._kept = None  # free the old prefix before encoding the new one
            kept = self._kept = (inputs, state, encode_prefix(self.target.model, inputs))
        prefix = kept[2]
        return dataclasses.replace(prefix, cache=copy.deepcopy(prefix.cache))

    def clear_prefix_cache(self) -> None:
        """Drop the kept image prefix (its KV cache); needed only where the target's weights were changed
        without autograd seeing it (through ``.data``), which the reuse check cannot detect."""
        self._kept = None


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


def add_judge_args(parser) -> None:
    """The judge's flags of the training scripts, as ``python -m dreamr`` has them: ``--verdict-head``
    ("auto": the head dreamr ships for a built-in target, as the reasoner uses by default; "none": the
    target's own Yes/No verdict; or a folder from ``python -m dreamr.calibrate fit``) and ``--calibrate``."""
    parser.add_argument("--verdict-head", default="auto",
                        help="the judge's verdict head: 'auto' (the one shipped for a built-in target), 'none', "
                             "or a folder written by python -m dreamr.calibrate fit")
    parser.add_argument("--calibrate", action="store_true",
                        help="correct each verdict by the verdict on a content-free step at the same prefix")


def judge_config(args, target_name: str, **fields) -> ReasonerConfig:
    """A ReasonerConfig with the judge of ``args`` (:func:`add_judge_args`) for the target named
    ``target_name`` and the other ``fields``."""
    return ReasonerConfig(verdict_head=resolve_verdict_head(args.verdict_head, target_name),
                          calibrate=bool(args.calibrate), **fields)
