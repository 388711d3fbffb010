"""The judge inside the reasoner: a verdict head and contextual calibration in StepVerifier, and the
adaptive threshold (alpha="auto") carried across requests."""

from __future__ import annotations

import random

import pytest
import torch

from dreamr.cache import CachedSequence
from dreamr.config import ReasonerConfig
from dreamr.reasoner import SpeculativeReasoner
from dreamr.testing import TINY_SETTINGS, PROMPTS, target_tokenizer, tiny_llama
from dreamr.verify import AdaptiveAlpha, StepVerifier, VerdictHead
from dreamr.verify.head import calibrated_cpn, target_identity


@pytest.fixture(scope="module")
def target(target_model):  # conftest's tiny pair (tok_a / tok_b are conftest's too)
    return target_model


@pytest.fixture(scope="module")
def draft(draft_model):
    return draft_model


def head_for(model, calibrated: bool, seed: int = 0) -> VerdictHead:
    g = torch.Generator().manual_seed(seed)
    head = VerdictHead(torch.randn(2, 32, generator=g), torch.randn(2, generator=g) * (0 if calibrated else 1),
                       calibrated=calibrated)
    head.meta.update(target=target_identity(model, "tiny"), template=StepVerifier(model, target_tokenizer()).template)
    return head


# -- the adaptive threshold -----------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.8])
def test_auto_alpha_converges_on_a_judge_with_a_known_cpn_distribution(rho):
    """cpn ~ Uniform(0.6, 0.9) (a judge biased toward "Yes"): P(cpn > a) = rho at a = 0.9 - 0.3 * rho."""
    rng = random.Random(0)
    rule = AdaptiveAlpha(rho, gamma=0.02)
    accepted = []
    for _ in range(4000):
        a = rule.alpha
        accepted.append(rng.uniform(0.6, 0.9) > a)
        assert rule.update(accepted[-1]) == a
    assert abs(sum(accepted[-2000:]) / 2000 - rho) < 0.03
    assert abs(sum(rule.history[-2000:]) / 2000 - (0.9 - 0.3 * rho)) < 0.02
    assert abs(rule.acceptance_rate - rho) < (1 + rule.gamma) / (rule.gamma * rule.steps) + 1e-9


def test_auto_alpha_holds_the_rate_whatever_the_bias():
    for judge in (lambda r: 0.99, lambda r: 0.01, lambda r: r.random()):  # always "Yes", always "No", uniform
        rng = random.Random(1)
        rule = AdaptiveAlpha(0.5, gamma=0.05)
        for _ in range(400):
            rule.update(judge(rng) > rule.alpha)
        assert abs(rule.acceptance_rate - 0.5) <= (1 + rule.gamma) / (rule.gamma * rule.steps)
        assert 0.0 <= rule.alpha <= 1.0


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), "half", True])
def test_target_acceptance_outside_the_open_interval_is_refused(bad):
    with pytest.raises(ValueError, match="target_acceptance"):
        AdaptiveAlpha(bad)
    with pytest.raises(ValueError, match="target_acceptance"):
        ReasonerConfig(alpha="auto", target_acceptance=bad)


def test_alpha_auto_and_its_settings_are_checked():
    assert ReasonerConfig(alpha="auto").auto_alpha and not ReasonerConfig().auto_alpha
    with pytest.raises(ValueError, match="alpha"):
        ReasonerConfig(alpha="adaptive")
    with pytest.raises(ValueError, match="alpha_gamma"):
        ReasonerConfig(alpha="auto", alpha_gamma=0.0)
    with pytest.raises(ValueError, match="verdict_head"):
        ReasonerConfig(verdict_head=3)
    assert ReasonerConfig(verdict_head="none").verdict_head is None


# -- the verifier with calibration and a head -----------------------------------------------------------


