"""Token-level speculation (dreamr.speculation): proposers, the lossless step writer, mode "token",
the fallback steps of mode "speculative", adaptive drafting and the token-level metrics."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from dreamr.cache import CachedSequence
from dreamr.config import ReasonerConfig, token_speculation_sources
from dreamr.result import Metrics
from dreamr.sampling import Sampler
from dreamr.engines import base as engine_base
from dreamr.speculation import (AdaptiveDrafting, ChainProposer, ForwardCost, NgramProposer, ProposalGate,
                                RejectedStepProposer, measure_forward_cost, proposer_for, verify_proposal, write_step)
from dreamr.testing import PROMPTS

# --------------------------------------------------------------------------------------------------
# Proposers
# --------------------------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_occurrence_longest_match_first():
    p = NgramProposer(max_ngram=3)
    # "1 2" occurs twice before the tail; the latest occurrence (followed by 7) wins
    assert p.propose([1, 2, 5, 1, 2, 7, 8, 1, 2], step=[], k=2) == [7, 8]
    # the 3-gram "9 1 2" beats the later 2-gram "1 2"
    assert p.propose([9, 1, 2, 4, 1, 2, 6, 9, 1, 2], step=[], k=1) == [4]
    assert p.propose([1, 2, 3], step=[], k=4) == []  # the tail does not occur earlier
    # a continuation that runs into the context's end is a loop: it goes on with the loop's period
    assert p.propose([4, 4, 4], step=[], k=5) == [4] * 5
    assert p.propose([7, 3, 5, 3, 5, 3], step=[], k=4) == [5, 3, 5, 3]
    assert p.propose([1, 2, 1], step=[], k=0) == [] and p.propose([1], step=[], k=3) == []


def test_ngram_arguments_are_checked():
    with pytest.raises(ValueError, match="min_ngram"):
        NgramProposer(min_ngram=0)
    with pytest.raises(ValueError, match="max_ngram"):
        NgramProposer(max_ngram=1, min_ngram=2)


def test_rejected_step_follows_the_step_then_resynchronises():
    p = RejectedStepProposer([10, 11, 12, 13, 14])
    assert p.propose([1], step=[], k=3) == [10, 11, 12]
    assert p.propose([1, 10, 11], step=[10, 11], k=9) == [12, 13, 14]
    # the target reworded the start, then wrote the draft's "12": continue after it
    assert p.propose([1, 20, 12], step=[20, 12], k=2) == [13, 14]
    assert p.propose([1, 20, 21], step=[20, 21], k=2) == []
    assert RejectedStepProposer([]).propose([1], step=[], k=3) == []


def test_chain_and_sources():
    chain = ChainProposer([RejectedStepProposer([7]), NgramProposer()])
    assert chain.propose([3, 4, 3], step=[], k=2) == [7]  # the first source with a guess wins
    assert chain.propose([3, 4, 3], step=[7], k=2) == [4, 3]  # then n-gram lookup
    assert [type(x) for x in proposer_for(("step", "ngram"), rejected_step=[1]).proposers] == [
        RejectedStepProposer, NgramProposer]
    assert [type(x) for x in proposer_for(("step", "ngram")).proposers] == [NgramProposer]
    assert proposer_for(("step",)) is None and proposer_for(()) is None
    assert token_speculation_sources("ngram+step") == ("ngram", "step")
    assert token_speculation_sources(" OFF ") == ()


@pytest.mark.parametrize("field,value,match", [
    ("token_speculation", "ngram+eagle", "token_speculation"), ("token_speculation", "ngram+ngram", "each once"),
    ("token_speculation", "", "token_speculation"), ("token_speculation", None, "token_speculation"),
    ("num_speculative_tokens", 0, "num_speculative_tokens"), ("num_speculative_tokens", 2.5, "num_speculative_tokens"),
    ("draft_policy", "sometimes", "draft_policy"), ("draft_token_speculation", "step", "'step' proposes"),
    ("draft_token_speculation", "bigram", "draft_token_speculation")])
def test_bad_settings_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ReasonerConfig(**{field: value})


def test_the_drafting_modes_draft_adaptively_by_default():
    assert ReasonerConfig(mode="speculative").adaptive_drafting and ReasonerConfig(mode="fpsr").adaptive_drafting
    assert not ReasonerConfig(mode="speculative", draft_policy="always").adaptive_drafting
    assert not ReasonerConfig(mode="fpsr", draft_policy="always").adaptive_drafting
    assert not ReasonerConfig(mode="token").adaptive_drafting


# --------------------------------------------------------------------------------------------------
# One proposal, verified (the compiled ops on a real forward)
# --------------------------------------------------------------------------------------------------


def _prefix(reasoner, prompt=PROMPTS[0]):
    return reasoner.target.encode_prompt(prompt)


def _greedy(reasoner, ids, n):
    """The target's first ``n`` greedy tokens after ``ids``, decoded one forward per token."""
    plain = CachedSequence(reasoner.target.model, ids)
    out = []
    for _ in range(n):
        out.append(int(torch.argmax(plain.next_logits())))
        plain.extend([out[-1]])
    return out


