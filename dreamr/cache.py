"""KV caches: rollback over plain transformers caches, the image prefix of a prompt, and a token sequence
that owns a cache.

Caches are ``transformers.DynamicCache`` objects built without a config, so every layer keeps the full
sequence (a sliding-window layer that has dropped old positions could not be rolled back). Rollback goes
through the core op :func:`dreamr.ops.kv_rollback` where rows keep different lengths (every row kept to its
length, shorter rows zeroed up to the longest, in one call over all layers), then the time axis is cropped
with ``DynamicCache.crop(-n)``; where all rows keep the same length (batch size 1) the crop is all it takes.

The image prefix
----------------
A vision-language model's prompt with images (its processor's inputs, see :mod:`dreamr.multimodal`) is
encoded once per request: :func:`encode_prefix` runs the model's decoder over the first ``P - 1`` tokens
with the images (the vision encoder runs there and only there) and returns an :class:`ImagePrefix`, that
KV cache and the position offset of the text that follows. Every later forward (decode steps,
verifications, rollbacks, FPSR branches) feeds text tokens only, on top of that cache or of a copy of it;
the last prompt token stays pending so that the first decode step has something to feed.

Positions: Qwen2-VL and Qwen2.5-VL give image tokens 3-D rotary positions (temporal, height, width)
computed by the model's ``get_rope_index``; text after the last image continues at ``index + rope_delta``
on all three axes (``rope_delta <= 0``: an image of ``h x w`` merged patches takes ``h * w`` tokens but
spans ``max(h, w)`` positions). So once the prefix is cached, the text token at sequence index ``i`` has
position ``i + offset`` with ``offset = rope_delta`` (0 for LLaVA and text models); the engines pass it as
``position_ids [B, T]``, which these models broadcast to their three rotary axes. Positions are always
passed explicitly to a vision-language model: its own ``rope_deltas`` attribute belongs to whichever
request ran last.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from transformers import DynamicCache

from dreamr.lm import decoder_of, is_vision_language

__all__ = ["new_cache", "cache_tensors", "cache_length", "rollback", "cache_kwarg", "ImagePrefix", "encode_prefix",
           "SequenceIds", "CachedSequence"]


def new_cache() -> DynamicCache:
    """An empty cache whose layers all keep the full sequence (so it can be rolled back)."""
    return DynamicCache()


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"cache: expected a transformers DynamicCache with .layers, got {type(cache).__name__}")
    return [layer for layer in layers if getattr(layer, "is_initialized", True) and layer.keys is not None
            and layer.keys.numel() > 0]


def cache_tensors(cache) -> list[torch.Tensor]:
    """Keys and values of every filled layer, each ``[B, H_kv, T, D]``."""
    out = []
    for layer in _layers(cache):
        out += [layer.keys, layer.values]
    return out


def cache_length(cache) -> int:
    """Positions held by the cache (its time axis)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def rollback(cache, lengths: Union[int, Sequence[int]]) -> None:
    """Roll ``cache`` back so that row ``b`` keeps its first ``lengths[b]`` positions.

    Where rows keep different lengths, calls :func:`dreamr.ops.kv_rollback` once per group of tensors of one
    shape and layout (usually one group: all layers); then crops the time axis to ``max(lengths)``. Rows shorter than the new time axis are
    zero past their length; the caller masks them (batch size 1 needs no mask).

    Raises ValueError where a length is negative or past the cache's end, or where a layer keeps only
    a sliding window (it has already dropped positions and cannot be rolled back).
    """
    from dreamr import ops  # the compiled core; imported here so that importing dreamr.cache stays cheap

    current = cache_length(cache)
    layers = _layers(cache)
    if not layers:
        if (lengths if isinstance(lengths, int) else max(lengths, default=0)) != 0:
            raise ValueError(f"rollback: lengths={lengths} but the cache is empty")
        return
    batch = layers[0].keys.shape[0]
    if isinstance(lengths, int):
        lengths = [lengths] * batch
    lengths = [int(n) for n in lengths]
    if len(lengths) != batch:
        raise ValueError(f"rollback: lengths has {len(lengths)} entries for a cache of batch size {batch}")
    if any(n < 0 or n > current for n in lengths):
        raise ValueError(f"rollback: lengths={lengths} must lie in [0, {current}] (the cache's length)")
    if all(n == current for n in lengths):
        return
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise ValueError(
                "rollback: the cache has a sliding-window layer, which drops old positions and cannot be "
                "rolled back; build the cache with dreamr.cache.new_cache() (DynamicCache() without config)"
            )
    new_max = max(lengths)
    # The op zeroes each row's dead span up to the longest kept row; where every row keeps the same
    # length (always at batch size 1, mode "speculative") there is no such span and crop() below does all.
    if min(lengths) < new_max:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in cache_tensors(cache):
            groups.setdefault((tuple(t.shape), t.stride(), t.dtype, t.device), []).append(t)
        for tensors in groups.values():  # crop() leaves strided views: the op takes them as they are
            for start in range(0, len(tensors), ops.MAX_CACHE_TENSORS):
                ops.kv_rollback(tensors[start:start + ops.MAX_CACHE_TENSORS], lengths)
    if new_max < current:
        cache.crop(new_max - current)


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_kwarg(model) -> str:
    """The forward keyword that takes a cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def accepts_kwarg(model, name: str) -> bool:
    return name in _forward_params(type(model))


@dataclass
class ImagePrefix:
    """A model's KV cache of a prompt with images, encoded once per request.

    Attributes
    ----------
    ids : list of int
        The whole prompt, ``P`` tokens, image placeholders expanded.
    cache : transformers.DynamicCache
        Keys and values of ``ids[:P - 1]``, each layer ``[1, H_kv, P - 1, D]``; ``ids[P - 1]`` (text) is
        left pending.
    position_offset : int
        The text token at sequence index ``i >= P - 1`` has rotary position ``i + position_offset``.
    encode_time_s : float
        Wall seconds of the prefix forward (the vision encoder included).
    """

    ids: list[int]
    cache: Any
    position_offset: int
    encode_time_s: float

    @property
    def cached(self) -> int:
        return len(self.ids) - 1


def _rope_index(base, inputs: dict) -> tuple[Optional[torch.Tensor], int]:
    """The model's own multimodal rotary positions ``[3, 1, P]`` and text offset, or ``(None, 0)``."""
    fn = getattr(base, "get_rope_index", None)
    if fn is None:
        return None, 0
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params}
    position_ids, deltas = fn(**kwargs)
    return position_ids, int(torch.as_tensor(deltas).reshape(-1)[0])


