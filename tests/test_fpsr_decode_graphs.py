"""The FPSR executor's CUDA paths: bucketed decode graphs (dreamr.engines.decode_graphs) and the draft stream.

On a CPU the bucketed static-buffer decode forward runs eagerly (``cuda_graphs="on"``): padded rows,
column buckets, storage growth and fallbacks must leave the commits those of mode "speculative", and the
storage reserved at a run's start must last the run. On a GPU the same checks run with captured graphs and
the draft on its own stream (float64 tiny models, so batched and padded arithmetic stays exact; the
caches are held to a fresh prefill after every commit), then in bfloat16: graphs and stream commit what
the eager bucketed path commits, a replayed graph writes the cache the eager forward writes, and the host
copies of both paths do not synchronise (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS
from test_reasoner_fpsr import _check_caches, assert_same

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def graphed(request):
    """A reasoner whose fpsr engine decodes through the bucketed path (restored afterwards)."""
    reasoner = request.getfixturevalue(request.param)
    engine = reasoner.engine("fpsr")
    engine.cuda_graphs = "on"
    yield reasoner
    engine.cuda_graphs = "auto"
    engine.graph_batch_sizes = (1, 2, 4, 8, 16, 32, 64)
    engine.free()


@pytest.mark.parametrize("graphed", ["reasoner", "gemma_reasoner"], indirect=True)
@pytest.mark.parametrize("alpha,window", [(0.0, 2), (0.5, 4), (1.0, 3)])
def test_bucketed_decode_commits_what_speculative_commits(graphed, content_judge, alpha, window):
    content_judge(graphed)
    engine = graphed.engine("fpsr")
    engine.target_launch = "eager"  # many live branches: padded row buckets
    try:
        for prompt in PROMPTS[:2]:
            assert_same(graphed.generate(prompt, alpha=alpha, mode="fpsr", window=window),
                        graphed.generate(prompt, alpha=alpha))
    finally:
        engine.target_launch = "auto"
    stats = engine.last_stats
    assert stats["drafts_bucketed_forwards"] > 0
    if alpha < 1.0:
        assert stats["branches_bucketed_forwards"] > 0
    assert stats["drafts_graph_replays"] == 0 and not stats["draft_stream"]  # nothing to capture on a CPU


@pytest.mark.parametrize("graphed", ["reasoner", "gemma_reasoner"], indirect=True)
def test_proposal_passes_run_eagerly_beside_the_bucketed_decode(graphed, content_judge, monkeypatch):
    """Token-level speculation: a pass that checks a proposal feeds several tokens per row, so it runs
    eagerly (the buckets hold one token per row), the one-token passes stay bucketed, and the commits stay
    mode "speculative"'s; with "off" nothing is proposed."""
    from dreamr.engines import ragged
    from dreamr.engines.decode_graphs import DecodeGraphs

    content_judge(graphed)
    replays, passes = [0], []
    real_run, real_forward = DecodeGraphs.run, ragged.RaggedBatch.forward

    def run(self, *args):
        replays[0] += 1
        return real_run(self, *args)

    def forward(self, feeds):
        before = replays[0]
        proposal = any(len(seg) > 2 and seg[2] for segs in feeds.values() for seg in segs)
        out = real_forward(self, feeds)
        passes.append((self.name, proposal, replays[0] - before))
        return out

    monkeypatch.setattr(DecodeGraphs, "run", run)
    monkeypatch.setattr(ragged.RaggedBatch, "forward", forward)
    engine = graphed.engine("fpsr")
    engine.target_launch = "eager"
    try:
        for setting in ("step+ngram", "off"):
            passes.clear()
            for prompt in PROMPTS[:2]:
                kw = dict(alpha=0.5, token_speculation=setting, draft_token_speculation=setting.replace("step+", ""),
                          max_new_tokens=40, max_step_tokens=10)
                assert_same(graphed.generate(prompt, mode="fpsr", **kw), graphed.generate(prompt, **kw))
                stats = engine.last_stats
                assert stats["branches_bucketed_forwards"] > 0 and stats["drafts_bucketed_forwards"] > 0
            checked = {name for name, proposal, _ in passes if proposal}
            assert all(n == 0 for _, proposal, n in passes if proposal)  # never through the buckets
            assert checked == ({"branches", "drafts"} if setting != "off" else set())
    finally:
        engine.target_launch = "auto"


