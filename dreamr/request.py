"""A request, built once by the front and handed down to an engine (see ``docs/architecture.md``).

    request = build(prompt, images, config, target=target_lm, draft=draft_lm, verifier=verifier)
    result = engine.generate(request)

:func:`build` checks the prompt and its images, and encodes the prompt once for each model the mode
runs (each vision-language model through its own processor); the engine reads everything it needs
from the frozen :class:`Request` and never calls back into the front.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from dreamr.config import ReasonerConfig
from dreamr.lm import LM, Prompt
from dreamr.multimodal import MultimodalPrompt, prepare_prompt, processor_inputs, text_of
from dreamr.verify import AdaptiveAlpha, StepVerifier

__all__ = ["Request", "build", "models_of"]


@dataclass(frozen=True, eq=False)
class Request:
    """One reasoning request with everything an engine needs to run it.

    Attributes
    ----------
    prompt : str or list of dict
        The prompt as given (chat messages with their image parts reduced to text where no model sees
        images).
    config : ReasonerConfig
        Its settings, already validated.
    verifier : StepVerifier or None
        The target's verifier for ``config`` (verdict prompt, words, delimiter); None in the
        single-model modes ("target", "draft"), which verify nothing.
    target_ids, draft_ids : list of int
        The prompt in the target's / the draft's tokens, ``P_t`` / ``P_d`` ids; empty for a model the
        mode does not run. Engines copy them (a request can be run again).
    images : list of PIL.Image.Image or None
        The request's images (RGB), None without any.
    target_inputs, draft_inputs : dict or None
        A vision-language model's processor inputs for the prompt (``input_ids [1, P]``,
        ``pixel_values``, ...), or None where that model reads text only; its image prefix is encoded
        once when the request starts.
    threshold : AdaptiveAlpha or None
        With ``config.alpha == "auto"``: the online threshold, shared by the requests of a reasoner (the
        engine judges each step at ``threshold.alpha`` and reports the verdict with ``update``); None
        for a fixed alpha.
    """

    prompt: Prompt
    config: ReasonerConfig
    verifier: Optional[StepVerifier] = None
    target_ids: list[int] = field(default_factory=list)
    draft_ids: list[int] = field(default_factory=list)
    images: Optional[Sequence[Any]] = None
    target_inputs: Optional[dict] = None
    draft_inputs: Optional[dict] = None
    threshold: Optional[AdaptiveAlpha] = None

    def alpha(self) -> float:
        """The threshold the request's next step is judged with."""
        return self.threshold.alpha if self.threshold is not None else float(self.config.alpha)

    def judged(self, accepted: bool, alpha: Optional[float] = None) -> None:
        """Report a verdict (taken at ``alpha``, default the current one) to the adaptive threshold;
        nothing for a fixed alpha."""
        if self.threshold is not None:
            self.threshold.update(accepted, alpha)


def models_of(mode: str, target: LM, draft: LM) -> list[LM]:
    """The models ``mode`` runs: the target alone, the draft alone, or both."""
    return {"target": [target], "token": [target], "draft": [draft]}.get(mode, [target, draft])


def _has_content(content) -> bool:
    """A message's content is not empty: non-blank text, or a list with a non-blank text part or an image."""
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, Sequence):
        return any(isinstance(p, dict) and (p.get("type") == "image" or
                                            (isinstance(p.get("text"), str) and p["text"].strip()))
                   for p in content)
    return False


def _check_prompt(prompt, name: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{name} is empty")
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        if not prompt:
            raise ValueError(f"{name} is empty (no messages)")
        for i, msg in enumerate(prompt):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"{name}[{i}] must be a dict with 'role' and 'content', got {msg!r}")
        if not any(_has_content(m["content"]) for m in prompt):
            raise ValueError(f"{name} is empty (every message's content is empty)")
    else:
        raise ValueError(f"{name} must be a string or a list of chat messages, got {type(prompt).__name__}")