@torch.no_grad()
def encode_prefix(model, inputs: dict, name: str = "prompt") -> ImagePrefix:
    """Run ``model``'s base model once over the prompt's first ``P - 1`` tokens with its images.

    Parameters
    ----------
    model : a transformers vision-language model (``...ForConditionalGeneration``)
    inputs : dict
        Its processor's output for one prompt (:func:`dreamr.multimodal.processor_inputs`): ``input_ids [1, P]``,
        ``pixel_values`` and whatever else the model's forward takes (``image_grid_thw [N, 3]``,
        ``mm_token_type_ids [1, P]``, ...).
    name : str
        How the caller names the prompt, for the error message.

    Returns
    -------
    ImagePrefix
        The cache of ``input_ids[0, :P - 1]`` and the position offset of the text after it.
    """
    start = time.perf_counter()
    base = decoder_of(model)
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    input_ids = inputs["input_ids"]
    P = int(input_ids.shape[1])
    position_ids, offset = _rope_index(base, inputs)
    if position_ids is not None:
        last = position_ids[:, 0, -1]
        if not bool((last == P - 1 + offset).all()):
            raise ValueError(f"{name}: the last prompt token is not text after the images (its rotary positions are "
                             f"{last.tolist()}); end a vision-language prompt with text")
    extra = {}
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask"):
            continue
        if isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == (1, P):
            v = v[:, :P - 1]  # per-token inputs (mm_token_type_ids) follow the ids
        extra[k] = v
    cache = new_cache()
    kwargs = {cache_kwarg(base): cache, "use_cache": True}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids[..., :P - 1]
    base(input_ids=input_ids[:, :P - 1], **extra, **kwargs)
    return ImagePrefix([int(t) for t in input_ids[0].tolist()], cache, offset, time.perf_counter() - start)


class SequenceIds:
    """What a model's sequence does with its committed ids ``ids``, whatever holds its cache: a subclass
    gives ``cached``, ``min_cached`` (positions never rolled back) and ``_drop_cached``."""

    ids: list[int]
    min_cached: int

    def extend(self, ids: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in ids)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens; the cache is rolled back past them."""
        if not self.min_cached <= length <= len(self.ids):
            raise ValueError(f"truncate: length={length} outside [{self.min_cached}, {len(self.ids)}]"
                             + (" (the image prefix stays)" if self.min_cached else ""))
        del self.ids[length:]
        self.uncache_to(length)

    def uncache_to(self, length: int) -> None:
        """Roll the cache back to ``length`` positions without changing ``ids`` (they become pending)."""
        if length < self.min_cached:
            raise ValueError(f"uncache_to: length={length} would drop the image prefix ({self.min_cached} positions)")
        if self.cached > length:
            self._drop_cached(length)

    def _drop_cached(self, length: int) -> None:  # pragma: no cover - every subclass has its own
        """Drop the cache's entries past its first ``length`` positions."""
        raise NotImplementedError