def test_calibrated_verify_is_the_step_verdict_over_the_null_verdict(target, tok_a):
    plain = StepVerifier(target, tok_a)
    cal = StepVerifier(target, tok_a, calibrate=True)
    prompt = tok_a.encode("Natalia sold clips to 48 of her friends in April.", add_special_tokens=True)
    step = "Step 1: 2 + 2 = 4.\n\n"
    ids = tok_a.encode(step, add_special_tokens=False)
    # the reference: the step's and the null step's verdicts, each from a fresh prefill
    raw, _ = plain.verify(CachedSequence(target, prompt), ids, step, commit=False)
    null_text = "N/A\n\n"
    raw_null, _ = plain.verify(CachedSequence(target, prompt), tok_a.encode(null_text, add_special_tokens=False),
                               null_text, commit=False)
    want = float(calibrated_cpn(torch.tensor([raw]), torch.tensor([raw_null]))[0])
    seq = CachedSequence(target, prompt)
    seq.next_logits()  # the prompt is cached, its last token pending, as after a committed step
    cached, passes = seq.cached, seq.forward_passes
    cpn, accepted = cal.verify(seq, ids, step, alpha=0.0, commit=True)
    assert cpn == pytest.approx(want, abs=1e-5)
    assert seq.forward_passes == passes + 2  # the null pass and the step pass, no second prefill
    assert seq.ids == prompt + ids and seq.cached == len(seq.ids) - 1 and cached < seq.cached
    # rejected: nothing of the step or the null is left in the cache
    seq2 = CachedSequence(target, prompt)
    cal.verify(seq2, ids, step, alpha=1.0)
    assert seq2.ids == prompt and seq2.cached <= len(prompt)


def test_verifier_with_a_head_scores_the_head(target, tok_a):
    head = head_for(target, calibrated=False)
    verifier = StepVerifier(target, tok_a, head=head)
    assert not verifier.calibrate
    prompt = tok_a.encode("How many clips did Natalia sell altogether?", add_special_tokens=True)
    step = "Step 2: 4 * 3 = 12.\n\n"
    ids = tok_a.encode(step, add_special_tokens=False)
    hidden = CachedSequence(target, prompt).last_hidden(ids + verifier.suffix_ids(step))
    cpn, _ = verifier.verify(CachedSequence(target, prompt), ids, step, commit=False)
    assert cpn == pytest.approx(float(head.reference_cpn(hidden)[0]), abs=1e-5)
    # a calibrated head calibrates the verifier whatever calibrate says
    cal_head = head_for(target, calibrated=True, seed=1)
    verifier = StepVerifier(target, tok_a, head=cal_head)
    assert verifier.calibrate
    null = CachedSequence(target, prompt).last_hidden(verifier.null_ids())
    cpn, _ = verifier.verify(CachedSequence(target, prompt), ids, step, commit=False)
    assert cpn == pytest.approx(float(cal_head.reference_cpn(hidden, null)[0]), abs=1e-5)
    with pytest.raises(ValueError, match="null_hidden"):
        verifier.cpn(hidden)


def test_verifier_refuses_a_head_for_another_target(target, tok_a):
    other = tiny_llama(tok_a, seed=5)
    with pytest.raises(ValueError, match="verdict_head"):
        StepVerifier(other, tok_a, head=head_for(target, calibrated=False))


# -- the reasoner ------------------------------------------------------------------------------------


def test_reasoner_runs_with_a_head_calibration_and_auto_alpha(tmp_path, target, draft, tok_a, tok_b):
    folder = head_for(target, calibrated=True).save(tmp_path / "head")
    r = SpeculativeReasoner(target, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b, verdict_head=str(folder),
                            alpha="auto", target_acceptance=0.5, **TINY_SETTINGS)
    results = r.generate_batch(PROMPTS)
    results += [r.generate(PROMPTS[0])]
    rule = r.threshold_for(r.config)
    verified = [s for res in results for s in res.steps if s.accepted is not None]
    assert rule.steps == len(verified) > 0  # one rule carried across the batch and the next request
    assert [s.alpha for s in verified] == rule.history
    for res in results:
        m = res.metrics
        if m.verified_steps:
            alphas = [s.alpha for s in res.steps if s.accepted is not None]
            assert m.alpha_mean == pytest.approx(sum(alphas) / len(alphas)) and m.alpha_final == alphas[-1]
    assert r.verifier_for(r.config).calibrate and r.verifier_for(r.config).head is not None
    r.reset_thresholds()
    assert r.threshold_for(r.config).steps == 0
    # another target's head is refused before any model runs
    other = tiny_llama(tok_a, seed=5)
    with pytest.raises(ValueError, match="verdict_head"):
        SpeculativeReasoner(other, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b, verdict_head=str(folder))
    with pytest.raises(ValueError, match="target_acceptance"):
        r.generate(PROMPTS[0], target_acceptance=1.0)


