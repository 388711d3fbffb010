"""A causal LM with its tokenizer, and every fact dreamr reads off a transformers model, read here once.

The engines, the verifier, the ragged batches of mode "fpsr" and the SAPO trainer all take what they
need to know about a model from this module: its text config, EOS ids, context length, logit soft-capping
and scaling, the decoder that returns hidden states, the KV layout (layers, KV heads, head size), whether
it sees images, and how a processor splits into processor and tokenizer. See ``docs/architecture.md``
(layer "model facts and text").

    lm = LM(model, tokenizer, "target")
    lm.context_length, lm.eos_ids, lm.logit_softcap, lm.num_kv_heads, lm.head_dim
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Sequence, Union

import torch

if TYPE_CHECKING:
    from dreamr.steps import StepWriter

__all__ = [
    "LM",
    "Prompt",
    "text_config",
    "eos_ids",
    "context_length",
    "logit_softcap",
    "logit_scale",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "decoder_of",
    "is_vision_language",
    "split_processor",
]

Prompt = Union[str, Sequence[dict]]

# A model whose config names no context length is not limited by dreamr.
UNLIMITED_CONTEXT = 1 << 62


def text_config(model) -> Any:
    """The config of ``model``'s language model: ``config.get_text_config()`` where the config has one (a
    vision-language model's ``text_config``; a text model's own config), else ``model.config``."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def eos_ids(model, tokenizer, config: Any = None) -> set[int]:
    """The token ids that end generation: the union of ``tokenizer.eos_token_id``,
    ``model.generation_config.eos_token_id`` and ``config.eos_token_id`` (each an int, a list or None).

    ``config`` defaults to the text config (:func:`text_config`), which is what the engines read. The
    SAPO trainer passes ``model.config`` (the top-level config); for a text model the two are the same
    object, for a vision-language draft the top-level config and its text config may name different ids.
    """
    config = text_config(model) if config is None else config
    eos: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(config, "eos_token_id", None)):
        if source is None:
            continue
        eos.update([source] if isinstance(source, int) else list(source))
    return {int(t) for t in eos}


def context_length(model) -> int:
    """Positions the model can attend over (``max_position_embeddings`` of its text config), or a
    practically unlimited number where the config names none."""
    return int(getattr(text_config(model), "max_position_embeddings", None) or UNLIMITED_CONTEXT)


def logit_softcap(model) -> float:
    """Final-logit soft-cap ``c`` (Gemma 2 / 3: logits become ``c * tanh(logits / c)``); 0.0 for none."""
    return float(getattr(text_config(model), "final_logit_softcapping", None) or 0.0)


def logit_scale(model) -> float:
    """The factor the LM head's logits are multiplied by; 1.0 for none.

    Cohere (``logit_scale``) multiplies the logits, Granite (``logits_scaling``) divides them: both are
    given here as one multiplier."""
    config = text_config(model)
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        return float(scale)
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        return 1.0 / float(scaling)
    return 1.0


def num_layers(model) -> int:
    """Decoder layers (``num_hidden_layers`` of the text config)."""
    return int(text_config(model).num_hidden_layers)


def num_kv_heads(model) -> int:
    """Key/value heads per layer: ``num_key_value_heads`` (grouped-query attention), else one per
    attention head."""
    config = text_config(model)
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def head_dim(model) -> int:
    """Size of one attention head: ``head_dim`` where the config names it, else ``hidden_size`` over the
    attention heads."""
    config = text_config(model)
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def decoder_of(model) -> torch.nn.Module:
    """The module of ``model`` that returns its final hidden states without the LM head (so no ``[n, V]``
    logits are formed): its ``base_model``, else ``get_decoder()``, else ``model.model``.

    Raises ValueError naming the model's class where it has none of them."""
    def getters():
        yield lambda: getattr(model, "base_model", None)
        yield lambda: model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
        yield lambda: getattr(model, "model", None)

    for get in getters():
        try:
            found = get()
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            found = None
        if isinstance(found, torch.nn.Module) and found is not model:
            return found
    raise ValueError(f"{type(model).__name__}: no decoder module without the LM head was found (none of base_model, "
                     "get_decoder(), .model); dreamr needs a transformers causal LM whose decoder returns "
                     "last_hidden_state")


def is_vision_language(model) -> bool:
    """True for a model whose config has a vision tower (``config.vision_config``)."""
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def split_processor(tokenizer: Any) -> tuple[Any, Any]:
    """``(processor, tokenizer)`` of what was given as a model's tokenizer.

    A vision-language processor (it has an ``image_processor`` and a ``tokenizer``) gives itself and the
    tokenizer inside it (text goes through that tokenizer); another wrapper without ``encode`` but with a
    ``tokenizer`` gives ``(None, its tokenizer)``; anything else (a tokenizer, None) ``(None, tokenizer)``.
    """
    if tokenizer is None:
        return None, None
    if hasattr(tokenizer, "image_processor") and hasattr(tokenizer, "tokenizer"):
        return tokenizer, tokenizer.tokenizer
    if not hasattr(tokenizer, "encode") and hasattr(tokenizer, "tokenizer"):
        return None, tokenizer.tokenizer
    return None, tokenizer


class LM:
    """A causal LM with its tokenizer, and what the engines need to know about the pair.

    Parameters
    ----------
    model : transformers causal LM (text or vision-language)
    tokenizer : its tokenizer (a processor's inner tokenizer; see :func:`split_processor`)
    name : str
        Its role, for messages ("target", "draft").
    processor : transformers processor, optional
        A vision-language model's processor (None for a text model).

    Attributes
    ----------
    vision : bool
        It sees images (:func:`is_vision_language`).
    device, dtype : where its parameters live.
    text_config : its language model's config (:func:`text_config`).
    context_length : int
    eos_ids : set of int
    logit_softcap : float (0.0: none)
    logit_scale : float (1.0: none; a multiplier of the logits)

    ``decoder``, ``num_layers``, ``num_kv_heads`` and ``head_dim`` are read on first use: only verification
    needs the decoder, only mode "fpsr" the KV layout.
    """

    def __init__(self, model, tokenizer, name: str, processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.vision = is_vision_language(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.text_config = text_config(model)
        self.context_length = context_length(model)
        self.eos_ids: set[int] = eos_ids(model, tokenizer)
        self.logit_softcap = logit_softcap(model)
        self.logit_scale = logit_scale(model)

    @functools.cached_property
    def decoder(self) -> torch.nn.Module:
        return decoder_of(self.model)

    @functools.cached_property
    def num_layers(self) -> int:
        return num_layers(self.model)

    @functools.cached_property
    def num_kv_heads(self) -> int:
        return num_kv_heads(self.model)

    @functools.cached_property
    def head_dim(self) -> int:
        return head_dim(self.model)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: plain text with the tokenizer's special tokens, or chat messages through
        the tokenizer's chat template (with the generation prompt)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"prompt: chat messages given but the {self.name} tokenizer has no chat template; "
                             "pass the prompt as a string")
        text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def step_ids(self, writer: "StepWriter", same_tokenizer: bool) -> list[int]:
        """A step written by the other model, in this model's tokens: the writer's own ids (without a
        final EOS) where both models tokenize alike, else its text re-tokenized."""
        return writer.content_ids if same_tokenizer else self.encode_text(writer.text)