class CachedSequence(SequenceIds):
    """A model's token sequence and the KV cache of its prefix (batch size 1).

    ``ids`` is the committed token sequence; the cache holds the keys and values of ``ids[:cached]``
    and the rest is pending (fed at the next forward). Truncating ``ids`` rolls the cache back;
    extending ``ids`` costs nothing until the next forward. ``forward_passes`` counts the model's
    forward calls made through this object.

    ``prefix`` (an :class:`ImagePrefix`, whose ids start ``ids``) hands over the cache
    of a prompt with images, encoded once: the sequence then never rolls back into it, and feeds its
    text with explicit ``position_ids [1, n]`` (index + the prefix's position offset), as it does for
    any vision-language model.
    """

    def __init__(self, model, ids: Sequence[int], *, device: Optional[torch.device] = None, prefix=None):
        self.model = model
        self.ids: list[int] = list(ids)
        self.cache = new_cache()
        self.device = device if device is not None else next(model.parameters()).device
        self.forward_passes = 0
        self._cache_kw = cache_kwarg(model)
        self._logits_to_keep = accepts_kwarg(model, "logits_to_keep")
        # Vision-language models get explicit positions (text index + offset; see "Positions" above).
        self._explicit_positions = is_vision_language(model)
        self.position_offset = 0
        self.min_cached = 0  # the image prefix is never rolled back
        if prefix is not None:  # an ImagePrefix: its cache becomes this sequence's
            if list(self.ids[:len(prefix.ids)]) != prefix.ids:
                raise ValueError("CachedSequence: ids must start with the image prefix's ids")
            self.cache = prefix.cache
            self.position_offset = int(prefix.position_offset)
            self.min_cached = prefix.cached
            self._explicit_positions = True

    @property
    def cached(self) -> int:
        return cache_length(self.cache)

    def _drop_cached(self, length: int) -> None:
        rollback(self.cache, length)

    def _feed(self, extra: Sequence[int] = (), *, last: bool = False) -> tuple[torch.Tensor, dict]:
        """The tokens of the next forward, ``x [1, n]`` (the pending ones, then ``extra``), and its keyword
        arguments without the cache: ``use_cache`` and, for vision-language models, explicit
        ``position_ids [1, n]`` (index + offset; see "Positions" above).

        Where everything is cached and the output at the last committed token is wanted (always where
        nothing is fed after it; also with ``extra`` when ``last``), that token is re-fed. The cache's
        length is read once: this runs before every forward of every decoded token.
        """
        cached = self.cached
        if cached == len(self.ids) and (last or not extra):
            self.uncache_to(cached - 1)
            cached -= 1
        pending = self.ids[cached:]
        if extra:
            pending += [int(t) for t in extra]
        x = torch.tensor([pending], dtype=torch.long, device=self.device)
        kwargs = {"use_cache": True}
        if self._explicit_positions:
            kwargs["position_ids"] = (torch.arange(cached, cached + len(pending), device=self.device)
                                      + self.position_offset).unsqueeze(0)
        return x, kwargs

    @torch.no_grad()
    def _logits(self, extra: Sequence[int], keep: int) -> torch.Tensor:
        """One full-model forward over the pending tokens and ``extra``; the last ``keep`` positions'
        logits ``[keep, V]`` (the LM head runs on those only where the model takes ``logits_to_keep``)."""
        x, kwargs = self._feed(extra, last=True)
        kwargs[self._cache_kw] = self.cache
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=x, **kwargs)
        self.forward_passes += 1
        return out.logits[0, -keep:]

    def next_logits(self) -> torch.Tensor:
        """Feed the pending tokens; return the next-token logits, shape ``[V]``."""
        if not self.ids:
            raise ValueError("next_logits: the sequence is empty")
        return self._logits((), 1)[0]

    def logits_over(self, extra: Sequence[int]) -> torch.Tensor:
        """Feed the pending tokens plus ``extra`` (a proposal, which stays out of ``ids``) in one forward.

        Returns the logits at the last pending position and at each of ``extra``, shape
        ``[len(extra) + 1, V]``: row i predicts the token after ``ids + extra[:i]``. The cache then holds
        ``extra`` too: the caller rolls back what it does not keep (token-level speculation, see
        :mod:`dreamr.speculation`).
        """
        if not self.ids:
            raise ValueError("logits_over: the sequence is empty")
        return self._logits(extra, len(extra) + 1)

    @functools.cached_property
    def _decoder(self) -> tuple[torch.nn.Module, str]:
        """The model's decoder (no LM head) and its cache keyword, looked up once, on first use (only
        verification needs it: a draft's sequence never does)."""
        base = decoder_of(self.model)
        return base, cache_kwarg(base)

    @torch.no_grad()
    def last_hidden(self, extra: Sequence[int]) -> torch.Tensor:
        """Feed the pending tokens plus ``extra`` (which stay out of ``ids``) through the base model.

        Returns the final hidden state (after the last norm) at the last position, shape ``[1, H]``; no
        LM head is applied. The cache then holds ``extra`` too: the caller rolls it back.
        """
        base, cache_kw = self._decoder
        x, kwargs = self._feed(extra)
        kwargs[cache_kw] = self.cache
        hidden = base(input_ids=x, **kwargs).last_hidden_state
        self.forward_passes += 1
        return hidden[:, -1, :].contiguous()

