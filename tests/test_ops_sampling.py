"""Token-level speculative sampling and greedy verification."""

import pytest
import torch
from scipy import stats

from dreamr import ops, reference


def random_probs(shape, generator, dtype=torch.float32, peaked=False):
    logits = torch.randn(*shape, generator=generator) * (4.0 if peaked else 1.0)
    return torch.softmax(logits, dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,k,vocab", [(1, 1, 2), (4, 3, 50), (16, 5, 32000)])
def test_speculative_sample_matches_reference(dtype, batch, k, vocab):
    g = torch.Generator().manual_seed(batch * 100 + k)
    q = random_probs((batch, k, vocab), g, dtype)
    p = random_probs((batch, k + 1, vocab), g, dtype)
    draft_ids = torch.multinomial(q.float().reshape(-1, vocab), 1, generator=g).reshape(batch, k)
    uniforms = torch.rand(batch, k + 1, generator=g)
    tokens, accepted = ops.speculative_sample(q, draft_ids, p, uniforms=uniforms)
    ref_tokens, ref_accepted = reference.speculative_sample(q, draft_ids, p, uniforms)
    assert torch.equal(tokens, ref_tokens) and torch.equal(accepted, ref_accepted)
    # Emitted prefix is the accepted drafts, then exactly one extra token, then padding.
    for b in range(batch):
        n = int(accepted[b])
        assert torch.equal(tokens[b, :n], draft_ids[b, :n])
        assert 0 <= int(tokens[b, n]) < vocab and (tokens[b, n + 1 :] == -1).all()


def test_identical_distributions_accept_everything():
    g = torch.Generator().manual_seed(0)
    q = random_probs((8, 4, 30), g)
    draft_ids = torch.multinomial(q.reshape(-1, 30), 1, generator=g).reshape(8, 4)
    p = torch.cat([q, random_probs((8, 1, 30), g)], dim=1)
    _, accepted = ops.speculative_sample(q, draft_ids, p, seed=1)
    assert accepted.tolist() == [4] * 8


def test_zero_target_probability_always_rejects():
    q = torch.full((1, 1, 4), 0.25)
    p = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.25] * 4]])
    for seed in range(20):
        tokens, accepted = ops.speculative_sample(q, torch.tensor([[0]]), p, seed=seed)
        assert accepted.item() == 0
        assert tokens[0, 0].item() in (1, 2)  # drawn from max(0, p - q) = mass on tokens 1 and 2


def test_seeded_runs_are_deterministic():
    g = torch.Generator().manual_seed(5)
    q = random_probs((4, 5, 100), g)
    p = random_probs((4, 6, 100), g)
    ids = torch.multinomial(q.reshape(-1, 100), 1, generator=g).reshape(4, 5)
    first = ops.speculative_sample(q, ids, p, seed=123)
    second = ops.speculative_sample(q, ids, p, seed=123)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def emitted_first_token_histogram(sampler, q, p, vocab, n_samples, seed):
    """Sample the draft token from q, run speculative sampling, and histogram the first emitted token."""
    g = torch.Generator().manual_seed(seed)
    batch = n_samples
    qb, pb = q.expand(batch, -1, -1).contiguous(), p.expand(batch, -1, -1).contiguous()
    draft_ids = torch.multinomial(q[0], batch, replacement=True, generator=g).T.contiguous()  # [B, K]
    tokens, _ = sampler(qb, draft_ids, pb, generator=g)
    return torch.bincount(tokens[:, 0], minlength=vocab).double()


def test_keeps_the_target_distribution():
    """Chi-square: the first emitted token is distributed as p[0], whatever q is."""
    vocab = 12
    g = torch.Generator().manual_seed(11)
    q = random_probs((1, 1, vocab), g, peaked=True)
    p = random_probs((1, 2, vocab), g, peaked=True)
    counts = emitted_first_token_histogram(ops.speculative_sample, q, p, vocab, 40000, seed=3)
    expected = p[0, 0].double() / p[0, 0].double().sum() * counts.sum()
    chi2 = stats.chisquare(counts.numpy(), expected.numpy())
    assert chi2.pvalue > 1e-4, chi2


def test_statistical_test_catches_a_wrong_sampler():
    """The same test fails for a sampler that skips the residual (resamples from p on rejection)."""
    vocab = 12
    g = torch.Generator().manual_seed(11)
    q = random_probs((1, 1, vocab), g, peaked=True)
    p = random_probs((1, 2, vocab), g, peaked=True)

    def wrong(qb, ids, pb, generator):
        tokens, n = ops.speculative_sample(qb, ids, pb, generator=generator)
        resampled = torch.multinomial(pb[:, 0], 1, generator=generator)[:, 0]
        tokens[:, 0] = torch.where(n == 0, resampled, tokens[:, 0])
        return tokens, n

    counts = emitted_first_token_histogram(wrong, q, p, vocab, 40000, seed=3)
    expected = p[0, 0].double() / p[0, 0].double().sum() * counts.sum()
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue < 1e-6


