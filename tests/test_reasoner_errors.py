"""Bad input gets a clear ValueError that names the argument."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_llama, tiny_qwen2
from dreamr.reasoner import ReasonerConfig, SpeculativeReasoner


@pytest.mark.parametrize("prompt", ["", "   \n", []])
def test_empty_prompt(reasoner, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        reasoner.generate(prompt)


def test_empty_message_contents_and_malformed_messages(reasoner):
    with pytest.raises(ValueError, match="prompt is empty"):
        reasoner.generate([{"role": "user", "content": "  "}])
    with pytest.raises(ValueError, match=r"prompt\[0\]"):
        reasoner.generate([{"text": "hi"}])
    with pytest.raises(ValueError, match="prompt must be"):
        reasoner.generate(42)


def test_prompt_longer_than_context(reasoner):
    long_prompt = "Natalia sold clips. " * 400  # > 1024 positions in either tiny model
    with pytest.raises(ValueError, match="longer than its context"):
        reasoner.generate(long_prompt)
    with pytest.raises(ValueError, match=r"prompts\[1\].*longer than its context"):
        reasoner.generate_batch(["fine", long_prompt])


def test_models_on_different_devices(target_model, tok_a, tok_b):
    with torch.device("meta"):
        draft = tiny_qwen2(tok_b)
    with pytest.raises(ValueError, match="device"):
        SpeculativeReasoner(target_model, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b)


def test_models_with_different_dtypes_need_an_explicit_choice(tok_a, tok_b):
    target, draft = tiny_llama(tok_a, dtype=torch.float64), tiny_qwen2(tok_b, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        SpeculativeReasoner(target, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b)
    r = SpeculativeReasoner(target, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b, dtype=torch.float32,
                            max_new_tokens=6)
    assert next(target.parameters()).dtype == torch.float32
    assert r.generate("Natalia sold clips.").steps


class NoCacheLM(torch.nn.Module):
    """A causal LM that ignores the cache it is given (cannot return keys and values)."""

    def __init__(self, vocab):
        super().__init__()
        self.config = SimpleNamespace(is_encoder_decoder=False, max_position_embeddings=64,
                                      get_text_config=lambda **kw: self.config)
        self.emb = torch.nn.Embedding(vocab, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, vocab, dtype=torch.float64)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


def test_model_without_kv_cache(target_model, tok_a, tok_b):
    with pytest.raises(ValueError, match="draft.*KV cache"):
        SpeculativeReasoner(target_model, NoCacheLM(len(tok_b)), target_tokenizer=tok_a, draft_tokenizer=tok_b)


def test_missing_tokenizer_and_non_model(target_model, draft_model, tok_a, tok_b):
    with pytest.raises(ValueError, match="draft_tokenizer"):
        SpeculativeReasoner(target_model, draft_model, target_tokenizer=tok_a)
    with pytest.raises(ValueError, match="target"):
        SpeculativeReasoner("not a model", draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b)


def test_unknown_mode(reasoner):
    with pytest.raises(ValueError, match="mode must be one of"):
        reasoner.generate("Natalia sold clips.", mode="fast")
    with pytest.raises(ValueError, match="mode"):
        ReasonerConfig(mode="beam")


@pytest.mark.parametrize("alpha", [-0.01, 1.01, "0.7", float("nan"), None, True])
def test_alpha_not_in_unit_interval(reasoner, alpha):
    with pytest.raises(ValueError, match="alpha"):
        reasoner.generate("Natalia sold clips.", alpha=alpha)


def test_verdict_words_without_single_token_form(reasoner, target_model, draft_model, tok_a, tok_b):
    with pytest.raises(ValueError, match="positive_words"):
        reasoner.generate("Natalia sold clips.", positive_words=("Supercalifragilistic",))
    with pytest.raises(ValueError, match="negative_words"):
        SpeculativeReasoner(target_model, draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b,
                            negative_words=("Xylophonequartz",))


def test_images_for_a_text_only_model(reasoner):
    with pytest.raises(ValueError, match="images.*text-only"):
        reasoner.generate("Describe the picture.", images=[torch.zeros(3, 8, 8)])


@pytest.mark.parametrize("field,value", [
    ("max_step_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", 2.5), ("temperature", -1.0),
    ("top_p", 0.0), ("seed", "x"), ("step_delimiter", ""), ("verdict_template", " "), ("answer_marker", ""),
])
def test_bad_config_fields(reasoner, field, value):
    with pytest.raises(ValueError, match=field):
        reasoner.generate("Natalia sold clips.", **{field: value})


def test_unknown_setting(reasoner):
    with pytest.raises(ValueError, match="unknown setting"):
        reasoner.generate("Natalia sold clips.", alpah=0.5)


def test_batch_arguments(reasoner):
    with pytest.raises(ValueError, match="prompts"):
        reasoner.generate_batch("one string")
    with pytest.raises(ValueError, match="prompts is empty"):
        reasoner.generate_batch([])
