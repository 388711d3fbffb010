"""Token-level speculation inside mode "fpsr"'s batched steps (dreamr.engines.fpsr, dreamr.engines.ragged).

- greedy FPSR still commits exactly what mode "speculative" commits, with ``token_speculation`` and
  ``draft_token_speculation`` on and off, both launch policies and several windows, on three model pairs,
  and proposals are checked where they are asked for (the fallback branches, the draft's steps);
- alpha = 1 gives the target-only text, alpha = 0 the draft-only text;
- a fallback branch proposes its slot's drafted step (finished, or as far as the draft has written it);
- the token-level metrics count what the executor fed and kept;
- a ragged forward's logits at every position of a proposal equal one-token-at-a-time decoding, and
  cutting several rows at once leaves each a fresh prefill of what it keeps;
- the packed decisions of one pass give each row its own tokens (greedy) and distribution (sampling).
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from conftest import PROMPTS
from test_reasoner_fpsr import assert_same, pair  # noqa: F401 - pair: the three model pairs (a fixture)

# (token_speculation, draft_token_speculation): the fallback branches' sources, the draft steps'
SETTINGS = (("step+ngram", "off"), ("step+ngram", "ngram"), ("off", "off"), ("off", "ngram"), ("ngram", "off"),
            ("step", "ngram"))
SHORT = dict(max_new_tokens=40, max_step_tokens=10)  # a few steps long enough for proposals to pay


@pytest.fixture
def launch(request, reasoner, same_tok_reasoner, gemma_reasoner):
    """Set every pair's FPSR launch policy for one test (restored afterwards)."""
    engines = [r.engine("fpsr") for r in (reasoner, same_tok_reasoner, gemma_reasoner)]
    for e in engines:
        e.target_launch = request.param
    yield request.param
    for e in engines:
        e.target_launch = "auto"


def _counts(results):
    keys = ("target_proposals", "draft_proposals", "target_step_forwards", "target_tokens")
    return {k: sum(getattr(r.metrics, k) for r in results) for k in keys}


@pytest.mark.parametrize("launch", ["eager", "on_reject"], indirect=True)
@pytest.mark.parametrize("setting,draft_setting", SETTINGS)
def test_fpsr_commits_what_speculative_commits_with_token_speculation(pair, content_judge, launch, setting,
                                                                      draft_setting):
    content_judge(pair)
    kw = dict(alpha=0.5, token_speculation=setting, draft_token_speculation=draft_setting, **SHORT)
    results, sources = [], set()
    for prompt in PROMPTS:
        spec = pair.generate(prompt, **kw)
        sources |= {s.source for s in spec.steps}
        for window in (1, 3):
            fpsr = pair.generate(prompt, mode="fpsr", window=window, **kw)
            assert_same(fpsr, spec)
            results.append(fpsr)
    assert sources == {"draft", "target"}, "alpha 0.5 should mix accepted and rejected steps"
    c = _counts(results)
    if setting == "off":  # plain decoding: one forward per token, nothing proposed
        assert c["target_proposals"] == 0
        assert c["target_step_forwards"] == c["target_tokens"]
    elif setting != "step" or launch == "on_reject":
        # (eager, "step" alone: a branch decodes beside its drafted step, at the draft's pace, so the drafted
        # step is seldom ahead of it with anything to propose; the on-reject branches start after it)
        assert c["target_proposals"] > 0  # the fallback branches checked proposals
        if "ngram" in setting:  # (random tiny drafts and targets disagree: "step" alone is seldom right)
            assert c["target_step_forwards"] < c["target_tokens"]  # and some were accepted
    # the draft's steps speculate where draft_token_speculation asks (as in mode "speculative")
    assert (c["draft_proposals"] > 0) == (draft_setting == "ngram")


