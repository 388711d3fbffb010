"""Tiny random models and fixed-acceptance judges, for tests and benchmarks (like ``torch.testing``).

Models
------
Two byte-level BPE tokenizers are trained in milliseconds on a small corpus (:data:`CORPUS`, so that
"Yes" / " Yes" / " No" and "\\n\\n" are single tokens) with different vocabularies
(:func:`target_tokenizer`, :func:`draft_tokenizer`), so that a draft / target pair exercises
re-tokenization. :func:`tiny_llama`, :func:`tiny_qwen2` and :func:`tiny_gemma3` are tiny random configs
in float64, which makes greedy comparisons between code paths exact; :func:`random_llama` builds a
random Llama of a chosen (realistic) size for speed measurements. Nothing here downloads anything.
Vision-language counterparts (:func:`qwen2_vl`, :func:`qwen2_5_vl`, :func:`llava`) are at the end.

Judges
------
A random tiny target scores every step about alike, so no alpha mixes accepted and rejected steps
reliably. The judges keep the real verification path (the verdict forward pass, rollback, commit) and
replace only the score, the verifier's ``cpn(hidden, alpha)``: :func:`content_cpn` makes it a
pseudo-random function of the verdict hidden state (the same for a step whatever the run),
:class:`FixedAcceptance` accepts each verified step with a fixed probability (seeded draws). Acceptance
is decided by :func:`dreamr.reference.accepts`, the library's one rule (``cpn > alpha``).

This module imports torch, and transformers / tokenizers inside the builders; it never imports pytest.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

import numpy as np
import torch

from dreamr.reference import accepts

__all__ = ["CORPUS", "CHAT_TEMPLATE", "PROMPTS", "TINY_SETTINGS", "build_tokenizer", "target_tokenizer",
           "draft_tokenizer", "tiny_model", "tiny_llama", "tiny_qwen2", "tiny_gemma3", "random_llama", "content_cpn",
           "ContentJudge", "FixedAcceptance", "bpe_tokenizer", "qwen2_vl", "qwen2_5_vl", "llava",
           "vision_module", "random_image", "misaligned_cache", "fresh_ragged_cache"]

CORPUS = [
    "Yes No yes no YES NO Yes. No. correct wrong right",
    "Is the last step correct? Answer Yes or No.\nAnswer: Yes\n\nAnswer: No\n\n",
    "Step 1: 2 + 2 = 4.\n\nStep 2: 4 * 3 = 12.\n\nThe answer is 12.\n\n#### 12\n\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? Let us think step by step.",
]
"""The tokenizers' training text (the vision-language families' tokenizers too)."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "Step 1: 2 + 2 = 4.\n\n",
    "How many clips did Natalia sell altogether?",
    "Is the last step correct?",
]
"""Prompts the tiny models write a few steps for."""

TINY_SETTINGS = {"max_step_tokens": 6, "max_new_tokens": 30, "draft_policy": "always", "proposal_policy": "always"}
"""Reasoner settings for the tiny pairs: a few short steps per request, every step drafted and every
proposal checked (tests hold mode "speculative" and mode "fpsr" to the same commits and counters; adaptive
drafting and the adaptive proposal gate, mode "speculative"'s defaults, change which steps are drafted and
which proposals checked, and are tested on their own in ``tests/test_speculation.py``)."""