@pytest.mark.parametrize("graphed", ["reasoner"], indirect=True)
def test_batches_past_the_largest_bucket_fall_back_to_eager(graphed, content_judge):
    content_judge(graphed)
    engine = graphed.engine("fpsr")
    engine.graph_batch_sizes = (1, 2)
    batch = graphed.generate_batch(PROMPTS, mode="fpsr", alpha=0.5, window=3)
    stats = engine.last_stats
    assert stats["branches_eager_fallbacks"] > 0 and stats["branches_bucketed_forwards"] > 0
    for got, prompt in zip(batch, PROMPTS):
        assert_same(got, graphed.generate(prompt, alpha=0.5))


@pytest.mark.parametrize("graphed", ["reasoner"], indirect=True)
def test_kept_storage_serves_the_next_run(graphed, content_judge):
    """The engine keeps its batches between runs: a second run reuses the storage, commits the same."""
    content_judge(graphed)
    engine = graphed.engine("fpsr")
    first = graphed.generate(PROMPTS[0], alpha=0.5, mode="fpsr")
    storage = engine._batches["drafts"].keys[0].data_ptr()
    second = graphed.generate(PROMPTS[0], alpha=0.5, mode="fpsr")
    assert engine._batches["drafts"].keys[0].data_ptr() == storage
    assert_same(second, graphed.generate(PROMPTS[0], alpha=0.5))
    assert first.text == second.text


def test_ragged_storage_grows_and_compacts_in_place(reasoner):
    """Rows and columns past the capacity grow the storage (contents kept); compaction writes back into
    the same storage; dense() gives each row's own keys."""
    from dreamr.engines.ragged import RaggedBatch

    batch = RaggedBatch(reasoner.engine("fpsr").target, "t")
    rows = [batch.add(list(range(3, 3 + n)), owner=i) for i, n in enumerate((5, 70, 2, 9, 4))]
    batch.forward({r: [] for r in rows})
    assert batch.capacity[0] >= 5 and batch.capacity[1] >= 70
    before = {id(r): batch.dense(r, r.cached) for r in rows}
    version = batch.storage_version
    batch.release(rows[1])
    batch.truncate(rows[3], 6)
    batch.compact()
    assert batch.storage_version == version and batch.width == 6
    for r in (rows[0], rows[2], rows[3], rows[4]):
        for (k, v), (k0, v0) in zip(batch.dense(r, r.cached), before[id(r)]):
            assert torch.equal(k, k0[:, :, :r.cached]) and torch.equal(v, v0[:, :, :r.cached])


def test_a_long_row_moves_into_a_narrow_batch(reasoner):
    """Moving a row longer than the destination's width and capacity widens and grows it, keeping what
    the destination held; rows move only between batches of one store."""
    from dreamr.engines.ragged import KVStore, RaggedBatch

    lm = reasoner.engine("fpsr").target
    store = KVStore(lm)
    src, dst = RaggedBatch(lm, "src", store=store), RaggedBatch(lm, "dst", store=store)
    long_row = src.add([3 + i % 50 for i in range(150)])
    short = dst.add([4, 5, 6, 7])
    src.forward({long_row: []})
    dst.forward({short: []})
    kept = dst.dense(short, 4)
    moved = src.move(long_row, dst)
    assert dst.width == 150 and dst.capacity[1] >= 150 and not long_row.alive
    for (k, v), (k0, v0) in zip(dst.dense(short, 4), kept):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    with pytest.raises(ValueError, match="another KVStore"):
        RaggedBatch(lm, "elsewhere").add(moved.ids, src=moved, cached=4)
    want = RaggedBatch(lm, "fresh")
    row = want.add(moved.ids)
    want.forward({row: []})
    for (k, v), (k0, v0) in zip(dst.dense(moved, 150), want.dense(row, 150)):
        torch.testing.assert_close(k, k0, atol=1e-12, rtol=0)
        torch.testing.assert_close(v, v0, atol=1e-12, rtol=0)


def test_rows_never_roll_back_into_an_image_prefix(reasoner):
    """A row started from an image prefix keeps it: truncating or forking into it raises; its ids must
    start with the prefix's."""
    from dreamr.cache import CachedSequence
    from dreamr.engines.ragged import RaggedBatch
    from dreamr.cache import ImagePrefix

    lm = reasoner.engine("fpsr").target
    ids = [3, 4, 5, 6, 7, 8]
    seq = CachedSequence(lm.model, ids[:-1])
    seq.next_logits()  # caches ids[:5]: the "image prompt" minus its last token
    prefix = ImagePrefix(ids=ids, cache=seq.cache, position_offset=0, encode_time_s=0.0)
    batch = RaggedBatch(lm, "t")
    row = batch.add(ids + [9, 10], prefix=prefix)
    assert row.cached == 5 and row.floor == 5
    batch.forward({row: []})
    batch.truncate(row, 6)
    with pytest.raises(ValueError, match="image prefix"):
        batch.truncate(row, 4)
    with pytest.raises(ValueError, match="image prefix"):
        RaggedBatch(lm, "u").fork(row, 3)
    with pytest.raises(ValueError, match="image prefix"):
        batch.add([1] + ids, prefix=prefix)


