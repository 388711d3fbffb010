"""dreamr.verify: verdict token sets, CPN from the target's hidden state, cache hygiene (scoring whole
solutions for SAPO's reward moved to training/scoring.py, tested in tests/test_sapo_scoring.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_gemma3
from dreamr.cache import CachedSequence
from dreamr.verify import DEFAULT_TEMPLATE, StepVerifier, build_verdict_token_ids, check_alpha
from test_cache import assert_matches_prefill


def naive_cpn(model, ids, pos, neg):
    """CPN the slow way: the model's full-vocab logits (soft-capping included), softmax, sums."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    probs = torch.softmax(logits.double(), dim=-1)
    sp, sn = probs[pos].sum(), probs[neg].sum()
    return float(sp / (sp + sn))


def test_verdict_ids_cover_cases_and_spaces(tok_a):
    pos, neg = build_verdict_token_ids(tok_a, ["Yes"], ["No"])
    decoded_pos = {tok_a.decode([t]) for t in pos}
    assert {"Yes", " Yes", "yes", " yes"} <= decoded_pos
    assert " No" in {tok_a.decode([t]) for t in neg}
    assert not set(pos) & set(neg)
    assert len(set(pos)) == len(pos)
    # every id is a single-token form of a verdict word
    assert all(tok_a.decode([t]).strip().lower() == "yes" for t in pos)
    assert all(tok_a.decode([t]).strip().lower() == "no" for t in neg)


def test_verdict_ids_errors(tok_a):
    with pytest.raises(ValueError, match="positive_words.*single token"):
        build_verdict_token_ids(tok_a, ["Supercalifragilistic"], ["No"])
    with pytest.raises(ValueError, match="negative_words.*single token"):
        build_verdict_token_ids(tok_a, ["Yes"], ["Xylophonequartz"])
    with pytest.raises(ValueError, match="disjoint"):
        build_verdict_token_ids(tok_a, ["Yes"], ["yes"])
    with pytest.raises(ValueError, match="positive_words"):
        build_verdict_token_ids(tok_a, [], ["No"])
    with pytest.raises(ValueError, match="negative_words"):
        build_verdict_token_ids(tok_a, ["Yes"], "No")


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.7", float("nan"), True, None, float("inf")])
def test_check_alpha_rejects(bad):
    with pytest.raises(ValueError, match="alpha"):
        check_alpha(bad)


def test_check_alpha_accepts_ends():
    assert check_alpha(0) == 0.0 and check_alpha(1) == 1.0 and check_alpha(0.7) == 0.7


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_verify_equals_naive_cpn_and_leaves_cache_clean(arch, target_model, tok_a):
    model = target_model if arch == "llama" else tiny_gemma3(tok_a)  # gemma3: soft-capped logits
    v = StepVerifier(model, tok_a, alpha=0.5)
    assert v.logit_softcap == (30.0 if arch == "gemma3" else 0.0)
    pos, neg = v.verdict_ids
    prompt = tok_a.encode("Natalia sold clips to 48 of her friends.")
    step_text = " Step 1: 2 + 2 = 4.\n\n"
    step = tok_a.encode(step_text, add_special_tokens=False)

    lm_head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: lm_head_calls.append(1))
    try:
        for alpha, commit in ((1.0, None), (0.0, None), (1.0, True)):
            seq = CachedSequence(model, prompt)
            seq.next_logits()
            calls_before = len(lm_head_calls)
            cpn, accepted = v.verify(seq, step, step_text, alpha=alpha, commit=commit)
            assert len(lm_head_calls) == calls_before  # no full-vocab logits during verification
            want = naive_cpn(model, prompt + step + v.suffix_ids(step_text), pos, neg)
            assert cpn == pytest.approx(want, abs=1e-6)
            assert accepted == (alpha == 0.0)
            kept = accepted if commit is None else commit
            assert seq.ids == prompt + (step if kept else [])
            assert seq.forward_passes == 2
            assert_matches_prefill(seq)  # verdict entries rolled back; a kept step's entries stay
    finally:
        hook.remove()


def test_suffix_puts_delimiter_before_template(tok_a, target_model):
    v = StepVerifier(target_model, tok_a)
    assert tok_a.decode(v.suffix_ids("a step\n\n")) == DEFAULT_TEMPLATE
    assert tok_a.decode(v.suffix_ids("a step cut at the cap")) == "\n\n" + DEFAULT_TEMPLATE
    # the room a step leaves for its verdict prompt: the longer form, whichever way the step ends
    assert v.reserve == max(len(v.suffix_ids("")), len(v.suffix_ids("\n\n"))) == len(v.suffix_ids("a step"))


def test_nonfinite_hidden_gives_nan_and_rejects(tok_a, target_model):
    v = StepVerifier(target_model, tok_a)
    h = torch.full((1, target_model.config.hidden_size), float("nan"), dtype=torch.float64)
    cpn, accept = v.cpn(h, alpha=0.0)
    assert math.isnan(float(cpn[0])) and not bool(accept[0])


def test_verifier_argument_errors(tok_a, target_model):
    with pytest.raises(ValueError, match="alpha"):
        StepVerifier(target_model, tok_a, alpha=2)
    with pytest.raises(ValueError, match="template"):
        StepVerifier(target_model, tok_a, template="  ")
    with pytest.raises(ValueError, match="positive_words"):
        StepVerifier(target_model, tok_a, positive_words=["Supercalifragilistic"])
