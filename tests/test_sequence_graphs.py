"""The sequential modes' decode through preallocated storage (dreamr.engines.ragged_sequence).

With ``cuda_graphs`` on, modes "target", "draft", "token" and "speculative" hold each model's sequence as a
:class:`RaggedSequence` over a one-row ragged batch, whose one-token forwards go through the bucketed
decode graphs (replayed on a GPU; on a CPU the same bucketed forward runs eagerly). Checked here:

- a RaggedSequence is a CachedSequence operation for operation (logits, hidden states, rollbacks, the
  cache itself against a fresh prefill), float64 tiny models;
- every sequential mode commits with it exactly what it commits without (and the text of transformers'
  ``generate`` in mode "target"), its one-token forwards go through the bucketed path, and the storage
  is kept from request to request and lent to one sequence at a time;
- an image prefix (Qwen2-VL) stays in the row and the text is that of the eager path;
- on a GPU: graphs are captured once and replayed, and the text equals the eager run's.
"""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import PROMPTS
from dreamr.cache import CachedSequence
from dreamr.engines.ragged_sequence import RaggedSequence, SequencePool
from dreamr.lm import LM
from dreamr.testing import TINY_SETTINGS, fresh_ragged_cache

MIXED = 0.5  # with the content judge (conftest), about half the drafted steps are accepted
SEQUENTIAL = ["target", "draft", "token", "speculative"]


@pytest.fixture
def graphed(reasoner):
    """``reasoner`` with every engine's ``cuda_graphs`` set to "on" (restored and freed afterwards)."""
    engines = [reasoner.engine(m) for m in SEQUENTIAL]
    for e in engines:
        e.cuda_graphs = "on"
    yield reasoner
    for e in engines:
        e.cuda_graphs = "auto"
        e.free()


def same_result(a, b):
    assert a.text == b.text
    assert [(s.text, s.source, s.num_tokens) for s in a.steps] == [(s.text, s.source, s.num_tokens) for s in b.steps]
    for x, y in zip(a.steps, b.steps):
        assert (x.cpn is None) == (y.cpn is None)
        if x.cpn is not None:
            assert x.cpn == pytest.approx(y.cpn, abs=1e-9)
    assert a.finish_reason == b.finish_reason


def assert_row_is_fresh(seq: RaggedSequence):
    """The row's cache equals a fresh prefill of its cached ids."""
    if seq.cached:
        got = seq.batch.dense(seq.row, seq.cached)
        want = fresh_ragged_cache(seq.batch.lm, seq.ids[:seq.cached], seq.cached)
        for (k, v), (wk, wv) in zip(got, want):
            torch.testing.assert_close(k, wk, atol=1e-10, rtol=0)
            torch.testing.assert_close(v, wv, atol=1e-10, rtol=0)


def test_a_ragged_sequence_is_a_cached_sequence_operation_for_operation(target_model, tok_a):
    lm = LM(target_model, tok_a, "target")
    ids = tok_a.encode(PROMPTS[0])
    pool = SequencePool(lm, "target", capture=False)
    a, b = CachedSequence(target_model, ids), pool.open(ids, longest=len(ids) + 40)
    close = dict(atol=1e-9, rtol=0)

    def both(fn):
        x, y = fn(a), fn(b)
        torch.testing.assert_close(y, x, **close)
        assert (a.cached, a.ids, a.forward_passes) == (b.cached, b.ids, b.forward_passes)
        return x

    for _ in range(3):  # decode
        tok = int(both(lambda s: s.next_logits()).argmax())
        a.extend([tok]), b.extend([tok])
    proposal = [5, 9, 11]
    both(lambda s: s.logits_over(proposal))  # a checked proposal: the cache holds it until rolled back
    keep = len(a.ids) - 1 + 2
    for s in (a, b):
        s.extend(proposal[:1] + [7])
        s.uncache_to(keep)
    both(lambda s: s.next_logits())
    base = len(a.ids)
    both(lambda s: s.last_hidden([3, 4, 5, 6]))  # a verification: the step and its verdict prompt
    for s in (a, b):
        s.uncache_to(base)
    both(lambda s: s.next_logits())
    for s in (a, b):
        s.truncate(len(ids) + 1)  # a rejected step rolled back
    both(lambda s: s.next_logits())
    both(lambda s: s.last_hidden([]))  # nothing pending, nothing fed: the last token again
    assert_row_is_fresh(b)
    assert b.batch.graphs.stats["bucketed_forwards"] >= 5  # every one-token forward went through a bucket
    with pytest.raises(ValueError, match="truncate: length=99"):
        b.truncate(99)
    b.logits_over([3])  # the caller forgets to roll the proposal back
    with pytest.raises(RuntimeError, match="roll back what logits_over"):
        b.next_logits()