@pytest.mark.parametrize("launch", ["eager", "on_reject"], indirect=True)
def test_alpha_ends_are_the_single_model_texts(pair, launch):
    for prompt in PROMPTS[:3]:
        assert pair.generate(prompt, alpha=1.0, mode="fpsr", **SHORT).text == \
            pair.generate(prompt, mode="target", **SHORT).text
        assert pair.generate(prompt, alpha=0.0, mode="fpsr", **SHORT).text == \
            pair.generate(prompt, mode="draft", **SHORT).text


@pytest.mark.parametrize("launch", ["eager", "on_reject"], indirect=True)
def test_branches_propose_their_slots_drafted_step(same_tok_reasoner, launch, monkeypatch):
    """Same tokenizer: a fallback branch's "step" source is its slot's drafted step, in its own ids. On-reject
    the whole drafted step is there when the branch starts, and its first proposal is the step's start;
    eager, the branch also proposes from the drafted step as far as the draft has written it."""
    from dreamr.engines import fpsr as fpsr_mod
    from dreamr.speculation import RejectedStepProposer

    records = []
    real = fpsr_mod._Run._branch_proposer

    def spy(self, req, e):
        proposer = real(self, req, e)
        ref = proposer.proposers[0] if proposer is not None and proposer is not req.ngram else None
        records.append((e, e.t_proposer[0] if ref is not None else None, ref, len(e.t_writer.ids)))
        return proposer

    monkeypatch.setattr(fpsr_mod._Run, "_branch_proposer", spy)
    r = same_tok_reasoner.generate(PROMPTS[0], alpha=1.0, mode="fpsr", **SHORT)
    assert r.steps and all(s.accepted is False for s in r.steps)
    step_refs = [(e, key, ref, n) for e, key, ref, n in records if ref is not None]
    assert step_refs and all(isinstance(ref, RejectedStepProposer) for _, _, ref, _ in step_refs)
    for e, key, ref, _ in step_refs:
        final = e.d_writer.content_ids  # the drafted step as the draft finished it (or stopped: cancelled)
        if key < 0:
            assert ref.ref.tolist() == e.t_step_ids
        else:  # the draft's step so far when the branch fed its proposal
            assert ref.ref.tolist() == final[:len(ref.ref)] and len(ref.ref) <= key
    if launch == "on_reject":
        assert all(key < 0 for _, key, _, _ in step_refs)
        assert any(n == 0 for _, _, _, n in step_refs)  # a branch's first proposal: its drafted step's start
    else:
        assert any(key >= 0 for _, key, _, _ in step_refs)


def test_metrics_count_what_the_executor_fed_and_kept(reasoner, content_judge, monkeypatch):
    """Per model: one step forward per row fed, a proposal per non-empty guess with its tokens, the
    accepted ones, and every token a writer took (EOS included) in ``<model>_tokens`` (vLLM's counts)."""
    from dreamr.engines import fpsr as fpsr_mod

    content_judge(reasoner)
    seen = []
    real = fpsr_mod.take

    def spy(row, writer, proposal, tokens):
        taken, cut = real(row, writer, proposal, tokens)
        seen.append((row.batch.name, list(proposal), len(tokens) - 1, taken))
        return taken, cut

    monkeypatch.setattr(fpsr_mod, "take", spy)
    for launch in ("eager", "on_reject"):
        reasoner.engine("fpsr").target_launch = launch
        try:
            seen.clear()
            m = reasoner.generate(PROMPTS[1], alpha=0.5, mode="fpsr", draft_token_speculation="ngram", **SHORT).metrics
        finally:
            reasoner.engine("fpsr").target_launch = "auto"
        for role, batch in (("target", "branches"), ("draft", "drafts")):
            rows = [s for s in seen if s[0] == batch]
            checked = [s for s in rows if s[1]]
            assert getattr(m, f"{role}_step_forwards") == len(rows) > 0
            assert getattr(m, f"{role}_proposals") == len(checked) > 0
            assert getattr(m, f"{role}_proposed_tokens") == sum(len(s[1]) for s in checked)
            assert getattr(m, f"{role}_accepted_tokens") == sum(s[2] for s in checked)
            assert getattr(m, f"{role}_tokens") == sum(s[3] for s in rows)
            assert all(0 <= s[2] <= len(s[1]) for s in checked)
        assert m.mean_accepted_length == 1.0 + m.target_accepted_tokens / m.target_proposals
        assert m.tokens_per_target_forward == m.target_tokens / m.target_step_forwards


