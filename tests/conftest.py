"""Fixtures for the reasoner tests: tiny random causal LMs and tokenizers built offline.

Two byte-level BPE tokenizers are trained in milliseconds on a small corpus (so "Yes"/" Yes"/" No" and
"\\n\\n" are single tokens) with different vocabularies, so that the draft/target pair exercises
re-tokenization. Models are tiny random Llama / Qwen2 / Gemma3 configs in float64, which makes
greedy comparisons between code paths exact.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (real models; or set DREAMR_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("DREAMR_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: real models; run with --runslow or DREAMR_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

_CORPUS = [
    "Yes No yes no YES NO Yes. No. correct wrong right",
    "Is the last step correct? Answer Yes or No.\nAnswer: Yes\n\nAnswer: No\n\n",
    "Step 1: 2 + 2 = 4.\n\nStep 2: 4 * 3 = 12.\n\nThe answer is 12.\n\n#### 12\n\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? Let us think step by step.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tokenizer(vocab_size: int = 400, *, reverse: bool = False, bos: bool = True):
    """A byte-level BPE tokenizer trained offline; ``reverse`` trains on another corpus order (other ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (_CORPUS[::-1] if reverse else _CORPUS) * 20
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


def tiny_llama(tokenizer, *, layers: int = 2, seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_qwen2(tokenizer, *, layers: int = 1, seed: int = 1, dtype=torch.float64):
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


@pytest.fixture(scope="session")
def tok_a():
    return build_tokenizer(400)


@pytest.fixture(scope="session")
def tok_b():
    return build_tokenizer(330, reverse=True, bos=False)


@pytest.fixture(scope="session")
def target_model(tok_a):
    return tiny_llama(tok_a)


@pytest.fixture(scope="session")
def draft_model(tok_b):
    return tiny_qwen2(tok_b)


@pytest.fixture(scope="session")
def same_tok_draft(tok_a):
    return tiny_llama(tok_a, layers=1, seed=5)


@pytest.fixture(scope="session")
def reasoner(target_model, tok_a, draft_model, tok_b):
    """Target: tiny Llama (tokenizer A); draft: tiny Qwen2 (tokenizer B, other ids)."""
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner(target_model, draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b,
                               max_step_tokens=6, max_new_tokens=30)


@pytest.fixture(scope="session")
def same_tok_reasoner(target_model, tok_a, same_tok_draft):
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner(target_model, same_tok_draft, target_tokenizer=tok_a, draft_tokenizer=tok_a,
                               max_step_tokens=6, max_new_tokens=30)


@pytest.fixture(scope="session")
def gemma_reasoner(tok_a, draft_model, tok_b):
    """Target: tiny Gemma 3 (sliding-window layers, soft-capped logits, like the real target)."""
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner(tiny_gemma3(tok_a), draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b,
                               max_step_tokens=6, max_new_tokens=30)


PROMPTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "Step 1: 2 + 2 = 4.\n\n",
    "How many clips did Natalia sell altogether?",
    "Is the last step correct?",
]


@pytest.fixture
def content_judge(monkeypatch):
    """Replace a reasoner's verdicts by a pseudo-random function of the verdict hidden state.

    A random tiny target scores every step about alike (its last position sees mostly the verdict
    prompt), so no alpha mixes accepted and rejected steps reliably. This judge keeps the real
    verification path (forward pass, rollback, commit) and only swaps the score for one that depends on
    the content: cpn = frac(997 * sum|h|), accepted iff cpn > alpha, the same for a step whatever the run.
    """

    def install(r):
        verifier = r.verifier_for(r.config)

        def cpn(hidden, alpha=None):
            a = verifier.alpha if alpha is None else alpha
            c = ((hidden.double().abs().sum(dim=1) * 997.0) % 1.0).float()
            return c, c > a

        monkeypatch.setattr(verifier, "cpn", cpn)
        return r

    return install
