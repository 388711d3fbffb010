"""Attention layouts and logit transforms mode "fpsr" must reproduce, or refuse (dreamr.lm.attention_layout).

Tiny random models of each family:

- Mistral-style sliding window (``sliding_window`` without ``layer_types``): implemented; FPSR through the
  ragged batches' own masks commits what mode "speculative" (the model's own masks) commits, with a
  window shorter than the requests;
- Cohere ``logit_scale`` and Granite ``logits_scaling``: applied to FPSR's next-token logits (they equal
  the model's own logits) and to CPN (the verifier's score equals the scaled logits' softmax);
- chunked attention (Llama 4) and layer types other than full / sliding attention: ValueError naming the
  model type and the feature.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import PROMPTS, TINY_SETTINGS
from dreamr import lm
from dreamr.testing import tiny_model
from test_reasoner_fpsr import assert_same
from test_verify import naive_cpn

def _tiny(config_cls, model_cls, tokenizer, seed=0, **extra):
    return tiny_model(config_cls, model_cls, tokenizer, seed=seed, pad_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False, **extra)


def _reasoner(target, tok_a, draft_model, tok_b):
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner(target, draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b, **TINY_SETTINGS)


def _stand_in(config):
    model = torch.nn.Linear(1, 1)
    model.config = config
    return model


# -- Mistral: a sliding window without layer types ------------------------------------------------------


@pytest.fixture(scope="module")
def mistral_reasoner(tok_a, draft_model, tok_b):
    from transformers import MistralConfig, MistralForCausalLM

    return _reasoner(_tiny(MistralConfig, MistralForCausalLM, tok_a, sliding_window=5), tok_a, draft_model, tok_b)


def test_mistral_sliding_window_is_one_sliding_mask_for_every_layer(mistral_reasoner):
    layout = mistral_reasoner.engine("fpsr").target.attention_layout
    assert (layout.mask_of_layer, layout.single_kind, layout.sliding_window) == ({}, "sliding", 5)
    assert layout.kinds == ["sliding"]


def test_mistral_ragged_forward_equals_the_models_own(mistral_reasoner):
    """Two rows of different lengths, longer than the window, through the explicit 4-D sliding masks:
    the hidden states of the model's own forward on each row alone (its own sliding mask)."""
    from dreamr.engines.ragged import RaggedBatch

    target = mistral_reasoner.engine("fpsr").target
    ids = [[3 + i % 40 for i in range(17)], [5 + i % 30 for i in range(11)]]
    batch = RaggedBatch(target, "t")
    rows = [batch.add(x) for x in ids]
    out = batch.forward({r: [] for r in rows})
    for r, x in zip(rows, ids):
        want = target.model.base_model(input_ids=torch.tensor([x])).last_hidden_state[0, -1]
        torch.testing.assert_close(out[r][0], want, atol=1e-10, rtol=0)
    # and without the window the last hidden state differs: the sliding mask is what made them equal
    full = target.model.base_model
    full.config.sliding_window = None
    try:
        unwindowed = full(input_ids=torch.tensor([ids[0]])).last_hidden_state[0, -1]
    finally:
        full.config.sliding_window = 5
    assert not torch.allclose(out[rows[0]][0], unwindowed, atol=1e-6)


def test_mistral_fpsr_commits_what_speculative_commits(mistral_reasoner, content_judge, monkeypatch):
    from dreamr.engines import fpsr as fpsr_mod

    content_judge(mistral_reasoner)
    monkeypatch.setattr(fpsr_mod.RaggedBatch, "_plain", lambda self, *a: False)  # every forward: our own masks
    for prompt in PROMPTS[:2]:
        spec = mistral_reasoner.generate(prompt, alpha=0.5)
        assert sum(s.num_tokens for s in spec.steps) > 5  # past the window
        assert_same(mistral_reasoner.generate(prompt, alpha=0.5, mode="fpsr", window=3), spec)


