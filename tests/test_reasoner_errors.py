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


def test_misspelled_setting_and_config_of_another_type(target_model, draft_model, tok_a, tok_b):
    kw = dict(target_tokenizer=tok_a, draft_tokenizer=tok_b)
    with pytest.raises(ValueError, match=r"unknown setting.*alhpa.*ReasonerConfig has.*alpha"):
        SpeculativeReasoner(target_model, draft_model, alhpa=0.5, **kw)
    with pytest.raises(ValueError, match="config must be a dreamr.ReasonerConfig"):
        SpeculativeReasoner(target_model, draft_model, config={"alpha": 0.5}, **kw)
    r = SpeculativeReasoner(target_model, draft_model, config=ReasonerConfig(alpha=0.25), max_new_tokens=5, **kw)
    assert (r.config.alpha, r.config.max_new_tokens) == (0.25, 5)


@pytest.mark.parametrize("kw,match", [
    (dict(dtype=torch.int64), r"dtype=torch.int64"), (dict(dtype="float8"), "dtype='float8'"),
    (dict(device="tpu9"), "device='tpu9'"),
])
def test_bad_dtype_or_device(target_model, draft_model, tok_a, tok_b, kw, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeReasoner(target_model, draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu(target_model, draft_model, tok_a, tok_b):
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA"):
        SpeculativeReasoner(target_model, draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b, device="cuda")


def test_dtype_by_name_casts_both_models(tok_a, tok_b):
    target, draft = tiny_llama(tok_a, dtype=torch.float64), tiny_qwen2(tok_b, dtype=torch.float32)
    SpeculativeReasoner(target, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b, dtype="float32")
    assert next(target.parameters()).dtype == next(draft.parameters()).dtype == torch.float32


def test_swapped_tokenizers_and_a_tokenizer_given_as_a_string(target_model, draft_model, tok_a, tok_b):
    # tok_a (394 tokens) is larger than the draft's embedding (330 rows)
    with pytest.raises(ValueError, match=rf"draft_tokenizer: the tokenizer has {len(tok_a)} tokens.*embeds only 330"):
        SpeculativeReasoner(target_model, draft_model, target_tokenizer=tok_b, draft_tokenizer=tok_a)
    with pytest.raises(ValueError, match="target_tokenizer: expected a tokenizer"):
        SpeculativeReasoner(target_model, draft_model, target_tokenizer="gpt2", draft_tokenizer=tok_b)
    # a padded embedding (more rows than tokens) is fine
    r = SpeculativeReasoner(target_model, draft_model, target_tokenizer=tok_b, draft_tokenizer=tok_b,
                            max_new_tokens=4)
    assert r.generate("Natalia sold clips.").steps


def test_from_pretrained_checks_settings_before_loading(monkeypatch):
    from dreamr import models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(models, "load", no_loading)
    monkeypatch.setattr(models, "load_self_draft_pair", no_loading)
    for kw, match in ((dict(mode="x"), "mode must be one of"), (dict(alpha=2), "alpha"),
                      (dict(alhpa=0.5), "unknown setting"), (dict(dtype="int8"), "dtype"),
                      (dict(device="tpu9"), "device")):
        with pytest.raises(ValueError, match=match):
            SpeculativeReasoner.from_pretrained(**kw)
        with pytest.raises(ValueError, match=match):
            SpeculativeReasoner.from_pretrained(draft="self", **kw)


def test_overlong_retokenized_step_ends_the_request_by_length(tok_a):
    """The draft's step cap reserves verdict room in draft tokens; a step re-tokenized into many more target
    tokens (here: a byte-level target tokenizer without merges) must not overrun the target's context."""
    from conftest import build_tokenizer

    tok_bytes = build_tokenizer(259)  # 256 bytes + specials: one token per byte
    target = tiny_llama(tok_bytes)
    target.config.max_position_embeddings = 64
    prompt = "Natalia sold clips."
    kw = dict(positive_words=("Y",), negative_words=("N",), verdict_template="ok?", max_step_tokens=8,
              max_new_tokens=200, alpha=0.0, draft_policy="always")  # every step drafted
    for mode in ("speculative", "fpsr"):
        r = SpeculativeReasoner(target, tiny_llama(tok_a, layers=1, seed=3), target_tokenizer=tok_bytes,
                                draft_tokenizer=tok_a, mode=mode, **kw)
        seen = []
        r.engine(mode).observer = lambda t_seq, d_seq: seen.append(len(t_seq.ids))
        result = r.generate(prompt)
        assert result.finish_reason == "length"
        assert max(seen, default=0) <= 64
        prefix = len(tok_bytes.encode(prompt))
        assert prefix + sum(len(tok_bytes.encode(s.text, add_special_tokens=False)) for s in result.steps) <= 64
        # the cap alone (in draft tokens) would have left room for a further step; the re-tokenized one did not fit
        assert result.metrics.draft_tokens > sum(s.num_tokens for s in result.steps)
        if mode == "speculative":
            first = result
    assert [s.text for s in result.steps] == [s.text for s in first.steps]