def test_fixed_alpha_is_recorded_and_unchanged(target, draft, tok_a, tok_b):
    r = SpeculativeReasoner(target, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b, **TINY_SETTINGS)
    res = r.generate(PROMPTS[0], alpha=0.6)
    assert r.threshold_for(r.config) is None
    verified = [s for s in res.steps if s.accepted is not None]
    assert verified and all(s.alpha == 0.6 for s in verified)
    assert res.metrics.alpha_mean == pytest.approx(0.6) and res.metrics.alpha_final == 0.6
    assert all(s.alpha is None for s in r.generate(PROMPTS[0], mode="target").steps)


@pytest.mark.parametrize("calibrate", [False, True])
def test_fpsr_judges_as_speculative_with_a_head_and_calibration(tmp_path, target, draft, tok_a, tok_b, calibrate):
    """The null step as a private segment of fpsr's chain pass gives the verdicts of the sequential verifier."""
    head = head_for(target, calibrated=False, seed=3)
    r = SpeculativeReasoner(target, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b, verdict_head=head,
                            calibrate=calibrate, alpha=0.5, **TINY_SETTINGS)
    for prompt in PROMPTS[:2]:
        seq = r.generate(prompt, mode="speculative")
        par = r.generate(prompt, mode="fpsr")
        assert [(s.text, s.source, s.accepted) for s in par.steps] == [(s.text, s.source, s.accepted) for s in seq.steps]
        for a, b in zip(par.steps, seq.steps):
            assert (a.cpn is None) == (b.cpn is None)
            if a.cpn is not None:
                assert a.cpn == pytest.approx(b.cpn, abs=1e-4) and a.alpha == b.alpha == 0.5


def test_fpsr_with_auto_alpha_carries_one_rule(target, draft, tok_a, tok_b):
    r = SpeculativeReasoner(target, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b, mode="fpsr",
                            alpha="auto", target_acceptance=0.5, **TINY_SETTINGS)
    results = r.generate_batch(PROMPTS)
    rule = r.threshold_for(r.config)
    verified = [s for res in results for s in res.steps if s.accepted is not None]
    assert rule.steps == len(verified) > 0
    assert sorted(s.alpha for s in verified) == sorted(rule.history)


@pytest.mark.parametrize("mode", ["speculative", "fpsr"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_calibration_adds_only_the_null_step_on_the_cached_prefix(target, draft, tok_a, tok_b, mode, alpha):
    """No second prefill: at an alpha where calibration cannot change a verdict (0 accepts every finite
    verdict, 1 rejects every step) the runs are the same, and the calibrated one feeds the target exactly
    the null step's tokens more per verified step (mode "speculative": one short pass on the cached prefix;
    mode "fpsr": a private segment of the chain pass that verifies the step, so no pass more)."""
    fed = []
    hook = target.get_input_embeddings().register_forward_hook(lambda mod, args, out: fed.append(args[0].numel()))
    runs = {}
    try:
        for calibrate in (False, True):
            r = SpeculativeReasoner(target, draft, target_tokenizer=tok_a, draft_tokenizer=tok_b, mode=mode,
                                    calibrate=calibrate, alpha=alpha, **TINY_SETTINGS)
            out = []
            for prompt in PROMPTS[:2]:
                fed.clear()
                res = r.generate(prompt)
                out.append((res, sum(fed)))
            runs[calibrate] = out
            null_len = len(r.verifier_for(r.config).null_ids())
    finally:
        hook.remove()
    for (plain, plain_fed), (cal, cal_fed) in zip(runs[False], runs[True]):
        assert [(s.text, s.source, s.accepted) for s in cal.steps] == [(s.text, s.source, s.accepted) for s in plain.steps]
        verified = cal.metrics.verified_steps
        assert verified > 0
        assert cal_fed == plain_fed + verified * null_len
        extra_passes = verified if mode == "speculative" else 0
        assert cal.metrics.target_forward_passes == plain.metrics.target_forward_passes + extra_passes