# -- logit scaling: Cohere multiplies, Granite divides --------------------------------------------------


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_fpsr_logits_apply_the_models_logit_scaling(family, tok_a):
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    from dreamr.engines.ragged import RaggedBatch

    if family == "cohere":
        model = _tiny(CohereConfig, CohereForCausalLM, tok_a, logit_scale=0.25)
    else:
        model = _tiny(GraniteConfig, GraniteForCausalLM, tok_a, logits_scaling=4.0)
    handle = lm.LM(model, tok_a, "target")
    assert handle.logit_scale == 0.25
    batch = RaggedBatch(handle, "t")
    ids = [[3, 4, 5, 6, 7], [8, 9, 10]]
    rows = [batch.add(x) for x in ids]
    got = batch.next_token_logits(rows)
    for g, x in zip(got, ids):
        want = model(input_ids=torch.tensor([x])).logits[0, -1]
        torch.testing.assert_close(g, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_cpn_applies_the_models_logit_scaling(family, tok_a):
    """The verifier's fused CPN equals the softmax of the model's own (scaled) logits; a biased LM head
    with logit scaling is refused, naming the model type."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    from dreamr.cache import CachedSequence
    from dreamr.verify import StepVerifier

    if family == "cohere":
        model = _tiny(CohereConfig, CohereForCausalLM, tok_a, logit_scale=0.25)
    else:
        model = _tiny(GraniteConfig, GraniteForCausalLM, tok_a, logits_scaling=4.0)
    with torch.no_grad():  # verdict logits large enough that an unscaled cpn would differ visibly
        model.get_output_embeddings().weight.mul_(40.0)
    v = StepVerifier(model, tok_a, alpha=0.5)
    assert v.logit_scale == 0.25
    pos, neg = v.verdict_ids
    prompt = tok_a.encode("Natalia sold clips to 48 of her friends.")
    step_text = " Step 1: 2 + 2 = 4.\n\n"
    step = tok_a.encode(step_text, add_special_tokens=False)
    seq = CachedSequence(model, prompt)
    seq.next_logits()
    cpn, _ = v.verify(seq, step, step_text)
    ids = prompt + step + v.suffix_ids(step_text)
    want = naive_cpn(model, ids, pos, neg)  # the model's own logits: scaled
    with torch.no_grad():
        unscaled = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double() / 0.25, dim=-1)
    assert abs(want - float(unscaled[pos].sum() / (unscaled[pos].sum() + unscaled[neg].sum()))) > 1e-3
    assert cpn == pytest.approx(want, abs=1e-6)

    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype))
    with pytest.raises(ValueError, match=f"{model.config.model_type} scales its logits"):
        StepVerifier(model, tok_a)


# -- refused ----------------------------------------------------------------------------------------------


def test_chunked_attention_is_refused_by_fpsr(tok_a, draft_model, tok_b):
    """A tiny Llama 4 target (chunked attention): mode "fpsr" refuses it, naming the model type and the
    feature; mode "speculative" (the model's own masks) still runs it."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    target = _tiny(Llama4TextConfig, Llama4ForCausalLM, tok_a, intermediate_size_mlp=64, num_local_experts=2,
                   attention_chunk_size=8)
    reasoner = _reasoner(target, tok_a, draft_model, tok_b)
    with pytest.raises(ValueError, match=r"llama4_text: chunked attention \(attention_chunk_size=8\)"):
        reasoner.generate(PROMPTS[0], mode="fpsr")
    assert reasoner.generate(PROMPTS[0], max_new_tokens=4).metrics.committed_tokens > 0


@pytest.mark.parametrize("config,match", [
    (SimpleNamespace(model_type="llama4_text", layer_types=["full_attention"], attention_chunk_size=16),
     "llama4_text: chunked attention"),
    (SimpleNamespace(model_type="x", layer_types=["chunked_attention", "full_attention"]), "x: chunked attention"),
    (SimpleNamespace(model_type="qwen3_next", layer_types=["linear_attention", "full_attention"]),
     r"qwen3_next: layer types \['linear_attention'\]"),
    (SimpleNamespace(model_type="g", layer_types=["sliding_attention"], sliding_window=None),
     "g: sliding_attention layers without a sliding_window"),
])
def test_layouts_the_ragged_masks_cannot_build_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        lm.attention_layout(_stand_in(config))


def test_layouts_of_the_supported_families():
    gemma = lm.attention_layout(_stand_in(SimpleNamespace(layer_types=["sliding_attention", "full_attention"],
                                                          sliding_window=512)))
    assert gemma.mask_of_layer == {"sliding_attention": "sliding", "full_attention": "full"}
    assert gemma.kinds == ["full", "sliding"] and gemma.sliding_window == 512
    llama = lm.attention_layout(_stand_in(SimpleNamespace()))
    assert (llama.mask_of_layer, llama.kinds, llama.sliding_window) == ({}, ["full"], None)