@pytest.mark.parametrize("mode", SEQUENTIAL)
def test_every_sequential_mode_commits_what_it_commits_eagerly(reasoner, graphed, content_judge, mode):
    content_judge(reasoner)
    kw = dict(mode=mode, alpha=MIXED) if mode == "speculative" else dict(mode=mode)
    engine = reasoner.engine(mode)
    for prompt in PROMPTS[:2]:
        engine.cuda_graphs = "off"
        want = reasoner.generate(prompt, **kw)
        engine.cuda_graphs = "on"
        got = reasoner.generate(prompt, **kw)
        same_result(got, want)
    stats = engine.decode_graph_stats()
    roles = ["draft"] if mode == "draft" else ["target", "draft"] if mode == "speculative" else ["target"]
    assert sorted(stats) == sorted(roles)
    for role in roles:
        assert stats[role]["bucketed_forwards"] > 0, (role, stats)
        assert stats[role]["graph_replays"] == 0  # nothing is captured on a CPU
    if mode == "speculative":
        assert {s.source for s in got.steps} == {"draft", "target"}  # rejections rolled the rows back


def test_target_mode_with_graphs_is_transformers_generate(reasoner, graphed, tok_a, target_model):
    result = reasoner.generate(PROMPTS[0], mode="target")
    ids = torch.tensor([tok_a.encode(PROMPTS[0])])
    with torch.no_grad():
        out = target_model.generate(ids, max_new_tokens=result.metrics.target_tokens, do_sample=False,
                                    pad_token_id=tok_a.eos_token_id)
    assert result.text == tok_a.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_the_rows_hold_a_fresh_prefill_after_every_step(reasoner, graphed, content_judge):
    content_judge(reasoner)
    checked = []

    def observer(t, d):
        for seq in (t, d):
            assert isinstance(seq, RaggedSequence)
            assert_row_is_fresh(seq)
        checked.append(1)

    engine = reasoner.engine("speculative")
    engine.observer = observer
    try:
        result = reasoner.generate(PROMPTS[1], alpha=MIXED)
    finally:
        engine.observer = None
    assert {s.source for s in result.steps} == {"draft", "target"} and len(checked) == len(result.steps)


def test_storage_is_kept_from_request_to_request_and_lent_to_one_sequence(reasoner, graphed):
    engine = reasoner.engine("target")
    reasoner.generate(PROMPTS[0], mode="target")
    pool = engine._sequence_pool("target")
    (batch, _), = pool._batches
    storage = batch.keys[0].data_ptr()
    reasoner.generate(PROMPTS[1], mode="target")
    assert len(pool._batches) == 1 and pool._batches[0][0].keys[0].data_ptr() == storage  # reused, not regrown
    # two sequences open at once (two interleaved streams) get two batches
    first = iter(reasoner.stream(PROMPTS[0], mode="target"))
    second = iter(reasoner.stream(PROMPTS[1], mode="target"))
    a, b = next(first), next(second)
    assert a.text and b.text and len(pool._batches) == 2
    rest_a = [s.text for s in first]
    rest_b = [s.text for s in second]
    alone = [reasoner.generate(p, mode="target") for p in PROMPTS[:2]]
    assert a.text + "".join(rest_a) == alone[0].text and b.text + "".join(rest_b) == alone[1].text
    del first, second
    gc.collect()
    reasoner.generate(PROMPTS[0], mode="target")
    assert len(pool._batches) == 2  # the batches came back to the pool


def test_cuda_graphs_setting_is_checked(reasoner):
    engine = reasoner.engine("target")
    engine.cuda_graphs = "sometimes"
    try:
        with pytest.raises(ValueError, match="cuda_graphs must be 'auto', 'on' or 'off', got 'sometimes'"):
            reasoner.generate(PROMPTS[0], mode="target")
    finally:
        engine.cuda_graphs = "auto"
    assert reasoner.generate(PROMPTS[0], mode="target").text  # "auto" on a CPU: the CachedSequence path


def test_an_image_prefix_stays_in_the_row(content_judge):
    from conftest import build_tokenizer, tiny_qwen2
    from dreamr.reasoner import SpeculativeReasoner
    from vlm_models import qwen2_vl, random_image

    model, processor = qwen2_vl(seed=0)
    tok = build_tokenizer(330, reverse=True, bos=False)
    r = SpeculativeReasoner(model, tiny_qwen2(tok), target_tokenizer=processor, draft_tokenizer=tok,
                            **{**TINY_SETTINGS, "max_step_tokens": 5, "max_new_tokens": 24})
    content_judge(r)
    image = random_image(3)
    prompt = "How many clips did Natalia sell altogether?"
    for mode in ("target", "speculative"):
        want = r.generate(prompt, images=[image], mode=mode, alpha=MIXED)
        engine = r.engine(mode)
        engine.cuda_graphs = "on"
        seen = []
        engine.observer = lambda t, d: seen.append((t.cached, t.min_cached))
        try:
            got = r.generate(prompt, images=[image], mode=mode, alpha=MIXED)
        finally:
            engine.cuda_graphs, engine.observer = "auto", None
        same_result(got, want)
        assert seen and all(floor > 0 and cached >= floor for cached, floor in seen)
        assert engine.decode_graph_stats()["target"]["bucketed_forwards"] > 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("mode", SEQUENTIAL)
