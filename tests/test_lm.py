"""dreamr.lm: the facts read off a transformers model, each in one place."""

from types import SimpleNamespace

import pytest
import torch

from dreamr import lm


def _model(config, generation_eos=None):
    """A stand-in model: a config, a generation config and one parameter."""
    model = torch.nn.Linear(1, 1)
    model.config = config
    model.generation_config = SimpleNamespace(eos_token_id=generation_eos)
    return model


def test_text_config_of_a_vision_language_config_is_its_text_part():
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                       max_position_embeddings=77)
    vl = _model(LlavaConfig(text_config=text.to_dict()))
    assert lm.text_config(vl).max_position_embeddings == 77
    assert lm.context_length(vl) == 77
    assert (lm.num_layers(vl), lm.num_kv_heads(vl), lm.head_dim(vl)) == (3, 2, 8)
    assert lm.is_vision_language(vl) and not lm.is_vision_language(_model(text))
    assert lm.is_vision_language(vl.config) and not lm.is_vision_language(text)  # a config alone, too


def test_eos_ids_are_the_union_of_tokenizer_generation_config_and_config():
    tok = SimpleNamespace(eos_token_id=2)
    model = _model(SimpleNamespace(eos_token_id=[3, 4]), generation_eos=5)
    assert lm.eos_ids(model, tok) == {2, 3, 4, 5}
    assert lm.eos_ids(model, tok, config=SimpleNamespace(eos_token_id=None)) == {2, 5}
    assert lm.eos_ids(_model(SimpleNamespace()), SimpleNamespace(eos_token_id=None)) == set()


def test_logit_scale_is_one_multiplier_for_cohere_and_granite():
    assert lm.logit_scale(_model(SimpleNamespace())) == 1.0
    assert lm.logit_scale(_model(SimpleNamespace(logit_scale=0.0625))) == 0.0625  # Cohere multiplies
    assert lm.logit_scale(_model(SimpleNamespace(logits_scaling=8.0))) == 0.125  # Granite divides
    assert lm.logit_softcap(_model(SimpleNamespace(final_logit_softcapping=30.0))) == 30.0
    assert lm.logit_softcap(_model(SimpleNamespace(final_logit_softcapping=None))) == 0.0


def test_head_dim_defaults_to_hidden_size_over_heads_and_kv_heads_to_heads():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    model = _model(config)
    assert (lm.num_layers(model), lm.num_kv_heads(model), lm.head_dim(model)) == (2, 4, 16)
    assert lm.context_length(model) == lm.UNLIMITED_CONTEXT


def test_split_processor():
    tok = SimpleNamespace(encode=lambda s: [], decode=lambda ids: "")
    processor = SimpleNamespace(image_processor=object(), tokenizer=tok)
    assert lm.split_processor(processor) == (processor, tok)
    assert lm.split_processor(SimpleNamespace(tokenizer=tok)) == (None, tok)
    assert lm.split_processor(tok) == (None, tok)
    assert lm.split_processor(None) == (None, None)


def test_the_lm_handle_reads_the_facts_once(tok_a, target_model):
    handle = lm.LM(target_model, tok_a, "target")
    cfg = target_model.config
    assert handle.context_length == cfg.max_position_embeddings
    assert handle.eos_ids == {tok_a.eos_token_id}
    assert (handle.num_layers, handle.num_kv_heads) == (cfg.num_hidden_layers, cfg.num_key_value_heads)
    assert handle.head_dim == cfg.hidden_size // cfg.num_attention_heads
    assert handle.decoder is target_model.base_model
    assert (handle.logit_softcap, handle.logit_scale, handle.vision) == (0.0, 1.0, False)
    with pytest.raises(ValueError, match="no decoder module"):
        lm.decoder_of(torch.nn.Linear(1, 1))


def test_step_ids_reuses_the_ids_with_one_tokenizer_and_retokenizes_otherwise(tok_a, target_model):
    from dreamr.steps import StepWriter

    handle = lm.LM(target_model, tok_a, "target")
    ids = tok_a.encode("Step one.\n\n", add_special_tokens=False)
    writer = StepWriter(tok_a, {tok_a.eos_token_id}, "\n\n", 64)
    for t in ids + [tok_a.eos_token_id]:
        if writer.add(t) is not None:
            break
    assert handle.step_ids(writer, same_tokenizer=True) == writer.content_ids
    assert handle.step_ids(writer, same_tokenizer=False) == tok_a.encode(writer.text, add_special_tokens=False)