@pytest.mark.parametrize("graphed", ["reasoner", "gemma_reasoner"], indirect=True)
def test_bucketed_forward_has_no_host_sync(graphed):
    """The forward a CUDA graph captures traces as one graph without breaks (torch._dynamo): nothing in it
    reads the device on the host (.item(), nonzero, data-dependent shapes), which capture forbids."""
    import torch._dynamo as dynamo

    from dreamr.engines.decode_graphs import DecodeGraphs
    from dreamr.engines.ragged import RaggedBatch

    batch = RaggedBatch(graphed.engine("fpsr").target, "t")
    rows = [batch.add([3, 4, 5 + i, 6]) for i in range(3)]
    batch.forward({r: [] for r in rows})
    batch.graphs = DecodeGraphs(batch, capture=False)
    for r in rows:
        r.ids.append(7)
    batch.forward({r: [] for r in rows})
    (bucket,) = batch.graphs._buckets.values()
    dynamo.reset()
    try:
        with torch.no_grad():
            explained = dynamo.explain(bucket.forward)()
    finally:
        dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_bucket_shapes():
    from dreamr.engines.decode_graphs import DecodeGraphs

    class FakeBatch:
        device, name, storage_version = torch.device("cpu"), "x", 0

    g = DecodeGraphs(FakeBatch(), (1, 2, 4, 8), capture=False)
    assert g.bucket(1, 0) == (1, 64) and g.bucket(3, 63) == (4, 64) and g.bucket(3, 64) == (4, 128)
    assert g.bucket(8, 200) == (8, 256) and g.bucket(9, 5) is None
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(FakeBatch(), capture=True)


# -- on a GPU: captured graphs and the draft stream ---------------------------------------------------


@pytest.fixture(scope="module")
def cuda_pairs():
    """Llama and Gemma 3 targets (sdpa), and a Llama target with eager attention (additive masks), each
    beside a Qwen2 draft, on the GPU in float64 (padded and batched arithmetic stays exact)."""
    from conftest import build_tokenizer, tiny_gemma3, tiny_llama, tiny_qwen2
    from dreamr.reasoner import SpeculativeReasoner

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tok_a, tok_b = build_tokenizer(400), build_tokenizer(330, reverse=True, bos=False)
    draft = tiny_qwen2(tok_b).to("cuda")
    eager = tiny_llama(tok_a, seed=3)
    eager.set_attn_implementation("eager")
    return [SpeculativeReasoner(target.to("cuda"), draft, target_tokenizer=tok_a, draft_tokenizer=tok_b,
                                max_step_tokens=6, max_new_tokens=30)
            for target in (tiny_llama(tok_a), tiny_gemma3(tok_a), eager)]


@cuda
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("ticks", [1, 2])
def test_cuda_graphs_and_draft_stream_commit_what_speculative_commits(cuda_pairs, content_judge, which, ticks):
    reasoner = cuda_pairs[which]
    content_judge(reasoner)
    engine = reasoner.engine("fpsr")
    assert engine.cuda_graphs == "auto" and engine.draft_stream == "auto"
    engine.draft_tokens_per_tick = ticks
    try:
        batch = reasoner.generate_batch(PROMPTS, mode="fpsr", alpha=0.5, window=4)
        stats = engine.last_stats
        assert stats["draft_stream"]
        assert stats["drafts_graph_captures"] > 0 and stats["drafts_graph_replays"] > 0
        assert stats["branches_graph_replays"] > 0
        for got, prompt in zip(batch, PROMPTS):
            assert_same(got, reasoner.generate(prompt, alpha=0.5))
        again = reasoner.generate_batch(PROMPTS, mode="fpsr", alpha=0.5, window=4)  # graphs kept: replayed
        assert [r.text for r in again] == [r.text for r in batch]
        assert engine.last_stats["drafts_graph_replays"] > 0
        # what the replayed graphs wrote: the chain and draft caches equal a fresh prefill after every commit
        checked = []
        assert_same(_check_caches(reasoner, checked, PROMPTS[1], alpha=0.5, window=4),
                    reasoner.generate(PROMPTS[1], alpha=0.5))
        assert checked and engine.last_stats["drafts_graph_replays"] > 0
    finally:
        engine.draft_tokens_per_tick = 1