def test_greedy_verification_keeps_exactly_the_argmax_prefix(reasoner):
    model = reasoner.target.model
    ids = _prefix(reasoner)
    greedy = _greedy(reasoner, ids, 4)
    wrong = (greedy[2] + 1) % model.config.vocab_size
    for proposal, accepted in ((greedy[:3], 3), (greedy[:2] + [wrong], 2), ([wrong], 0)):
        seq = CachedSequence(model, ids)
        tokens, n = verify_proposal(seq, Sampler(), proposal)
        assert n == accepted and tokens == greedy[:accepted + 1]
        assert seq.cached == len(ids) + len(proposal)  # the caller rolls back


def _first_two(reasoner, proposal, draws, temperature, seed_base):
    model = reasoner.target.model
    ids = _prefix(reasoner)
    out = []
    for i in range(draws):
        seq = CachedSequence(model, ids)
        tokens, _ = verify_proposal(seq, Sampler(temperature=temperature, seed=seed_base + i), proposal)
        out.append(tokens)
    return out


def _chi2(samples, probs, top=8):
    """Chi-square p-value of ``samples`` against ``probs`` over the ``top`` likeliest tokens and the rest."""
    order = torch.argsort(probs, descending=True)[:top].tolist()
    expected = [float(probs[t]) for t in order]
    expected.append(max(1.0 - sum(expected), 0.0))
    counts = [sum(1 for s in samples if s == t) for t in order]
    counts.append(len(samples) - sum(counts))
    if expected[-1] * len(samples) < 5:  # too little mass outside the top tokens for the test: fold it in
        expected[-2] += expected.pop()
        counts[-2] += counts.pop()
    n = len(samples)
    return stats.chisquare(counts, [e * n for e in expected]).pvalue


def test_sampled_verification_keeps_the_target_distribution(reasoner):
    """A point-mass proposal through ops.speculative_sample: the first emitted token is distributed as the
    target's next-token distribution, and the second, given that the first was the proposed one, as the
    target's distribution after it (seeded draws; chi-square)."""
    model = reasoner.target.model
    ids = _prefix(reasoner)
    logits0 = CachedSequence(model, ids).next_logits()
    # the tiny random model is nearly flat at temperature 1: sharpen it until the likeliest token has
    # about half the mass, so that both branches (keep the guess, resample without it) occur often
    temperature = next(t for t in (1.0, 0.3, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002)
                       if float(Sampler(temperature=t).probs(logits0).max()) > 0.3)
    sampler = Sampler(temperature=temperature)
    p0 = sampler.probs(logits0)
    x0 = int(torch.argmax(p0))
    p1 = sampler.probs(CachedSequence(model, ids + [x0]).next_logits())
    x1 = int(torch.argsort(p1, descending=True)[1])  # the second likeliest: kept sometimes, resampled often
    draws = _first_two(reasoner, [x0, x1], 2000, temperature, seed_base=1000)
    first = [t[0] for t in draws]
    assert 0.05 < sum(1 for t in first if t == x0) / len(first) < 0.95  # both branches exercised
    assert _chi2(first, p0) > 1e-3
    second = [t[1] for t in draws if t[0] == x0]
    assert _chi2(second, p1) > 1e-3
    # the test can fail: a biased rule (always keep the guess) is caught
    assert _chi2([x0] * 500, p0) < 1e-6


# --------------------------------------------------------------------------------------------------
# Steps and modes: lossless
# --------------------------------------------------------------------------------------------------