def _check_can_see(mm: MultimodalPrompt, mode: str, used: list[LM], target: LM, draft: LM, images_name: str) -> None:
    """Raise ValueError unless a model that ``mode`` runs can see the images (a vision-language model),
    and every vision-language model it runs has its processor.

    Modes "speculative" and "fpsr" run both models: a vision-language target is enough (a text-only
    draft drafts from the text alone). Modes "target" and "draft" run one model, which must see them."""
    n = len(mm.images)
    if not any(lm.vision for lm in used):
        if mode in ("target", "draft"):
            lm = used[0]
            raise ValueError(f"{images_name}: {n} image(s) given but the {lm.name} model "
                             f"({type(lm.model).__name__}) is text-only and cannot see them, and mode={mode!r} "
                             f"runs it alone; use a vision-language {lm.name} (e.g. Qwen2-VL, LLaVA), another "
                             "mode, or drop the images")
        raise ValueError(f"{images_name}: {n} image(s) given but the target model "
                         f"({type(target.model).__name__}) is text-only and cannot see them, nor can the "
                         f"draft ({type(draft.model).__name__}), in mode={mode!r}; use a vision-language "
                         "target (e.g. Qwen2-VL, LLaVA) or drop the images")
    for lm in used:
        if lm.vision and lm.processor is None:
            raise ValueError(f"{lm.name}_tokenizer: the {lm.name} model ({type(lm.model).__name__}) is a "
                             f"vision-language model but was given a tokenizer ({type(lm.tokenizer).__name__}), "
                             f"not its processor; pass {lm.name}_tokenizer=AutoProcessor.from_pretrained(...) "
                             "to give it images")


def _encode(lm: LM, prompt, mm: Optional[MultimodalPrompt], name: str) -> tuple[list[int], Optional[dict]]:
    """``lm``'s prompt ids and, for a vision-language model given images, its processor inputs."""
    inputs = None
    if mm is None:
        ids = lm.encode_prompt(prompt)
    elif lm.vision:  # the model's own processor places and encodes the images
        inputs = processor_inputs(lm.processor, mm, lm.name, name)
        ids = [int(t) for t in inputs["input_ids"][0].tolist()]
    else:  # a text-only model reads the prompt without its images (the other model sees them): chat
        # messages as without images (no chat template: the same ValueError); a string prompt becomes
        # one user message through its chat template where it has one, else stays the string
        as_text = isinstance(prompt, str) and not getattr(lm.tokenizer, "chat_template", None)
        ids = lm.encode_prompt(prompt if as_text else mm.text_messages)
    if not ids:
        raise ValueError(f"{name} is empty after tokenization for the {lm.name} model")
    if len(ids) >= lm.context_length:
        raise ValueError(f"{name} is {len(ids)} tokens for the {lm.name} model, longer than its context "
                         f"of {lm.context_length} tokens (no room to generate)")
    return ids, inputs


def build(prompt: Prompt, images, config: ReasonerConfig, *, target: LM, draft: LM,
          verifier: Optional[StepVerifier] = None, threshold: Optional[AdaptiveAlpha] = None, name: str = "prompt",
          images_name: str = "images") -> Request:
    """The request of ``prompt`` (a string or chat messages) with ``images`` under ``config``.

    Parameters
    ----------
    prompt : str or list of dict
    images : None, one image or a list (PIL images, paths, tensors ``[C, H, W]``)
        They fill the prompt's image parts (see :func:`dreamr.multimodal.prepare_prompt`).
    config : ReasonerConfig
    target, draft : LM
        The two models; only those ``config.mode`` runs encode the prompt.
    verifier : StepVerifier, optional
        The target's verifier for ``config`` (None for the single-model modes).
    threshold : AdaptiveAlpha, optional
        The adaptive threshold where ``config.alpha`` is "auto".
    name, images_name : str
        How the caller names the prompt and the images, for the error messages.

    Raises
    ------
    ValueError
        An empty or malformed prompt, images no model of the mode can see, a vision-language model
        without its processor, or a prompt that leaves a model no room to generate.
    """
    _check_prompt(prompt, name)
    used = models_of(config.mode, target, draft)
    mm = prepare_prompt(prompt, images, name=name, images_name=images_name)
    if mm is not None:
        _check_can_see(mm, config.mode, used, target, draft, images_name)
    elif not isinstance(prompt, str) and any(not isinstance(m["content"], str) for m in prompt):
        prompt = [{**m, "content": text_of(m["content"])} for m in prompt]  # text parts only
    if threshold is None and config.auto_alpha and verifier is not None:
        # a request on its own: a fresh rule
        threshold = AdaptiveAlpha(config.target_acceptance, config.alpha_gamma)
    t_ids, t_inputs = _encode(target, prompt, mm, name) if target in used else ([], None)
    d_ids, d_inputs = _encode(draft, prompt, mm, name) if draft in used else ([], None)
    return Request(prompt=prompt, config=config, verifier=verifier,
                   target_ids=list(t_ids), draft_ids=list(d_ids), images=None if mm is None else mm.images,
                   target_inputs=t_inputs, draft_inputs=d_inputs, threshold=threshold)