def test_sampled_fpsr_with_token_speculation_is_seeded(reasoner, content_judge):
    content_judge(reasoner)
    kw = dict(alpha=0.5, mode="fpsr", temperature=1.0, seed=7, max_new_tokens=30, draft_token_speculation="ngram")
    a, b = reasoner.generate(PROMPTS[0], **kw), reasoner.generate(PROMPTS[0], **kw)
    assert a.text == b.text and a.metrics.target_proposals + a.metrics.draft_proposals > 0


# --------------------------------------------------------------------------------------------------
# The ragged batch: logits over proposals, several rows cut at once
# --------------------------------------------------------------------------------------------------


def _fresh_logits(lm, ids):
    from dreamr.engines.ragged import RaggedBatch

    b = RaggedBatch(lm, "fresh")
    r = b.add(ids)
    return b.next_token_logits([r])[0]


def test_logits_over_proposals_equal_one_token_at_a_time(reasoner):
    from dreamr.engines.ragged import RaggedBatch

    lm = reasoner.engine("fpsr").target
    batch = RaggedBatch(lm, "branches")
    a, b, c = batch.add([3 + i for i in range(9)]), batch.add([20 + i for i in range(5)]), batch.add([50, 51, 52])
    batch.forward({a: [], b: [], c: []})  # all cached: next_token_logits re-feeds each row's last token
    proposals = [[7, 8, 9], [], [11]]
    before = [list(r.ids) for r in (a, b, c)]
    logits = batch.next_token_logits([a, b, c], proposals)
    assert logits.shape[0] == 4 + 1 + 2
    want = [_fresh_logits(lm, before[0] + proposals[0][:i]) for i in range(4)] + [_fresh_logits(lm, before[1])] \
        + [_fresh_logits(lm, before[2] + proposals[2][:i]) for i in range(2)]
    torch.testing.assert_close(logits, torch.stack(want), atol=1e-9, rtol=0)
    assert a.ids == before[0] + proposals[0] and a.cached == len(a.ids)  # the proposal joined ids and cache
    assert b.ids == before[1]
    with pytest.raises(ValueError, match="proposals"):
        batch.next_token_logits([a, b], [[1]])


def test_every_position_segment_needs_a_token_before_it(reasoner):
    from dreamr.engines.ragged import RaggedBatch

    lm = reasoner.engine("fpsr").target
    batch = RaggedBatch(lm, "branches")
    row = batch.add([3, 4, 5])
    batch.forward({row: []})
    with pytest.raises(ValueError, match="every=True"):
        batch.forward({row: [([6, 7], True, True)]})
    out = batch.forward({row: [([6], True), ([8, 9], False, True)]})  # after a persistent token: fine
    assert out[row][1][1].shape == (3, lm.model.config.hidden_size)