def test_mode_token_is_the_target_text_with_fewer_forwards(reasoner):
    forwards = tokens = 0
    for prompt in PROMPTS:
        target = reasoner.generate(prompt, mode="target")
        token = reasoner.generate(prompt, mode="token")
        assert [(s.text, s.num_tokens) for s in token.steps] == [(s.text, s.num_tokens) for s in target.steps]
        assert token.finish_reason == target.finish_reason
        m = token.metrics
        forwards, tokens = forwards + m.target_step_forwards, tokens + m.target_tokens
        assert target.metrics.target_step_forwards == target.metrics.target_tokens  # plain: one per token
    assert forwards < tokens  # proposals were accepted somewhere


def test_token_speculation_off_is_plain_decoding(reasoner):
    r = reasoner.generate(PROMPTS[1], mode="token", token_speculation="off")
    assert r.metrics.target_proposals == 0 and r.metrics.target_step_forwards == r.metrics.target_tokens
    assert r.text == reasoner.generate(PROMPTS[1], mode="target").text


@pytest.mark.parametrize("policy,draft_spec", [("always", "off"), ("adaptive", "off"), ("always", "ngram")])
def test_speculative_keeps_the_alpha_ends_with_token_speculation(reasoner, same_tok_reasoner, policy, draft_spec):
    draft_proposals = 0
    for pair in (reasoner, same_tok_reasoner):
        for prompt in PROMPTS[:3]:
            kw = dict(draft_policy=policy, draft_token_speculation=draft_spec)
            assert pair.generate(prompt, alpha=1.0, **kw).text == pair.generate(prompt, mode="target").text
            drafted = pair.generate(prompt, alpha=0.0, **kw)
            if policy == "always":  # (adaptive drafting has the target write a step alone to price it)
                assert drafted.text == pair.generate(prompt, mode="draft").text
            draft_proposals += drafted.metrics.draft_proposals
    assert (draft_proposals > 0) == (draft_spec == "ngram")


def test_fallback_steps_take_the_rejected_step_as_proposal(same_tok_reasoner, monkeypatch):
    """With the same tokenizer the rejected step's ids are proposed as they are: each fallback starts with
    a proposal of the drafted step's first tokens."""
    seen = []
    real = RejectedStepProposer.propose

    def spy(self, context, step, k):
        out = real(self, context, step, k)
        if not step:
            seen.append((self.ref.tolist(), out))
        return out

    monkeypatch.setattr(RejectedStepProposer, "propose", spy)
    r = same_tok_reasoner.generate(PROMPTS[0], alpha=1.0)
    rejected = [s for s in r.steps if s.accepted is False]
    assert rejected and len(seen) == len(rejected)
    for ref, out in seen:
        assert out == ref[:len(out)] and out


def test_sampled_runs_are_seeded_and_alpha_one_matches_the_target_in_distribution(reasoner):
    kw = dict(temperature=1.0, seed=3)
    a, b = reasoner.generate(PROMPTS[0], mode="token", **kw), reasoner.generate(PROMPTS[0], mode="token", **kw)
    assert a.text == b.text


def test_carry_keeps_tokens_verified_past_a_step_end(reasoner):
    """A proposal that runs past a step's end leaves its extra target tokens for the next step: the same
    text, and the next step starts without a forward."""
    model, lm = reasoner.target.model, reasoner.target
    ids = _prefix(reasoner)
    greedy = _greedy(reasoner, ids, 8)

    class Oracle:  # proposes the greedy continuation, 8 tokens at once
        name = "oracle"

        def propose(self, context, step, k):
            done = len(context) - len(ids)
            return greedy[done:done + k]

    seq, carry, m = CachedSequence(model, ids), [], Metrics()
    w1 = write_step(seq, lm, Sampler(), "\n\n", 3, proposer=Oracle(), num_speculative_tokens=8, carry=carry,
                    metrics=m)
    assert w1.ids == greedy[:3] and m.target_step_forwards == 1
    assert carry == greedy[3:3]  # the cap limits the proposal to the step's room: nothing past it
    seq2, carry2, m2 = CachedSequence(model, ids), [greedy[0], greedy[1]], Metrics()
    w2 = write_step(seq2, lm, Sampler(), "\n\n", 1, carry=carry2, metrics=m2)
    assert w2.ids == [greedy[0]] and carry2 == [greedy[1]] and m2.target_step_forwards == 0
    assert seq2.ids == ids + [greedy[0]]


# --------------------------------------------------------------------------------------------------
# Adaptive drafting
# --------------------------------------------------------------------------------------------------