@cuda
def test_cuda_long_runs_regrow_storage_and_recapture(cuda_pairs, content_judge):
    """Widths past the first column buckets: a graph is captured for each new bucket (the storage reserved
    at the run's start holds them all), the commits stay those of mode "speculative"."""
    reasoner = cuda_pairs[0]
    content_judge(reasoner)
    kw = dict(alpha=0.5, max_new_tokens=160, max_step_tokens=8)
    got = reasoner.generate_batch(PROMPTS[:2], mode="fpsr", window=3, **kw)
    assert reasoner.engine("fpsr").last_stats["drafts_graph_captures"] >= 2
    for r, prompt in zip(got, PROMPTS):
        assert_same(r, reasoner.generate(prompt, **kw))


@cuda
def test_cuda_sampling_with_graphs_is_seeded(cuda_pairs, content_judge):
    reasoner = cuda_pairs[0]
    content_judge(reasoner)
    kw = dict(alpha=0.5, mode="fpsr", temperature=0.8, seed=11)
    first = [r.text for r in reasoner.generate_batch(PROMPTS, **kw)]
    assert [r.text for r in reasoner.generate_batch(PROMPTS, **kw)] == first
    assert reasoner.engine("fpsr").last_stats["drafts_graph_replays"] > 0


@cuda
def test_cuda_overlap_thread_excludes_explicit_stream_and_graphs(cuda_pairs, monkeypatch):
    engine = cuda_pairs[0].engine("fpsr")
    monkeypatch.setattr(engine, "overlap", True)
    monkeypatch.setattr(engine, "cuda_graphs", "on")
    with pytest.raises(ValueError, match="overlap"):
        cuda_pairs[0].generate(PROMPTS[0], mode="fpsr")
    monkeypatch.setattr(engine, "cuda_graphs", "auto")
    cuda_pairs[0].generate(PROMPTS[0], mode="fpsr")  # auto: the worker thread alone, no stream, no graphs
    stats = engine.last_stats
    assert not stats["draft_stream"] and "drafts_graph_replays" not in stats
    engine.free()


@pytest.mark.parametrize("graphed", ["reasoner"], indirect=True)
def test_storage_is_reserved_up_front(graphed, content_judge, monkeypatch):
    """A long run (widths through several column buckets) never reallocates the storage after its start:
    the reservation covers it, so captured graphs are not dropped and captured again."""
    from dreamr.engines import ragged

    content_judge(graphed)
    versions = []
    orig = ragged.RaggedBatch.forward

    def forward(self, feeds):
        versions.append((self.name, self.storage_version, self.width))
        return orig(self, feeds)

    monkeypatch.setattr(ragged.RaggedBatch, "forward", forward)
    graphed.engine("fpsr").free()
    graphed.generate_batch(PROMPTS[:2], mode="fpsr", alpha=0.5, window=3, max_new_tokens=160, max_step_tokens=8)
    for name in ("chains", "branches", "drafts"):
        seen = [(v, w) for n, v, w in versions if n == name]
        assert len({v for v, _ in seen}) == 1, name
        assert max(w for _, w in seen) > 128  # the run did pass the narrower column buckets


# -- on a GPU in bfloat16, the dtype of real runs -----------------------------------------------------


@pytest.fixture(scope="module")
def cuda_bf16_pair():
    """A Llama target beside a Qwen2 draft on the GPU in bfloat16."""
    from conftest import build_tokenizer, tiny_llama, tiny_qwen2
    from dreamr.reasoner import SpeculativeReasoner

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tok_a, tok_b = build_tokenizer(400), build_tokenizer(330, reverse=True, bos=False)
    return SpeculativeReasoner(tiny_llama(tok_a, dtype=torch.bfloat16).to("cuda"),
                               tiny_qwen2(tok_b, dtype=torch.bfloat16).to("cuda"), target_tokenizer=tok_a,
                               draft_tokenizer=tok_b, max_step_tokens=6, max_new_tokens=30)


