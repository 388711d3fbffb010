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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from dreamr.steps import StepWriter

__all__ = [
    "LM",
    "Prompt",
    "encode_prompt",
    "text_config",
    "eos_ids",
    "context_length",
    "logit_softcap",
    "logit_scale",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "decoder_of",
    "lm_head_of",
    "AttentionLayout",
    "attention_layout",
    "ragged_masks_fit",
    "eager_attention",
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


def lm_head_of(model, arg: str = "model") -> torch.nn.Module:
    """The LM head of ``model`` (its output embedding, with a ``weight [V, H]`` and maybe a ``bias [V]``).

    Raises ValueError naming ``arg`` where the model has none (CPN scores the verdict rows of this head)."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{arg}: {type(model).__name__} has no output embedding (LM head) to score verdicts "
                         "with; dreamr needs a transformers causal LM")
    return head


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


@dataclass(frozen=True)
class AttentionLayout:
    """Which mask each decoder layer of a model takes: what the ragged batches of mode "fpsr" build
    (``dreamr/engines/ragged.py``; see ``docs/architecture.md``, layer "model facts and text").

    Attributes
    ----------
    mask_of_layer : dict of str to str
        ``{layer type: mask kind}`` for a model whose forward takes one mask per layer type (its config
        has ``layer_types``: Gemma 2 / 3, Qwen2 and newer Llamas); mask kinds are "full" (causal) and
        "sliding" (causal within ``sliding_window`` positions). Empty for a model that takes one mask.
    single_kind : str
        The kind of that one mask where ``mask_of_layer`` is empty: "sliding" for a Mistral-style config
        (``sliding_window`` without ``layer_types``: every layer slides), else "full".
    sliding_window : int or None
        Positions a sliding layer sees, its own included (a query at position q sees keys at positions
        ``q - sliding_window < k <= q``, as transformers' sliding masks do).
    """

    mask_of_layer: dict = field(default_factory=dict)
    single_kind: str = "full"
    sliding_window: Optional[int] = None

    @property
    def kinds(self) -> list[str]:
        """The mask kinds a forward needs, sorted ("full", "sliding")."""
        return sorted(set(self.mask_of_layer.values())) if self.mask_of_layer else [self.single_kind]


# Layer types whose mask the ragged batches can build; anything else (chunked attention, linear attention,
# recurrent or convolutional layers of hybrid models) is refused by attention_layout.
_MASK_KINDS = {"full_attention": "full", "sliding_attention": "sliding"}


def attention_layout(model) -> AttentionLayout:
    """The :class:`AttentionLayout` of ``model``'s text config, or ValueError naming the model type and
    the feature the ragged masks of mode "fpsr" cannot reproduce.

    Refused: chunked attention (Llama 4's ``attention_chunk_size`` / ``"chunked_attention"`` layers), any
    layer type other than full and sliding attention, and sliding layers without a window size."""
    config = text_config(model)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    window = getattr(config, "sliding_window", None)
    window = int(window) if window else None
    layer_types = list(getattr(config, "layer_types", None) or [])
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk or "chunked_attention" in layer_types:
        raise ValueError(f"{model_type}: chunked attention (attention_chunk_size={chunk}) is not supported by mode "
                         "'fpsr' (its ragged masks are causal or sliding-window only); use mode 'speculative'")
    unknown = sorted(set(layer_types) - set(_MASK_KINDS))
    if unknown:
        raise ValueError(f"{model_type}: layer types {unknown} are not supported by mode 'fpsr' (its ragged masks "
                         "cover full_attention and sliding_attention layers only); use mode 'speculative'")
    if "sliding_attention" in layer_types and window is None:
        raise ValueError(f"{model_type}: sliding_attention layers without a sliding_window size; set "
                         "config.sliding_window or use mode 'speculative'")
    if layer_types:
        return AttentionLayout({lt: _MASK_KINDS[lt] for lt in layer_types}, "full", window)
    # No layer types: one mask for every layer, sliding where the config names a window (Mistral; its
    # forward picks create_sliding_window_causal_mask exactly when config.sliding_window is set)
    return AttentionLayout({}, "sliding" if window is not None else "full", window)


def ragged_masks_fit(model) -> bool:
    """Whether the ragged batches' prepared 4-D masks (dreamr/engines/ragged.py) reproduce ``model``'s
    attention: a layout :func:`attention_layout` accepts, and an attention that takes such a mask (eager or
    sdpa; flash-attention kernels take none)."""
    try:
        attention_layout(model)
    except ValueError:
        return False
    return getattr(model.config, "_attn_implementation", "sdpa") in ("eager", "sdpa")


def eager_attention(model) -> bool:
    """True where the model runs eager attention (it adds its mask to the scores: an additive mask),
    False for sdpa and the other kernels (they take a boolean mask)."""
    return getattr(model.config, "_attn_implementation", "sdpa") == "eager"


def is_vision_language(model_or_config) -> bool:
    """True for a model, or a model's config, with a vision tower (``config.vision_config``); a config is
    taken as it is (so that a loader can tell before it picks the model class)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "vision_config", None) is not None


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


def encode_prompt(tokenizer, prompt: Prompt, name: str = "model") -> list[int]:
    """Token ids of a prompt: plain text with the tokenizer's special tokens, or chat messages through the
    tokenizer's chat template (with the generation prompt). ``name`` is the model's role, for the error.

    The one encoding of a prompt: the in-process models (:class:`LM`) and the remote ones
    (:mod:`dreamr.backends.vllm`, which send these ids to a server) both call it."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"prompt: chat messages given but the {name} tokenizer has no chat template; "
                         "pass the prompt as a string")
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


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

    ``decoder``, ``num_layers``, ``num_kv_heads``, ``head_dim``, and ``attention_layout`` are read on first
    use: only verification needs the decoder, only mode "fpsr" the KV and attention layouts (where a model's
    attention cannot be masked by mode "fpsr", reading ``attention_layout`` raises ValueError).
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

    @functools.cached_property
    def attention_layout(self) -> AttentionLayout:
        return attention_layout(self.model)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (:func:`encode_prompt` with this model's tokenizer)."""
        return encode_prompt(self.tokenizer, prompt, self.name)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def step_ids(self, writer: "StepWriter", same_tokenizer: bool) -> list[int]:
        """A step written by the other model, in this model's tokens: the writer's own ids (without a
        final EOS) where both models tokenize alike, else its text re-tokenized."""
        return writer.content_ids if same_tokenizer else self.encode_text(writer.text)