def test_policy_switches_off_after_rejections_and_probes_with_doubling_intervals():
    policy = AdaptiveDrafting()
    decisions = []
    for _ in range(12):
        draft = policy.should_draft()
        decisions.append(draft)
        if draft:  # every probe rejected; accepted, a drafted step would pay (6 + 1 < 15 per 20 tokens)
            policy.drafted(accepted=False, draft_cost=6, draft_tokens=20, verify_cost=1, fallback_cost=20,
                           fallback_tokens=20)
        else:
            policy.alone(cost=15, tokens=20)
    # drafted, 1 alone, probe, 2 alone, probe, 4 alone, probe, ...
    assert decisions == [True, False, True, False, False, True, False, False, False, False, True, False]
    assert policy.switches == 4


def test_policy_waits_longest_where_no_acceptance_can_pay():
    """A drafted step that costs more than the target's own even when accepted: one rejection and the
    next probe waits max_interval steps, and again after every failed probe."""
    policy = AdaptiveDrafting(max_interval=8, weight=1.0)  # estimates = the last observation
    assert policy.drafting_cost() is None and policy.alone_cost() is None  # nothing observed yet
    decisions = []
    for _ in range(20):
        draft = policy.should_draft()
        decisions.append(draft)
        if draft:
            policy.drafted(accepted=False, draft_cost=12, draft_tokens=20, verify_cost=1, fallback_cost=9,
                           fallback_tokens=20)
        else:
            policy.alone(cost=9, tokens=20)
    assert decisions == ([True] + [False] * 8) * 2 + [True, False]
    assert policy.drafting_cost(acceptance=1.0) == pytest.approx(13 / 20)
    assert policy.alone_cost() == pytest.approx(9 / 20)


def test_policy_keeps_drafting_while_steps_are_accepted_and_returns_when_they_are_again():
    policy = AdaptiveDrafting(price_alone_after=6)  # (five accepted steps, no step alone to price drafting)
    for _ in range(5):
        assert policy.should_draft()
        policy.drafted(accepted=True, draft_cost=10, draft_tokens=20, verify_cost=1)
    assert policy.switches == 0
    assert policy.drafting_cost() is None and policy.alone_cost() is None  # no fallback step to weigh yet
    assert policy.drafting_cost(acceptance=1.0) == pytest.approx(11 / 20)
    policy.drafted(accepted=False, draft_cost=10, draft_tokens=20, verify_cost=1, fallback_cost=20,
                   fallback_tokens=20)
    assert policy.should_draft()  # one rejection after five accepts: drafting still pays
    cheap = AdaptiveDrafting()
    cheap.drafted(accepted=False, draft_cost=0.2, draft_tokens=20, verify_cost=0.5, fallback_cost=20,
                  fallback_tokens=20)
    assert cheap.should_draft()  # a nearly free draft pays even at low acceptance


def test_policy_prices_the_target_alone_where_every_step_is_accepted():
    """All accepted, nothing the target wrote to compare with: after price_alone_after drafted steps the
    target writes one step alone; a draft dearer than that stops drafting, a cheaper one goes on."""
    for draft_cost, drafts_on in ((30.0, False), (2.0, True)):
        policy = AdaptiveDrafting(price_alone_after=3)
        for _ in range(3):
            assert policy.should_draft()
            policy.drafted(accepted=True, draft_cost=draft_cost, draft_tokens=20, verify_cost=1)
        assert policy.alone_cost() is None and not policy.should_draft() and policy.switches == 0
        policy.alone(cost=10, tokens=20)
        assert policy.should_draft()
        policy.drafted(accepted=True, draft_cost=draft_cost, draft_tokens=20, verify_cost=1)
        assert policy.should_draft() is drafts_on and policy.switches == (0 if drafts_on else 1)


def test_policy_arguments_are_checked():
    for kw, match in ((dict(weight=0), "weight"), (dict(weight=float("nan")), "weight"),
                      (dict(max_interval=0), "max_interval"), (dict(max_interval=2.5), "max_interval"),
                      (dict(price_alone_after=0), "price_alone_after")):
        with pytest.raises(ValueError, match=match):
            AdaptiveDrafting(**kw)