def test_truncate_rows_cuts_several_rows_in_one_rollback(reasoner, monkeypatch):
    """Cutting two rows at once: one kv_rollback call; each row's cache is a fresh prefill of what it
    keeps and its dropped columns are erased; a no-op kv_rollback leaves them in the storage."""
    from dreamr import ops
    from dreamr.engines.ragged import RaggedBatch

    from dreamr.testing import fresh_ragged_cache

    lm = reasoner.engine("fpsr").target

    def fresh(ids, n):
        return fresh_ragged_cache(lm, ids, n)

    def run():
        batch = RaggedBatch(lm, "branches")
        a, b = batch.add([3 + i for i in range(9)]), batch.add([20 + i for i in range(5)])
        batch.next_token_logits([a, b], [[7, 8, 9], [30, 31]])
        cols = [int(torch.nonzero(batch.pos[a.index] == 10)[0]), int(torch.nonzero(batch.pos[b.index] == 5)[0])]
        batch.truncate_rows([(a, 10), (b, 5)])
        assert a.ids == [3 + i for i in range(9)] + [7] and b.ids == [20 + i for i in range(5)]
        for row, n in ((a, 10), (b, 5)):
            for (k, v), (k0, v0) in zip(batch.dense(row, n), fresh(row.ids, n)):
                torch.testing.assert_close(k, k0, atol=1e-12, rtol=0)
                torch.testing.assert_close(v, v0, atol=1e-12, rtol=0)
        for t in batch.keys + batch.values:
            assert not t[a.index, :, cols[0]:batch.width].any() and not t[b.index, :, cols[1]:batch.width].any()

    calls = []
    real = ops.kv_rollback
    monkeypatch.setattr(ops, "kv_rollback", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    run()
    assert len(calls) == 1  # one call for both rows (every layer in one group)
    monkeypatch.setattr(ops, "kv_rollback", lambda *a, **k: None)
    with pytest.raises(AssertionError):
        run()


# --------------------------------------------------------------------------------------------------
# The decisions of one packed pass
# --------------------------------------------------------------------------------------------------


def test_packed_greedy_decisions_take_each_rows_own_logits():
    from dreamr.engines.ragged_speculation import decide as _decide
    from dreamr.sampling import Sampler

    V = 6
    rows = [[2, 4, 1], [3], [5, 0]]  # argmax per packed row
    logits = torch.full((len(sum(rows, [])), V), -1.0, dtype=torch.float64)
    for i, t in enumerate(sum(rows, [])):
        logits[i, t] = 1.0
    proposals = [[2, 5], [], [5]]  # row 0: keeps 2, rejects 5 (the target says 4); row 2: keeps 5, bonus 0
    got = _decide([Sampler()] * 3, proposals, logits)
    assert got == [([2, 4], 1), ([3], 0), ([5, 0], 1)]
    assert _decide([Sampler()] * 2, [[], []], logits[:2]) == [([2], 0), ([4], 0)]


def test_packed_sampled_decisions_keep_each_rows_distribution():
    """Sampling: row 0 checks a point-mass proposal, row 1 (packed after it) draws plainly; the first
    token of each follows its own row's distribution (chi-square over seeded draws)."""
    from dreamr.engines.ragged_speculation import decide as _decide
    from dreamr.sampling import Sampler

    p0 = torch.tensor([0.5, 0.3, 0.2, 0.0])
    p1 = torch.tensor([0.1, 0.1, 0.2, 0.6])
    bonus = torch.tensor([0.25, 0.25, 0.25, 0.25])
    logits = torch.log(torch.stack([p0, bonus, p1]).clamp_min(1e-12))
    first0, first1 = [], []
    for seed in range(1500):
        samplers = [Sampler(temperature=1.0, seed=seed), Sampler(temperature=1.0, seed=10_000 + seed)]
        (t0, _), (t1, _) = _decide(samplers, [[0], []], logits)
        first0.append(t0[0])
        first1.append(t1[0])

    def pvalue(samples, p):
        keep = [i for i in range(len(p)) if p[i] > 0]
        counts = [sum(1 for s in samples if s == i) for i in keep]
        mass = sum(float(p[i]) for i in keep)
        return stats.chisquare(counts, [float(p[i]) / mass * sum(counts) for i in keep]).pvalue

    assert pvalue(first0, p0) > 1e-3 and pvalue(first1, p1) > 1e-3
    assert pvalue(first0, p1) < 1e-6  # the test can fail: row 0's draws read as row 1's are caught
