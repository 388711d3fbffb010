"""Tiny random models and fixed-acceptance judges, for tests and benchmarks (like ``torch.testing``).

Models
------
Two byte-level BPE tokenizers are trained in milliseconds on a small corpus (:data:`CORPUS`, so that
"Yes" / " Yes" / " No" and "\\n\\n" are single tokens) with different vocabularies
(:func:`target_tokenizer`, :func:`draft_tokenizer`), so that a draft / target pair exercises
re-tokenization. :func:`tiny_llama`, :func:`tiny_qwen2` and :func:`tiny_gemma3` are tiny random configs
in float64, which makes greedy comparisons between code paths exact; :func:`random_llama` builds a
random Llama of a chosen (realistic) size for speed measurements. Nothing here downloads anything.
Vision-language counterparts are in :mod:`dreamr.testing_vlm`.

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

import torch

from dreamr.reference import accepts

__all__ = ["CORPUS", "CHAT_TEMPLATE", "PROMPTS", "TINY_SETTINGS", "build_tokenizer", "target_tokenizer",
           "draft_tokenizer", "tiny_llama", "tiny_qwen2", "tiny_gemma3", "random_llama", "content_cpn",
           "ContentJudge", "FixedAcceptance"]

CORPUS = [
    "Yes No yes no YES NO Yes. No. correct wrong right",
    "Is the last step correct? Answer Yes or No.\nAnswer: Yes\n\nAnswer: No\n\n",
    "Step 1: 2 + 2 = 4.\n\nStep 2: 4 * 3 = 12.\n\nThe answer is 12.\n\n#### 12\n\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? Let us think step by step.",
]
"""The tokenizers' training text (each family's tokenizer of :mod:`dreamr.testing_vlm` too)."""

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

TINY_SETTINGS = {"max_step_tokens": 6, "max_new_tokens": 30}
"""Reasoner settings for the tiny pairs: a few short steps per request."""


def build_tokenizer(vocab_size: int = 400, *, reverse: bool = False, bos: bool = True):
    """A byte-level BPE tokenizer trained offline; ``reverse`` trains on another corpus order (other ids).

    ``bos``: prepend ``<|bos|>`` to every encoding. The chat template is :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (CORPUS[::-1] if reverse else CORPUS) * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|bos|>"] if not reverse else ["<|bos|>", "<pad>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
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


def tiny_llama(tokenizer, *, layers: int = 2, seed: int = 0, dtype=torch.float64):
    """A random Llama (hidden 32, 4 heads, 2 KV heads) over ``tokenizer``'s vocabulary, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_qwen2(tokenizer, *, layers: int = 1, seed: int = 1, dtype=torch.float64):
    """A random Qwen2 (hidden 32, 4 heads, 2 KV heads) over ``tokenizer``'s vocabulary, in eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return Qwen2ForCausalLM(config).to(dtype).eval()


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
    with ``tokenizer``'s vocabulary, built on ``device`` directly; for speed measurements."""
    from transformers import LlamaConfig, LlamaForCausalLM

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