# Pinned forward costs (units of one decode forward; seconds set the draft's price against the target's):
# what the engine's policy weighs, so that its decisions do not depend on this machine's timings.
UNIT_COST = ForwardCost(seconds=1.0, check=((0, 1.0), (10, 2.0)), verify=((8, 0.6), (96, 1.2)))
FREE_VERIFY = ForwardCost(seconds=1.0, check=((0, 1.0), (10, 2.0)), verify=((8, 1e-9), (96, 1e-9)))
FREE_DRAFT = ForwardCost(seconds=1e-9, check=((0, 1.0), (10, 2.0)), verify=((8, 0.6), (96, 1.2)))
DEAR_DRAFT = ForwardCost(seconds=100.0, check=((0, 1.0), (10, 2.0)), verify=((8, 0.6), (96, 1.2)))


FLAT_CHECKS = ForwardCost(seconds=1.0, check=((0, 1.0), (10, 1.0)), verify=((8, 0.6), (96, 1.2)))  # GPU-like
SLOW_CHECKS = ForwardCost(seconds=1.0, check=((0, 1.0), (10, 10.0)), verify=((8, 0.6), (96, 1.2)))


def pin_costs(monkeypatch, reasoner, target: ForwardCost, draft: ForwardCost, mode: str = "speculative") -> None:
    engine = reasoner.engine(mode)
    k = reasoner.config.num_speculative_tokens
    monkeypatch.setattr(engine, "forward_costs", {("target", k): target, ("draft", k): draft})
    monkeypatch.setattr(engine, "adaptive_state", {})  # policies start afresh, and do not leak into other tests


def test_forward_cost_arithmetic():
    cost = ForwardCost(seconds=0.1, check=((0, 1.0), (4, 1.8), (10, 2.4)), verify=((8, 0.7), (32, 1.2)))
    assert (cost.check_cost(0), cost.check_cost(2), cost.check_cost(7)) == pytest.approx((1.0, 1.4, 2.1))
    assert cost.check_cost(20) == pytest.approx(3.4)  # linear past the last measured K
    assert cost.verify_cost(20) == pytest.approx(0.95) and cost.verify_cost(1) == pytest.approx(0.7 - 7 * 0.5 / 24)
    assert cost.step_cost(forwards=3, proposals=0, proposed_tokens=0) == 3.0
    assert cost.step_cost(forwards=6, proposals=2, proposed_tokens=8) == pytest.approx(4 + 2 * 1.8)


def test_forward_costs_are_measured_on_the_model(reasoner):
    cost = measure_forward_cost(reasoner.target, 3, repeats=1)
    assert [k for k, _ in cost.check] == [0, 1, 2, 3] and cost.check[0] == (0, 1.0)
    assert [n for n, _ in cost.verify] == [8, 32, 96]
    assert cost.seconds > 0 and all(c > 0 for _, c in cost.check + cost.verify)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="max_proposal"):
            measure_forward_cost(reasoner.target, bad)


def test_the_engine_times_forwards_once_and_weighs_pinned_costs(reasoner, content_judge, monkeypatch):
    """Each model's forwards are timed once, at the first request that needs them (alpha = 1, where
    nothing can be accepted, needs only the target's, for its proposal gate); later requests reuse the
    figures. Pinned costs decide: a draft and verification that cost nothing keep drafting through
    rejections; a draft 100x the target's price stops at the first."""
    content_judge(reasoner)
    engine = reasoner.engine("speculative")
    monkeypatch.setattr(engine, "forward_costs", {})
    monkeypatch.setattr(engine, "adaptive_state", {})
    timed = []
    real = engine_base.measure_forward_cost
    monkeypatch.setattr(engine_base, "measure_forward_cost",
                        lambda lm, k, **kw: timed.append((lm.name, k)) or real(lm, k, repeats=1, **kw))
    kw = dict(draft_policy="adaptive", proposal_policy="adaptive", max_new_tokens=60)
    k = reasoner.config.num_speculative_tokens
    reasoner.generate(PROMPTS[0], alpha=1.0, **kw)
    assert timed == [("target", k)]
    for prompt in PROMPTS[:2]:
        reasoner.generate(prompt, alpha=0.5, **kw)
    assert timed == [("target", k), ("draft", k)] and list(engine.forward_costs) == [("target", k), ("draft", k)]
    pin_costs(monkeypatch, reasoner, FREE_VERIFY, FREE_DRAFT)
    free = [reasoner.generate(p, alpha=0.5, **kw).metrics for p in PROMPTS]
    assert sum(m.verified_steps - m.accepted_steps for m in free) > 0  # rejections happened...
    assert all(m.undrafted_steps <= 1 for m in free)  # ...and drafting went on (but for a step pricing it)
    pin_costs(monkeypatch, reasoner, UNIT_COST, DEAR_DRAFT)
    dear = [reasoner.generate(p, alpha=0.5, **kw).metrics for p in PROMPTS]
    assert sum(m.undrafted_steps for m in dear) > 0
    assert len(timed) == 2


