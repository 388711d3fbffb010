"""SpeculativeReasoner on tiny random models: the modes' defining properties.

- alpha = 1 reproduces target-only output, alpha = 0 draft-only output, step structure included;
- every cache equals a fresh prefill of the committed text after each committed step: of the committed
  token ids (``seq.ids``), which are the truth; the text is their decode. Steps are re-tokenized one at a
  time, so the ids are not always a re-tokenization of the joined text (a token may span two steps there);
- a batch gives the single-request results; streaming yields the same steps;
- metrics are consistent with the steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import PROMPTS
from dreamr.result import Metrics, Result
from test_cache import assert_matches_prefill


def steps_of(result: Result):
    return [(s.text, s.source, s.cpn, s.accepted, s.num_tokens) for s in result.steps]


def structure(result: Result):
    return [(s.text, s.num_tokens) for s in result.steps]


@pytest.fixture(params=["other_tokenizer", "same_tokenizer", "gemma3_target"])
def pair(request, reasoner, same_tok_reasoner, gemma_reasoner):
    return {"other_tokenizer": reasoner, "same_tokenizer": same_tok_reasoner,
            "gemma3_target": gemma_reasoner}[request.param]


MIXED = 0.5  # with the content judge (conftest), about half the drafted steps are accepted


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_alpha_one_is_target_only_and_alpha_zero_is_draft_only(pair, prompt):
    target_only = pair.generate(prompt, mode="target")
    draft_only = pair.generate(prompt, mode="draft")
    none_accepted = pair.generate(prompt, alpha=1.0)
    all_accepted = pair.generate(prompt, alpha=0.0)

    assert none_accepted.text == target_only.text
    assert structure(none_accepted) == structure(target_only)
    assert all(s.source == "target" and s.accepted is False for s in none_accepted.steps)
    assert none_accepted.finish_reason == target_only.finish_reason

    assert all_accepted.text == draft_only.text
    assert structure(all_accepted) == structure(draft_only)
    assert all(s.source == "draft" and s.accepted is True for s in all_accepted.steps)
    assert all_accepted.finish_reason == draft_only.finish_reason

    assert none_accepted.metrics.step_acceptance_rate == 0.0
    assert all_accepted.metrics.step_acceptance_rate == 1.0
    assert target_only.metrics.step_acceptance_rate is None
    assert len(target_only.steps) >= 3  # the step structure is really exercised


def test_target_only_matches_transformers_generate(reasoner, tok_a, target_model):
    """Target mode is plain greedy decoding cut into steps: same tokens as transformers' generate."""
    prompt = PROMPTS[0]
    result = reasoner.generate(prompt, mode="target")
    ids = torch.tensor([tok_a.encode(prompt)])
    with torch.no_grad():
        out = target_model.generate(ids, max_new_tokens=result.metrics.target_tokens, do_sample=False,
                                    pad_token_id=tok_a.eos_token_id)
    want = tok_a.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert result.text == want


def test_caches_match_fresh_prefill_after_every_step(pair, content_judge):
    # "fresh prefill of the committed text" = a prefill of each model's committed ids (prompt + each step's
    # tokens, a step taken from the other model re-tokenized on its own), not of the joined text re-encoded
    content_judge(pair)
    checked = []

    def observer(t_seq, d_seq):
        for seq in (t_seq, d_seq):
            if seq is not None:
                assert_matches_prefill(seq)
        checked.append(1)

    prompt = PROMPTS[1]
    alpha = MIXED
    engine = pair.engine("speculative")
    engine.observer = observer
    try:
        result = pair.generate(prompt, alpha=alpha)
    finally:
        engine.observer = None
    sources = {s.source for s in result.steps}
    assert sources == {"draft", "target"}, "the run should mix accepted and rejected steps"
    assert len(checked) == len(result.steps)


def test_committed_text_is_what_each_cache_holds(reasoner, content_judge):
    content_judge(reasoner)
    """After the run, each model's sequence holds prompt + committed text (re-tokenized across models)."""
    seen = {}
    engine = reasoner.engine("speculative")
    engine.observer = lambda t, d: seen.update(t=list(t.ids), d=list(d.ids))
    try:
        prompt = PROMPTS[0]
        result = reasoner.generate(prompt, alpha=MIXED)
    finally:
        engine.observer = None
    assert {s.source for s in result.steps} == {"draft", "target"}
    t_tok, d_tok = reasoner.target.tokenizer, reasoner.draft.tokenizer
    assert t_tok.decode(seen["t"], skip_special_tokens=True).endswith(result.text)
    assert d_tok.decode(seen["d"], skip_special_tokens=True).endswith(result.text)