def chain_histograms(sampler, q, p, n_samples, seed):
    """K = 2 chains: histograms of the 2nd emitted token (rows that accepted position 0) and of the bonus
    token (rows that accepted both), which must follow p[1] and p[2] whatever q is."""
    vocab = q.shape[-1]
    g = torch.Generator().manual_seed(seed)
    qb, pb = q.expand(n_samples, -1, -1).contiguous(), p.expand(n_samples, -1, -1).contiguous()
    draft_ids = torch.stack([torch.multinomial(q[0, j], n_samples, replacement=True, generator=g) for j in range(2)], 1)
    tokens, n = sampler(qb, draft_ids, pb, generator=g)
    assert (n >= 0).all() and (n <= 2).all()
    second = torch.bincount(tokens[n >= 1, 1], minlength=vocab).double()
    bonus = torch.bincount(tokens[n == 2, 2], minlength=vocab).double()
    return second, bonus


def chain_case():
    vocab = 6
    g = torch.Generator().manual_seed(21)
    p = random_probs((1, 3, vocab), g, peaked=True)
    q = torch.cat([p[:, :1], random_probs((1, 1, vocab), g)], dim=1)  # q0 = p0: position 0 is always accepted
    return q, p


def chi2_pvalue(counts, probs):
    expected = probs.double() / probs.double().sum() * counts.sum()
    return stats.chisquare(counts.numpy(), expected.numpy()).pvalue


def test_later_chain_positions_and_bonus_keep_the_target_distribution():
    q, p = chain_case()
    second, bonus = chain_histograms(ops.speculative_sample, q, p, 40000, seed=4)
    assert second.sum() == 40000 and bonus.sum() > 5000  # both positions are reached often
    assert chi2_pvalue(second, p[0, 1]) > 1e-4
    assert chi2_pvalue(bonus, p[0, 2]) > 1e-4


@pytest.mark.parametrize("mistake", ["bonus_from_last_draft_position", "no_residual_at_position_1"])
def test_chain_statistics_catch_a_wrong_sampler(mistake):
    q, p = chain_case()

    def wrong(qb, ids, pb, generator):
        tokens, n = ops.speculative_sample(qb, ids, pb, generator=generator)
        if mistake == "bonus_from_last_draft_position":  # bonus drawn from p[K - 1] instead of p[K]
            resampled = torch.multinomial(pb[:, 1], 1, generator=generator)[:, 0]
            tokens[:, 2] = torch.where(n == 2, resampled, tokens[:, 2])
        else:  # at a rejection at position 1, draw from p[1] instead of the residual
            resampled = torch.multinomial(pb[:, 1], 1, generator=generator)[:, 0]
            tokens[:, 1] = torch.where(n == 1, resampled, tokens[:, 1])
        return tokens, n

    second, bonus = chain_histograms(wrong, q, p, 40000, seed=4)
    if mistake == "bonus_from_last_draft_position":
        assert chi2_pvalue(bonus, p[0, 2]) < 1e-6
    else:
        assert chi2_pvalue(second, p[0, 1]) < 1e-6


def test_speculative_sample_random_shapes_match_reference():
    rng = torch.Generator().manual_seed(77)
    for case in range(10):
        pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))  # noqa: E731
        batch, k, vocab = pick(0, 6), pick(1, 6), pick(1, 300)
        dtype = (torch.float32, torch.bfloat16, torch.float16)[pick(0, 2)]
        q = random_probs((batch, k, vocab), rng, dtype, peaked=bool(pick(0, 1)))
        p = random_probs((batch, k + 1, vocab), rng, dtype, peaked=bool(pick(0, 1)))
        draft_ids = torch.randint(0, vocab, (batch, k), generator=rng)
        uniforms = torch.rand(batch, k + 1, generator=rng)
        tokens, accepted = ops.speculative_sample(q, draft_ids, p, uniforms=uniforms)
        ref_tokens, ref_accepted = reference.speculative_sample(q, draft_ids, p, uniforms)
        assert tokens.shape == (batch, k + 1)
        assert torch.equal(tokens, ref_tokens) and torch.equal(accepted, ref_accepted), case


def test_greedy_verify_random_shapes_match_reference():
    rng = torch.Generator().manual_seed(78)
    for case in range(10):
        pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))  # noqa: E731
        batch, k, vocab = pick(0, 6), pick(1, 6), pick(1, 300)
        dtype = (torch.float32, torch.float64, torch.bfloat16, torch.float16)[pick(0, 3)]
        logits = torch.randn(batch, k + 1, vocab, generator=rng).to(dtype)
        draft = logits[:, :k].argmax(dim=-1)
        flip = torch.rand(batch, k, generator=rng) < 0.2
        draft = torch.where(flip, torch.randint(0, vocab, (batch, k), generator=rng), draft)
        tokens, accepted = ops.greedy_verify(draft, logits)
        ref_tokens, ref_accepted = reference.greedy_verify(draft, logits)
        assert torch.equal(tokens, ref_tokens) and torch.equal(accepted, ref_accepted), case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,k,vocab", [(1, 1, 3), (6, 4, 50), (3, 5, 32000)])