def test_adaptive_drafting_in_the_engine(reasoner, content_judge, monkeypatch):
    """A judge that rejects steps: the policy writes steps without drafting them (the text is unchanged
    where nothing is accepted); alpha = 1, which accepts nothing, drafts no step at all; alpha = 0 accepts
    every one: drafting stops only where the target writes a step alone for less."""
    pin_costs(monkeypatch, reasoner, UNIT_COST, UNIT_COST)  # a draft as dear as the target: seldom pays
    prompt = PROMPTS[2]
    rejected = reasoner.generate(prompt, alpha=1.0, draft_policy="adaptive")
    always = reasoner.generate(prompt, alpha=1.0, draft_policy="always")
    assert rejected.text == always.text
    m = rejected.metrics
    assert m.verified_steps == 0 and m.draft_tokens == 0 and m.undrafted_steps == m.num_steps
    assert [s.source for s in rejected.steps] == ["target"] * m.num_steps
    # alpha = 0 accepts every step: after two, the target writes one alone to price it; a draft as dear as
    # the target then stops, a free one goes on
    accepted = reasoner.generate(prompt, alpha=0.0, draft_policy="adaptive").metrics
    assert accepted.accepted_steps == accepted.verified_steps == 3 < accepted.num_steps  # 2, priced, 1 more
    assert accepted.undrafted_steps == accepted.num_steps - 3
    pin_costs(monkeypatch, reasoner, FREE_VERIFY, FREE_DRAFT)
    accepted = reasoner.generate(prompt, alpha=0.0, draft_policy="adaptive").metrics
    assert accepted.undrafted_steps == 1 and accepted.accepted_steps == accepted.num_steps - 1
    pin_costs(monkeypatch, reasoner, UNIT_COST, UNIT_COST)
    content_judge(reasoner)  # real verdicts on random models: some accepted, some rejected
    mixed = [reasoner.generate(p, alpha=0.5, draft_policy="adaptive", max_new_tokens=60).metrics for p in PROMPTS]
    assert sum(x.undrafted_steps for x in mixed) > 0 and sum(x.verified_steps for x in mixed) > 0
    for x in mixed:
        assert x.verified_steps + x.undrafted_steps == x.num_steps


@pytest.mark.parametrize("launch", ["eager", "on_reject"])
def test_adaptive_drafting_in_fpsr(reasoner, content_judge, monkeypatch, launch):
    """Mode fpsr drafts adaptively as mode speculative does: its scheduler opens a step with no draft
    where the policy says drafting does not pay. At alpha = 1 no step is drafted and every text is the
    target's, in a batch too; at alpha = 0 a free draft drafts on but for the step that prices the target
    alone, a draft at 100x the target's price stops once that step is priced; a mixed judge gives both
    kinds of step."""
    engine = reasoner.engine("fpsr")
    monkeypatch.setattr(engine, "target_launch", launch)
    pin_costs(monkeypatch, reasoner, UNIT_COST, UNIT_COST, mode="fpsr")
    kw = dict(mode="fpsr", draft_policy="adaptive", max_new_tokens=60)
    alone = reasoner.generate_batch(PROMPTS[:3], alpha=1.0, **kw)
    for prompt, r in zip(PROMPTS, alone):
        assert r.text == reasoner.generate(prompt, mode="target", max_new_tokens=60).text
        m = r.metrics
        assert m.verified_steps == 0 and m.draft_tokens == 0 and m.undrafted_steps == m.num_steps > 1
        assert [s.source for s in r.steps] == ["target"] * m.num_steps
    stats = engine.last_stats
    assert stats["drafts_launched"] == 0 and stats["undrafted_steps"] == sum(r.metrics.num_steps for r in alone)
    assert stats["targets_continued"] == stats["undrafted_steps"] - 3  # every later step continues the branch
    pin_costs(monkeypatch, reasoner, FREE_VERIFY, FREE_DRAFT, mode="fpsr")
    free = reasoner.generate(PROMPTS[2], alpha=0.0, **kw).metrics
    assert free.undrafted_steps == 1 and free.accepted_steps == free.verified_steps == free.num_steps - 1
    pin_costs(monkeypatch, reasoner, UNIT_COST, DEAR_DRAFT, mode="fpsr")
    dear = reasoner.generate(PROMPTS[2], alpha=0.0, **kw).metrics
    assert dear.accepted_steps == dear.verified_steps
    assert dear.verified_steps <= 2 + reasoner.config.window and dear.undrafted_steps >= dear.num_steps - dear.verified_steps
    content_judge(reasoner)  # real verdicts on random models: some accepted, some rejected
    pin_costs(monkeypatch, reasoner, UNIT_COST, UNIT_COST, mode="fpsr")
    mixed = [r.metrics for r in reasoner.generate_batch(PROMPTS, alpha=0.5, **kw)]
    assert sum(x.undrafted_steps for x in mixed) > 0 and sum(x.verified_steps for x in mixed) > 0
    for x in mixed:
        assert x.verified_steps + x.undrafted_steps == x.num_steps