def _train_bpe(corpus: list[str], special: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus`` (20 times over) with ``special`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 20, trainer)
    return tok


def build_tokenizer(vocab_size: int = 400, *, reverse: bool = False, bos: bool = True):
    """A byte-level BPE tokenizer trained offline; ``reverse`` trains on another corpus order (other ids).

    ``bos``: prepend ``<|bos|>`` to every encoding. The chat template is :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|bos|>"] if not reverse else ["<|bos|>", "<pad>", "<|endoftext|>"]
    tok = _train_bpe(CORPUS[::-1] if reverse else CORPUS, special, vocab_size)
    if bos:
        bos_id = tok.token_to_id("<|bos|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos_id)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def target_tokenizer():
    """The tiny target's tokenizer ("tokenizer A": 400 tokens, ``<|bos|>`` prepended)."""
    return build_tokenizer(400)


def draft_tokenizer():
    """The tiny draft's tokenizer ("tokenizer B": 330 tokens, other ids than A's, no BOS)."""
    return build_tokenizer(330, reverse=True, bos=False)


def tiny_model(config_cls, model_cls, tokenizer, *, layers: int = 2, seed: int = 0, dtype=torch.float64, **extra):
    """A random model of any transformers family (``config_cls``, ``model_cls``: e.g. ``MistralConfig``,
    ``MistralForCausalLM``) with hidden size 32, 4 heads, 2 KV heads and ``layers`` layers over
    ``tokenizer``'s vocabulary, in eval mode; ``extra`` goes to the config (a family's own fields, e.g.
    ``sliding_window=5`` or ``logit_scale=0.25``)."""
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **extra,
    )
    return model_cls(config).to(dtype).eval()


def tiny_llama(tokenizer, *, layers: int = 2, seed: int = 0, dtype=torch.float64):
    """A random Llama (hidden 32, 4 heads, 2 KV heads) over ``tokenizer``'s vocabulary, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return tiny_model(LlamaConfig, LlamaForCausalLM, tokenizer, layers=layers, seed=seed, dtype=dtype,
                      tie_word_embeddings=False)


def tiny_qwen2(tokenizer, *, layers: int = 1, seed: int = 1, dtype=torch.float64):
    """A random Qwen2 (hidden 32, 4 heads, 2 KV heads) over ``tokenizer``'s vocabulary, in eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return tiny_model(Qwen2Config, Qwen2ForCausalLM, tokenizer, layers=layers, seed=seed, dtype=dtype)


def tiny_gemma3(tokenizer, *, seed: int = 2, dtype=torch.float64):
    """A Gemma 3 text model with sliding-window layers and logit soft-capping (like the real target)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256, final_logit_softcapping=30.0,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=0,
    )
    return Gemma3ForCausalLM(config).to(dtype).eval()


def random_llama(tokenizer, hidden: int, layers: int, intermediate: int, dtype=torch.bfloat16, device="cpu",
                 seed: int = 0):
    """A random-weight Llama of a realistic size (heads of 64, grouped-query KV heads, tied embeddings)
    with ``tokenizer``'s vocabulary, built on ``device`` directly; for speed measurements.

    ``hidden`` must be a positive multiple of 64 (the head size); ``layers`` and ``intermediate`` positive.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if int(hidden) < 64 or int(hidden) % 64:
        raise ValueError(f"hidden must be a positive multiple of 64 (heads of 64), got {hidden!r}; "
                         "use tiny_llama for smaller models")
    for name, value in (("layers", layers), ("intermediate", intermediate)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    heads = hidden // 64
    kv_heads = max(d for d in range(1, min(8, heads) + 1) if heads % d == 0)  # grouped-query, as real models
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


# -- judges ---------------------------------------------------------------------------------------------


def content_cpn(verifier) -> Callable:
    """A replacement for ``verifier.cpn``: cpn = frac(997 * sum|h|) of each verdict hidden state.

    Returns ``cpn(hidden, alpha=None) -> (cpn [B] float32, accepted [B] bool)`` (``hidden``: ``[B, H]``);
    ``alpha`` None uses ``verifier.alpha``. The score depends on the step's content only, so a step gets
    the same verdict whatever the run.
    """

    def cpn(hidden: torch.Tensor, alpha: Optional[float] = None):
        a = verifier.alpha if alpha is None else alpha
        c = ((hidden.double().abs().sum(dim=1) * 997.0) % 1.0).float()
        return c, accepts(c, a)

    return cpn


class _ReplacedVerdicts:
    """Swaps ``verifier.cpn`` for :meth:`cpn` while active (a context manager); restores it on exit."""

    def __init__(self, verifier):
        self.verifier = verifier
        self._orig = None

    def cpn(self, hidden: torch.Tensor, alpha: Optional[float] = None):  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        self._orig = self.verifier.cpn
        self.verifier.cpn = self.cpn
        return self

    def __exit__(self, *exc):
        self.verifier.cpn = self._orig


class ContentJudge(_ReplacedVerdicts):
    """:func:`content_cpn` as a context manager: ``with ContentJudge(verifier): ...``."""

    def __init__(self, verifier):
        super().__init__(verifier)
        self._cpn = content_cpn(verifier)

    def cpn(self, hidden: torch.Tensor, alpha: Optional[float] = None):
        return self._cpn(hidden, alpha)


class FixedAcceptance(_ReplacedVerdicts):
    """Verdicts that accept each verified step with probability ``a`` (seeded draws), whatever alpha.

    cpn is 1.0 for an accepted step and 0.0 for a rejected one. ``reseed(seed)`` restarts the draws (give
    each mode the same draws on a problem).
    """

    def __init__(self, verifier, a: float, seed: int = 0):
        super().__init__(verifier)
        self.a, self.rng = a, random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def cpn(self, hidden: torch.Tensor, alpha: Optional[float] = None):
        n = hidden.shape[0]
        c = torch.tensor([1.0 if self.rng.random() < self.a else 0.0 for _ in range(n)])
        return c, accepts(c, 0.5)


# -- vision-language models ----------------------------------------------------------------------------
# Tiny random vision-language models with their real processors, built offline (tests and benchmarks).
#
# - Qwen2-VL: ``Qwen2VLForConditionalGeneration`` (multimodal rotary positions), ``Qwen2VLProcessor`` with
#   its image processor (images resized to 28..56 pixels a side: 1 to 4 merged image tokens);
# - LLaVA: ``LlavaForConditionalGeneration`` over a CLIP vision tower and a Llama, ``LlavaProcessor`` with
#   a CLIP image processor (28 x 28 crops: 4 patches + the class token);
# - a text-only draft: :func:`dreamr.testing.tiny_qwen2` with its own tokenizer.
#
# Tokenizers are byte-level BPEs trained in milliseconds on :data:`dreamr.testing.CORPUS`, with each
# family's special tokens; chat templates render ``{"type": "image"}`` parts as the family's placeholder. Models are float64
# so that greedy comparisons between code paths are exact.

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_SPECIAL = ["<|endoftext|>", "<|bos|>", "<image>"]
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def bpe_tokenizer(special: list[str], vocab_size: int = 400):
    """A byte-level BPE over :data:`~dreamr.testing.CORPUS` with ``special`` tokens (EOS and pad: ``<|endoftext|>``)."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(CORPUS, special, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _qwen_tokenizer():
    tok = bpe_tokenizer(QWEN_SPECIAL)
    tok.chat_template = QWEN_TEMPLATE
    return tok


def _qwen_vision_token_ids(tok) -> dict:
    """The config's image / video / vision-span token ids of a Qwen-VL tokenizer."""
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _instantiate(model_class, config, tok, seed: int, dtype):
    """Random weights from ``seed``, in ``dtype``, eval mode, ending generation at the tokenizer's EOS."""
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def qwen2_vl(*, seed: int = 0, layers: int = 2, dtype=torch.float64, hidden: int = 32, heads: int = 4,
             vision_hidden: int = 32, vision_depth: int = 1, max_pixels: int = 56 * 56):
    """``(model, processor)``: a tiny random Qwen2-VL (default hidden 32, mrope sections 1/1/2 of the
    head dim 8; images resized to at most ``max_pixels``). Larger sizes serve the latency benchmark."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = _qwen_tokenizer()
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels),
                                 tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": _mrope_sections(hidden // heads)},
                         eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, num_heads=2,
                           mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        **_qwen_vision_token_ids(tok),
    )
    return _instantiate(Qwen2VLForConditionalGeneration, config, tok, seed, dtype), processor


def _mrope_sections(head_dim: int) -> list[int]:
    """Temporal / height / width rotary sections summing to head_dim / 2 (Qwen2-VL: 16/24/24 of 64)."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def llava(*, seed: int = 0, layers: int = 2, dtype=torch.float64):
    """``(model, processor)``: a tiny random LLaVA (CLIP vision tower 28 x 28, Llama text model)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = bpe_tokenizer(LLAVA_SPECIAL)
    tok.chat_template = LLAVA_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return _instantiate(LlavaForConditionalGeneration, config, tok, seed, dtype), processor


def vision_module(model) -> torch.nn.Module:
    """The vision encoder of a tiny VLM (Qwen2-VL's ``visual``, LLaVA's ``vision_tower``)."""
    base = model.base_model
    return getattr(base, "visual", None) or base.vision_tower


def random_image(seed: int = 0, size: tuple[int, int] = (56, 56)):
    """A PIL RGB image of uniform random pixels, ``size`` = (height, width), from ``seed``."""
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def qwen2_5_vl(*, seed: int = 0, layers: int = 2, dtype=torch.float64):
    """``(model, processor)``: a tiny random Qwen2.5-VL (windowed vision attention, mrope like Qwen2-VL)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = _qwen_tokenizer()
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=QWEN_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        **_qwen_vision_token_ids(tok),
    )
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, tok, seed, dtype), processor


def misaligned_cache(offset: int, batch: int, heads: int, time: int, dim: int, *, tensors: int = 4,
                     dtype=torch.bfloat16) -> list:
    """``tensors`` random cache tensors ``[batch, heads, time, dim]``, each a view starting ``offset``
    elements into its storage (so rows sit at 2-, 6- or 16-byte-aligned addresses: the kernels' head,
    body and tail paths); seeded by ``offset``."""
    g = torch.Generator().manual_seed(offset)
    cache = []
    for _ in range(tensors):
        storage = torch.randn(offset + batch * heads * time * dim, generator=g).to(dtype)
        cache.append(storage[offset:].view(batch, heads, time, dim))
    return cache


def fresh_ragged_cache(lm, ids, n: int) -> list:
    """The first ``n`` cached positions of ``ids`` prefilled alone in a new ragged batch of ``lm``: each
    layer's ``(keys, values)`` (what any row holding ``ids`` must equal)."""
    from dreamr.engines.ragged import RaggedBatch

    batch = RaggedBatch(lm, "fresh")
    row = batch.add(ids)
    batch.forward({row: []})
    return batch.dense(row, n)