@pytest.mark.parametrize("mode", ["speculative", "target", "draft"])
def test_batch_equals_one_at_a_time(reasoner, mode, content_judge):
    content_judge(reasoner)
    alpha = MIXED
    batch = reasoner.generate_batch(PROMPTS, mode=mode, alpha=alpha)
    single = [reasoner.generate(p, mode=mode, alpha=alpha) for p in PROMPTS]
    assert [steps_of(r) for r in batch] == [steps_of(r) for r in single]
    assert [r.text for r in batch] == [r.text for r in single]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in single]


def test_stream_yields_the_committed_steps(reasoner, content_judge):
    content_judge(reasoner)
    prompt = PROMPTS[2]
    alpha = MIXED
    stream = reasoner.stream(prompt, alpha=alpha)
    streamed = [(s.text, s.source, s.cpn, s.accepted, s.num_tokens) for s in stream]
    assert stream.result is not None
    assert streamed == steps_of(stream.result) == steps_of(reasoner.generate(prompt, alpha=alpha))
    with pytest.raises(RuntimeError, match="already been iterated"):  # a stream runs its request once
        iter(stream)


def test_rejected_steps_keep_the_drafts_text(reasoner, content_judge):
    content_judge(reasoner)
    prompt = PROMPTS[0]
    result = reasoner.generate(prompt, alpha=MIXED)
    assert {s.source for s in result.steps} == {"draft", "target"}
    drafted = reasoner.generate(prompt, mode="draft")
    for i, step in enumerate(result.steps):
        if step.accepted:
            assert step.rejected_text is None and step.rejected_num_tokens is None
        else:
            assert step.rejected_text and step.rejected_num_tokens >= 1
            if i == 0:  # the first rejected draft is the draft-only run's first step
                assert (step.rejected_text, step.rejected_num_tokens) == (drafted.steps[0].text,
                                                                          drafted.steps[0].num_tokens)
        d = step.to_dict()
        assert (d["rejected_text"], d["rejected_num_tokens"]) == (step.rejected_text, step.rejected_num_tokens)
    for step in drafted.steps:
        assert step.rejected_text is None and step.rejected_num_tokens is None


def test_sampling_is_seeded_and_keeps_the_alpha_ends(reasoner):
    """Seeded runs repeat; without token-level speculation the alpha ends reproduce the single-model
    texts draw for draw (with it they do in distribution: tests/test_speculation.py)."""
    prompt = PROMPTS[0]
    kw = dict(temperature=0.9, top_p=0.95, seed=11)
    a, b = reasoner.generate(prompt, **kw), reasoner.generate(prompt, **kw)
    assert steps_of(a) == steps_of(b)
    kw.update(token_speculation="off", draft_token_speculation="off")
    assert reasoner.generate(prompt, alpha=1.0, **kw).text == reasoner.generate(prompt, mode="target", **kw).text
    assert reasoner.generate(prompt, alpha=0.0, **kw).text == reasoner.generate(prompt, mode="draft", **kw).text
    assert reasoner.generate(prompt, mode="target", **kw).text != reasoner.generate(prompt, mode="target").text


def test_metrics_are_consistent(reasoner, content_judge):
    content_judge(reasoner)
    prompt = PROMPTS[3]
    r = reasoner.generate(prompt, alpha=MIXED)
    m = r.metrics
    drafted = [s for s in r.steps if s.source == "draft"]
    written = [s for s in r.steps if s.source == "target"]
    assert m.num_steps == len(r.steps)
    assert m.verified_steps == len(r.steps)  # sequential mode verifies every step once
    assert m.accepted_steps == len(drafted)
    assert m.step_acceptance_rate == pytest.approx(len(drafted) / len(r.steps))
    assert m.target_tokens == sum(s.num_tokens for s in written)
    assert m.draft_tokens >= sum(s.num_tokens for s in drafted)
    assert m.committed_tokens == sum(s.num_tokens for s in r.steps) <= reasoner.config.max_new_tokens
    # target: one verify pass per verified step plus its step forwards; each step forward emits one
    # token, or a checked proposal's accepted tokens plus one (token-level speculation)
    assert m.target_forward_passes >= m.verified_steps + m.target_step_forwards
    for who, tokens in (("target", m.target_tokens), ("draft", m.draft_tokens)):
        forwards, proposals = getattr(m, f"{who}_step_forwards"), getattr(m, f"{who}_proposals")
        accepted, proposed = getattr(m, f"{who}_accepted_tokens"), getattr(m, f"{who}_proposed_tokens")
        assert proposals <= forwards and accepted <= proposed
        assert tokens <= forwards + accepted
    assert m.draft_forward_passes >= m.draft_step_forwards
    assert m.tokens_per_target_forward == pytest.approx(m.target_tokens / m.target_step_forwards)
    if m.target_proposals:
        assert m.mean_accepted_length == pytest.approx(1 + m.target_accepted_tokens / m.target_proposals)
        assert m.token_acceptance_rate == pytest.approx(m.target_accepted_tokens / m.target_proposed_tokens)
    assert m.nonfinite_verdicts == 0 and m.wall_time_s > 0 and m.tokens_per_second > 0
    d = r.to_dict()
    assert d["metrics"]["num_steps"] == m.num_steps and len(d["steps"]) == len(r.steps)
    total = Metrics.merge([m, m])
    assert total.num_steps == 2 * m.num_steps and total.step_acceptance_rate == m.step_acceptance_rate