def test_fpsr_frees_an_accepted_steps_eager_branch(reasoner, monkeypatch):
    """Eager launch: the fallback branch of a step that is accepted is freed with the commit, so no more
    than a window of branches is ever alive (their CANCEL comes after the commit, which drops the epoch)."""
    engine = reasoner.engine("fpsr")
    monkeypatch.setattr(engine, "target_launch", "eager")
    alive = []
    monkeypatch.setattr(engine, "observer", lambda chain, d_row: alive.append(
        sum(row.alive for name in ("branches", "parked") for row in engine._batches[name].rows)))
    r = reasoner.generate(PROMPTS[2], mode="fpsr", alpha=0.0, draft_policy="always", max_new_tokens=60)
    assert r.metrics.accepted_steps == r.metrics.num_steps > reasoner.config.window
    assert alive and max(alive) <= reasoner.config.window


@pytest.mark.parametrize("launch", ["eager", "on_reject"])
def test_the_proposal_gate_in_fpsr_keeps_the_text(reasoner, monkeypatch, launch):
    """Mode fpsr gates each row's proposal in its batched passes as the sequential modes gate a step's:
    where checks cost more than they emit fewer proposals are checked; the text is the target's."""
    monkeypatch.setattr(reasoner.engine("fpsr"), "target_launch", launch)
    kw = dict(mode="fpsr", alpha=1.0, max_new_tokens=60, token_speculation="ngram")
    target_text = reasoner.generate(PROMPTS[1], mode="target", max_new_tokens=60).text
    runs = {}
    for name, cost, policy in (("always", SLOW_CHECKS, "always"), ("cpu", SLOW_CHECKS, "adaptive"),
                               ("gpu", FLAT_CHECKS, "adaptive")):
        pin_costs(monkeypatch, reasoner, cost, cost, mode="fpsr")
        r = reasoner.generate(PROMPTS[1], proposal_policy=policy, **kw)
        assert r.text == target_text
        runs[name] = r.metrics
    assert runs["always"].target_proposals > runs["cpu"].target_proposals > 0
    assert runs["gpu"].target_proposals == runs["always"].target_proposals


def test_token_metrics_merge_and_derive():
    a = Metrics(target_tokens=10, target_step_forwards=5, target_proposals=2, target_proposed_tokens=8,
                target_accepted_tokens=6, draft_tokens=4, draft_step_forwards=4).finalize()
    assert (a.tokens_per_target_forward, a.token_acceptance_rate, a.mean_accepted_length) == (2.0, 0.75, 4.0)
    assert a.tokens_per_draft_forward == 1.0 and a.draft_mean_accepted_length is None
    total = Metrics.merge([a, Metrics(target_tokens=2, target_step_forwards=2).finalize()])
    assert total.tokens_per_target_forward == 12 / 7 and total.mean_accepted_length == 4.0
    assert Metrics().finalize().token_acceptance_rate is None


def test_proposal_gate_closes_while_checks_do_not_pay_and_probes_with_doubling_intervals():
    gate = ProposalGate(UNIT_COST, weight=1.0, max_interval=4)  # a check of 10 costs 2 plain forwards
    decisions = []
    for _ in range(14):
        check = gate.should_propose()
        decisions.append(check)
        if check:
            gate.checked(proposed=10, emitted=1)  # nothing accepted
    assert decisions == [True, False, True, False, False, True] + [False] * 4 + [True] + [False] * 3
    assert gate.switches == 4
    gate.skip = 0
    gate.checked(proposed=10, emitted=3)  # 3 tokens for 2 forwards' cost: pays
    assert gate.should_propose() and gate.interval == 1
    flat = ProposalGate(FLAT_CHECKS)
    flat.checked(proposed=10, emitted=1)  # where a check costs one forward it never loses
    assert flat.should_propose() and flat.switches == 0