@cuda
def test_cuda_bf16_graphs_and_stream_commit_what_the_eager_path_commits(cuda_bf16_pair, content_judge, monkeypatch):
    """In bfloat16 batched arithmetic is not exact, so FPSR need not equal mode "speculative"; the graphs
    and the draft stream must still not change anything: replayed graphs on two streams commit exactly
    what the same bucketed forwards run eagerly on one stream commit."""
    from dreamr.engines import fpsr as fpsr_mod
    from dreamr.engines.decode_graphs import DecodeGraphs

    reasoner = cuda_bf16_pair
    content_judge(reasoner)
    engine = reasoner.engine("fpsr")
    kw = dict(mode="fpsr", alpha=0.5, window=4)
    try:
        graphed = reasoner.generate_batch(PROMPTS, **kw)
        stats = engine.last_stats
        assert stats["draft_stream"] and stats["drafts_graph_replays"] > 0 and stats["branches_graph_replays"] > 0
        engine.free()
        monkeypatch.setattr(fpsr_mod, "DecodeGraphs", lambda batch, sizes: DecodeGraphs(batch, sizes, capture=False))
        engine.cuda_graphs, engine.draft_stream = "on", "off"
        eager = reasoner.generate_batch(PROMPTS, **kw)
        assert engine.last_stats["drafts_graph_replays"] == 0 and engine.last_stats["drafts_bucketed_forwards"] > 0
    finally:
        engine.cuda_graphs, engine.draft_stream = "auto", "auto"
        engine.free()
    assert [r.text for r in graphed] == [r.text for r in eager]
    assert [[s.cpn for s in r.steps] for r in graphed] == [[s.cpn for s in r.steps] for r in eager]
    assert any(r.metrics.committed_tokens for r in graphed)


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cuda_graph_replay_writes_the_cache(dtype):
    """Decode forwards replayed from a captured graph write each row's keys and values into the storage:
    after several replays the cache equals the one the same forwards write eagerly (bit for bit), and in
    float64 a fresh prefill of each row's ids."""
    from conftest import build_tokenizer, tiny_llama
    from dreamr.engines.decode_graphs import DecodeGraphs
    from dreamr.engines.ragged import RaggedBatch
    from dreamr.lm import LM

    tok = build_tokenizer(400)
    target = LM(tiny_llama(tok, dtype=dtype).to("cuda"), tok, "target")

    def decode(capture: bool):
        batch = RaggedBatch(target, "t")
        rows = [batch.add([3, 4, 5 + i, 6, 7 + i][: 3 + i]) for i in range(3)]
        batch.forward({r: [] for r in rows})  # prefill (eager)
        batch.graphs = DecodeGraphs(batch, (1, 2, 4), capture=capture)
        for step in range(5):  # one capture, then replays of the same bucket
            for i, r in enumerate(rows):
                r.ids.append(10 + 7 * step + i)
            batch.forward({r: [] for r in rows})
        return batch, rows

    graphed, rows = decode(True)
    assert graphed.graphs.stats["graph_captures"] == 1 and graphed.graphs.stats["graph_replays"] == 5
    eager, eager_rows = decode(False)
    for r, e in zip(rows, eager_rows):
        assert r.cached == e.cached == len(r.ids)
        for (k, v), (k0, v0) in zip(graphed.dense(r, r.cached), eager.dense(e, e.cached)):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        if dtype == torch.float64:
            fresh = RaggedBatch(target, "fresh")
            f = fresh.add(r.ids)
            fresh.forward({f: []})
            for (k, v), (k0, v0) in zip(graphed.dense(r, r.cached), fresh.dense(f, r.cached)):
                torch.testing.assert_close(k, k0, atol=1e-9, rtol=0)
                torch.testing.assert_close(v, v0, atol=1e-9, rtol=0)


@cuda
def test_cuda_fpsr_host_to_device_copies_do_not_synchronise(cuda_pairs, content_judge):
    """The ragged and graph paths copy their inputs from pinned memory: under
    ``torch.cuda.set_sync_debug_mode`` no synchronisation comes from them, and a run synchronises at
    most once per forward (the device reads it needs: sampled tokens, the verdicts of a pass)."""
    import warnings

    reasoner = cuda_pairs[0]
    content_judge(reasoner)
    engine = reasoner.engine("fpsr")
    kw = dict(mode="fpsr", alpha=0.5, window=4)
    reasoner.generate_batch(PROMPTS, **kw)  # storage reserved and graphs captured outside the count
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            reasoner.generate_batch(PROMPTS, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    staged = [f"{w.filename}:{w.lineno}" for w in syncs if w.filename.endswith(("ragged.py", "decode_graphs.py"))]
    assert staged == []
    stats = engine.last_stats
    assert stats["drafts_graph_replays"] > 0
    assert len(syncs) <= stats["chain_forwards"] + stats["branch_forwards"] + stats["draft_forwards"], \
        sorted({f"{w.filename}:{w.lineno}" for w in syncs})