def test_nan_verdicts_are_rejected_and_counted(reasoner, monkeypatch):
    verifier = reasoner.verifier_for(reasoner.config)
    real = verifier.cpn
    monkeypatch.setattr(verifier, "cpn", lambda hidden, alpha=None: real(hidden * float("nan"), alpha))
    r = reasoner.generate(PROMPTS[0], alpha=0.0)
    assert r.metrics.nonfinite_verdicts == r.metrics.verified_steps == len(r.steps) > 0
    assert all(s.source == "target" and math.isnan(s.cpn) for s in r.steps)
    assert r.text == reasoner.generate(PROMPTS[0], mode="target").text
    assert r.to_dict()["steps"][0]["cpn"] is None  # JSON-safe


def test_eos_and_answer_marker_stop(reasoner):
    prompt = PROMPTS[0]
    base = reasoner.generate(prompt, mode="draft")
    # make the draft's second step's first token an EOS token: generation stops there
    second_first = reasoner.draft.tokenizer.encode(base.steps[1].text, add_special_tokens=False)[0]
    eos = set(reasoner.draft.eos_ids)
    reasoner.draft.eos_ids = eos | {second_first}
    try:
        r = reasoner.generate(prompt, alpha=0.0)
    finally:
        reasoner.draft.eos_ids = eos
    assert r.finish_reason == "eos" and len(r.steps) == 2 and r.steps[1].text == ""
    marker = base.steps[1].text[:2]
    r = reasoner.generate(prompt, mode="draft", answer_marker=marker)
    assert r.finish_reason == "answer" and len(r.steps) == 2
    r = reasoner.generate(prompt, mode="draft", max_new_tokens=7)
    assert r.finish_reason == "length" and r.metrics.committed_tokens == 7


def test_chat_messages_prompt(reasoner):
    messages = [{"role": "user", "content": "How many clips did Natalia sell?"}]
    r = reasoner.generate(messages, alpha=0.0)
    assert r.text == reasoner.generate(messages, mode="draft").text and r.steps


def test_self_speculative_early_exit_draft(target_model, tok_a):
    models = pytest.importorskip("dreamr.models")
    from dreamr.reasoner import SpeculativeReasoner

    draft = models.EarlyExitDraft(target_model, 1)
    r = SpeculativeReasoner(target_model, draft, target_tokenizer=tok_a, draft_tokenizer=tok_a,
                            max_step_tokens=6, max_new_tokens=24, draft_policy="always")
    assert r.same_tokenizer
    assert r.generate(PROMPTS[0], alpha=0.0).text == r.generate(PROMPTS[0], mode="draft").text
    assert r.generate(PROMPTS[0], alpha=1.0).text == r.generate(PROMPTS[0], mode="target").text
    n_params = sum(p.numel() for p in target_model.parameters())
    assert {p.data_ptr() for p in draft.parameters()} <= {p.data_ptr() for p in target_model.parameters()}
    assert n_params > 0


def test_a_request_is_built_once_frozen_with_its_verifier(reasoner):
    import dataclasses

    from dreamr.config import ReasonerConfig

    request = reasoner._request(PROMPTS[0], None, reasoner._config({}))
    assert isinstance(request.config, ReasonerConfig)
    assert request.verifier is reasoner.verifier_for(request.config)
    assert request.target_ids == reasoner.target.encode_prompt(PROMPTS[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.verifier = None
    single = reasoner._request(PROMPTS[0], None, reasoner._config({"mode": "target"}))
    assert single.verifier is None and single.draft_ids == []  # one model, nothing verified