def test_proposal_gate_arguments_are_checked():
    for kw, match in ((dict(cost=None), "cost"), (dict(weight=0), "weight"), (dict(max_interval=0), "max_interval")):
        with pytest.raises(ValueError, match=match):
            ProposalGate(**{"cost": UNIT_COST, **kw})
    with pytest.raises(ValueError, match="proposal_policy"):
        ReasonerConfig(proposal_policy="never")
    assert all(ReasonerConfig(mode=mode).adaptive_proposals for mode in ("token", "speculative", "fpsr"))
    assert not ReasonerConfig(mode="fpsr", proposal_policy="always").adaptive_proposals


def test_the_proposal_gate_keeps_the_text_and_checks_only_what_pays(reasoner, monkeypatch):
    """Mode token: where a check of K tokens costs K plain forwards (more than the accepted guesses
    emit) the gate checks fewer proposals than every-proposal checking; where it costs one (a GPU) it
    checks them all. The text is the target-only text either way."""
    target_text = reasoner.generate(PROMPTS[1], mode="target", max_new_tokens=60).text
    runs = {}
    for name, cost, policy in (("always", SLOW_CHECKS, "always"), ("cpu", SLOW_CHECKS, "adaptive"),
                               ("gpu", FLAT_CHECKS, "adaptive")):
        pin_costs(monkeypatch, reasoner, cost, cost, mode="token")
        r = reasoner.generate(PROMPTS[1], mode="token", proposal_policy=policy, max_new_tokens=60)
        assert r.text == target_text
        runs[name] = r.metrics
    assert runs["always"].target_proposals > runs["cpu"].target_proposals > 0
    assert runs["gpu"].target_proposals == runs["always"].target_proposals


def test_adaptive_drafting_is_carried_from_request_to_request_at_one_alpha(reasoner, content_judge, monkeypatch):
    """A request starts where the last one at the same alpha left the policy: after rejections at a draft
    that costs 100x the target, the next request writes its first step alone; another alpha, or a
    cleared state, starts afresh and drafts its first step."""
    content_judge(reasoner)
    pin_costs(monkeypatch, reasoner, UNIT_COST, DEAR_DRAFT)
    kw = dict(draft_policy="adaptive", max_new_tokens=60)
    first = [reasoner.generate(p, alpha=0.5, **kw) for p in PROMPTS]
    assert sum(r.metrics.undrafted_steps for r in first) > 0
    later = reasoner.generate(PROMPTS[0], alpha=0.5, **kw)
    assert later.steps[0].accepted is None and later.steps[0].source == "target"  # written alone
    fresh = reasoner.generate(PROMPTS[0], alpha=0.4, **kw)
    assert fresh.steps[0].accepted is not None  # drafted and judged
    reasoner.engine("speculative").adaptive_state.clear()
    assert reasoner.generate(PROMPTS[0], alpha=0.5, **kw).steps[0].accepted is not None


def test_a_seeded_sampled_request_starts_the_adaptive_policies_afresh(reasoner, content_judge, monkeypatch):
    """With a seed, a sampled request's draws do not depend on the requests before it, though the gate
    and the drafting policy carry their state across greedy ones."""
    content_judge(reasoner)
    kw = dict(alpha=0.5, temperature=0.9, seed=5, draft_policy="adaptive", proposal_policy="adaptive",
              max_new_tokens=40)
    for mode in ("speculative", "token", "fpsr"):
        pin_costs(monkeypatch, reasoner, SLOW_CHECKS, DEAR_DRAFT, mode=mode)
        first = reasoner.generate(PROMPTS[1], mode=mode, **kw)
        for prompt in PROMPTS:  # greedy requests move the carried state on
            reasoner.generate(prompt, mode=mode, alpha=0.5, draft_policy="adaptive", proposal_policy="adaptive")
        assert reasoner.engine(mode).adaptive_state
        again = reasoner.generate(PROMPTS[1], mode=mode, **kw)
        assert [(s.text, s.source) for s in again.steps] == [(s.text, s.source) for s in first.steps]