def test_greedy_verify_matches_reference(batch, k, vocab, dtype):
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, k + 1, vocab, generator=g).to(dtype)
    draft = logits[:, :k].argmax(dim=-1)
    draft[0, k // 2] = (draft[0, k // 2] + 1) % vocab  # one mismatch
    tokens, accepted = ops.greedy_verify(draft, logits)
    ref_tokens, ref_accepted = reference.greedy_verify(draft, logits)
    assert torch.equal(tokens, ref_tokens) and torch.equal(accepted, ref_accepted)


def test_greedy_exact_cases():
    logits = torch.zeros(2, 4, 5)
    for pos, tok in enumerate([1, 2, 3, 4]):
        logits[:, pos, tok] = 1.0
    tokens, accepted = ops.greedy_verify(torch.tensor([[1, 2, 3], [1, 0, 3]]), logits)
    assert tokens.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1]]
    assert accepted.tolist() == [3, 1]
    # Ties go to the first index, as torch.argmax.
    tokens, _ = ops.greedy_verify(torch.tensor([[0]]), torch.zeros(1, 2, 3))
    assert tokens.tolist() == [[0, 0]]


def test_sampling_rejects_bad_input():
    q = torch.full((2, 3, 5), 0.2)
    p = torch.full((2, 4, 5), 0.2)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target_probs must be \[B, K \+ 1, V\] = \[2, 4, 5\]"):
        ops.speculative_sample(q, ids, p[:, :3].contiguous(), seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ops.speculative_sample(q, ids + 5, p, seed=0)
    with pytest.raises(ValueError, match="draft_ids must be torch.int64"):
        ops.speculative_sample(q, ids.int(), p, seed=0)
    with pytest.raises(ValueError, match="target_probs must be torch.float32, got torch.float16"):
        ops.speculative_sample(q, ids, p.half(), seed=0)
    with pytest.raises(ValueError, match="uniforms must lie in"):
        ops.speculative_sample(q, ids, p, uniforms=torch.full((2, 4), 1.0))
    with pytest.raises(ValueError, match="at most one of"):
        ops.speculative_sample(q, ids, p, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="draft_probs must be contiguous"):
        ops.speculative_sample(q.transpose(0, 1).contiguous().transpose(0, 1), ids, p, seed=0)
    with pytest.raises(ValueError, match=r"target_logits must be \[B, K \+ 1, V\]"):
        ops.greedy_verify(ids, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"greedy_verify: draft_ids holds 5 at flat index 0, outside the vocabulary"):
        ops.greedy_verify(ids + 5, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"greedy_verify: draft_ids holds -1 at flat index 4"):
        ops.greedy_verify(torch.tensor([[0, 0, 0], [0, -1, 0]]), torch.zeros(2, 4, 5))


def test_sampling_rejects_bad_python_arguments():
    q = torch.full((2, 3, 5), 0.2)
    p = torch.full((2, 4, 5), 0.2)
    ids = torch.zeros(2, 3, dtype=torch.long)
    for seed in (1.5, "3", True):
        with pytest.raises(ValueError, match="speculative_sample: seed must be an int"):
            ops.speculative_sample(q, ids, p, seed=seed)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        ops.speculative_sample(q, ids, p, generator=3)
    with pytest.raises(ValueError, match="generator is on cpu but the inputs are on meta"):
        ops.speculative_sample(q.to("meta"), ids.to("meta"), p.to("meta"), generator=torch.Generator())
    # Wrong device (meta next to cpu) for each tensor argument: a ValueError naming it and both devices.
    for name in ("draft_probs", "draft_ids", "target_probs", "uniforms"):
        args = dict(draft_probs=q, draft_ids=ids, target_probs=p, uniforms=torch.rand(2, 4))
        args[name] = args[name].to("meta")
        first = "draft_ids" if name == "draft_probs" else name
        other = "meta" if name == "draft_probs" else "cpu"
        with pytest.raises(ValueError, match=f"{first} is on (meta|cpu) but the other inputs are on {other}"):
            ops.speculative_sample(args.pop("draft_probs"), args.pop("draft_ids"), args.pop("target_probs"), **args)
    with pytest.raises(ValueError, match="target_logits is on meta but the other inputs are on cpu"):
        ops.greedy_verify(ids, torch.zeros(2, 4, 5, device="meta"))
    with pytest.raises(ValueError, match="target_logits is on cpu but the other inputs are on meta"):
        ops.greedy_verify(ids.to("meta"), torch.zeros(2, 4, 5))
    # A seed is deterministic for a given device.
    assert all(torch.equal(a, b) for a, b in zip(ops.speculative_sample(q, ids, p, seed=7),
                                                 ops.speculative_sample(q, ids, p, seed=7)))


def test_sampling_opcheck():
    g = torch.Generator().manual_seed(0)
    q = random_probs((2, 3, 7), g)
    p = random_probs((2, 4, 7), g)
    ids = torch.multinomial(q.reshape(-1, 7), 1, generator=g).reshape(2, 3)
    torch.library.opcheck(torch.ops.dreamr.speculative_sample.default, (q, ids, p, torch.rand(2, 4, generator=g)))
    torch.library.opcheck(torch.ops.dreamr.greedy_verify.default, (ids, torch.randn(2, 4, 7, generator=g)))
