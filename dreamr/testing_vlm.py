"""Tiny random vision-language models with their real processors, built offline (tests and benchmarks).

- Qwen2-VL: ``Qwen2VLForConditionalGeneration`` (multimodal rotary positions), ``Qwen2VLProcessor`` with
  its image processor (images resized to 28..56 pixels a side: 1 to 4 merged image tokens);
- LLaVA: ``LlavaForConditionalGeneration`` over a CLIP vision tower and a Llama, ``LlavaProcessor`` with
  a CLIP image processor (28 x 28 crops: 4 patches + the class token);
- a text-only draft: :func:`dreamr.testing.tiny_qwen2` with its own tokenizer.

Tokenizers are byte-level BPEs trained in milliseconds on :data:`dreamr.testing.CORPUS`, with each
family's special tokens; chat templates render ``{"type": "image"}`` parts as the family's placeholder. Models are float64
so that greedy comparisons between code paths are exact.
"""

from __future__ import annotations

import numpy as np
import torch

from dreamr.testing import CORPUS

__all__ = ["bpe_tokenizer", "qwen2_vl", "qwen2_5_vl", "llava", "vision_module", "random_image"]

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
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