def test_cuda_sequential_decode_replays_graphs(mode, content_judge):
    """On a GPU ("auto"): the one-token forwards are captured once per width bucket and replayed; the
    text equals the eager run's (float64 tiny models), the second request replays the kept graphs."""
    from conftest import build_tokenizer, tiny_llama, tiny_qwen2
    from dreamr.reasoner import SpeculativeReasoner

    tok_a, tok_b = build_tokenizer(400), build_tokenizer(330, reverse=True, bos=False)
    r = SpeculativeReasoner(tiny_llama(tok_a).to("cuda"), tiny_qwen2(tok_b).to("cuda"), target_tokenizer=tok_a,
                            draft_tokenizer=tok_b, **{**TINY_SETTINGS, "max_new_tokens": 40})
    content_judge(r)
    engine = r.engine(mode)
    assert engine.cuda_graphs == "auto"
    kw = dict(mode=mode, alpha=MIXED) if mode == "speculative" else dict(mode=mode)
    got = r.generate(PROMPTS[0], **kw)
    role = "draft" if mode == "draft" else "target"
    stats = engine.decode_graph_stats()[role]
    assert stats["graph_captures"] > 0 and stats["graph_replays"] > stats["graph_captures"]
    again = r.generate(PROMPTS[0], **kw)
    assert again.text == got.text
    assert engine.decode_graph_stats()[role]["graph_captures"] == 0  # kept from the first request
    engine.cuda_graphs = "off"
    try:
        same_result(got, r.generate(PROMPTS[0], **kw))
    finally:
        engine.cuda_graphs = "auto"


def test_forward_costs_are_timed_on_the_sequence_the_engine_decodes_with(reasoner, graphed, monkeypatch):
    """With graphs on, the adaptive policies' prices are those of the graphed forwards, kept apart from the
    eager ones: the timing runs on a RaggedSequence of the engine's pool, before the request opens its
    own, which then reuses that batch (one kept), and the counters are the request's alone."""
    engine = reasoner.engine("token")
    monkeypatch.setattr(engine, "forward_costs", {})
    monkeypatch.setattr(engine, "adaptive_state", {})
    seen = []
    engine.observer = lambda t, d: seen.append(dict(t.batch.graphs.stats))
    try:
        result = reasoner.generate(PROMPTS[0], mode="token", proposal_policy="adaptive")
    finally:
        engine.observer = None
    k = reasoner.config.num_speculative_tokens
    assert list(engine.forward_costs) == [("target", k, "graphs")]
    pool = engine._sequence_pool("target")
    assert len(pool._batches) == 1
    assert engine.decode_graph_stats()["target"] == seen[-1] and seen[-1]["bucketed_forwards"] > 0
    assert result.text == reasoner.generate(PROMPTS[0], mode="target").text
    engine.cuda_graphs = "off"
    engine.forward_cost("target", k)  # eager forwards are priced on their own
    assert sorted(engine.forward_costs, key=len) == [("target", k), ("target", k, "graphs")]


def test_a_one_row_batch_reserves_what_its_longest_sequence_needs(target_model, tok_a):
    lm = LM(target_model, tok_a, "target")
    seq = SequencePool(lm, "target", capture=False).open(tok_a.encode(PROMPTS[0]), longest=300)
    assert seq.batch.capacity == (1, 512)  # one row; the bucket above 300 columns, no compaction slack


def test_pooled_storage_outlives_inference_mode(reasoner, graphed, content_judge):
    """Storage and static graph inputs made under torch.inference_mode are ordinary tensors: a later
    request outside it writes them in place."""
    content_judge(reasoner)
    with torch.inference_mode():
        first = reasoner.generate(PROMPTS[0], mode="speculative", alpha=MIXED)
    again = reasoner.generate(PROMPTS[0], mode="speculative", alpha=MIXED)
    same_result(again, first)
    with torch.inference_mode():
        same_result(reasoner.generate(PROMPTS[0], mode="speculative", alpha=MIXED), first)


def test_auto_leaves_eager_the_attention_ragged_masks_do_not_reproduce(tok_a):
    from conftest import tiny_llama
    from dreamr.lm import ragged_masks_fit

    model = tiny_llama(tok_a)
    assert ragged_masks_fit(model)
    model.config._attn_implementation = "flash_attention_2"
    assert not ragged_masks_fit(model)  # flash kernels take no prepared 4-D mask
    model = tiny_llama(tok_a)
    model.config.attention_chunk_size = 8
    assert not ragged_masks_fit(model)  # chunked attention (Llama 4)


def test_the_docstring_example_runs():
    import doctest

    from dreamr.engines import ragged_sequence

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(ragged_sequence.RaggedSequence, "RaggedSequence", globs=vars(ragged_sequence).copy()):
        runner.run(test)
    summary = runner.summarize(verbose=False)
    assert summary.attempted > 0 and summary.failed == 0
