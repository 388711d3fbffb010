"""CPN verification and window acceptance: the CPU kernel against the PyTorch reference."""

import math

import pytest
import torch

from dreamr import ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-6, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def random_case(batch, hidden, vocab, n_pos, n_neg, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, hidden, generator=g) / math.sqrt(hidden) * 4).to(dtype)
    w = torch.randn(vocab, hidden, generator=g).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    ids = torch.randperm(vocab, generator=g)[: n_pos + n_neg].tolist()
    return h, w, b, ids[:n_pos], ids[n_pos:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,hidden,vocab,n_pos,n_neg,bias,softcap",
    [
        (1, 64, 100, 1, 1, False, 0.0),
        (7, 257, 5000, 6, 5, True, 0.0),
        (64, 512, 151936, 64, 64, False, 30.0),
        (3, 33, 40, 3, 9, True, 5.0),
    ],
)
def test_cpn_verify_matches_reference(dtype, batch, hidden, vocab, n_pos, n_neg, bias, softcap):
    h, w, b, pos, neg = random_case(batch, hidden, vocab, n_pos, n_neg, dtype, seed=batch + vocab, bias=bias)
    for alpha in (0.0, 0.3, 0.7, 1.0):
        cpn, accept = ops.cpn_verify(h, w, pos, neg, alpha, lm_head_bias=b, logit_softcap=softcap)
        ref_cpn, _ = reference.cpn_verify(h, w, b, pos, neg, alpha, softcap)
        assert cpn.dtype == torch.float32 and accept.dtype == torch.bool and cpn.shape == (batch,)
        torch.testing.assert_close(cpn, ref_cpn, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        # Acceptance is the exact rule applied to the kernel's own cpn.
        assert torch.equal(accept, reference.accepts(cpn, alpha))


@pytest.mark.parametrize("batch,hidden", [(1, 31), (3, 32), (4, 33), (5, 100), (9, 4096)])
def test_bf16_logits_are_float32_dot_products(batch, hidden):
    # bf16 x bf16 products are exact in float32, so the kernel's logits (AVX512-BF16 where the CPU has
    # it, else BLAS on widened copies) must equal float32 arithmetic on the widened values up to summation
    # order: a far tighter bound than the bf16 tolerance above. H around the 32-lane width tests the tail.
    h, w, b, pos, neg = random_case(batch, hidden, 300, 5, 6, torch.bfloat16, seed=hidden, bias=True)
    cpn, _ = ops.cpn_verify(h, w, pos, neg, 0.5, lm_head_bias=b)
    ref_cpn, _ = reference.cpn_verify(h.float(), w.float(), b.float(), pos, neg, 0.5)
    torch.testing.assert_close(cpn, ref_cpn, atol=2e-6, rtol=2e-6)


def test_cpn_equals_full_vocab_softmax():
    h, w, b, pos, neg = random_case(4, 128, 3000, 4, 4, torch.float32, seed=1, bias=True)
    cpn, _ = ops.cpn_verify(h, w, pos, neg, 0.5, lm_head_bias=b)
    naive, _ = reference.cpn_verify_naive(h, w, b, pos, neg, 0.5)
    torch.testing.assert_close(cpn, naive, atol=1e-5, rtol=1e-5)


def test_alpha_ends_are_exact():
    # A verdict so negative that cpn underflows to exactly 0, and one so positive it rounds to 1.
    hidden = torch.tensor([[1.0], [-1.0]])
    weight = torch.tensor([[200.0], [-200.0]])  # token 0 positive, token 1 negative
    cpn, accept = ops.cpn_verify(hidden, weight, [0], [1], 0.0)
    assert cpn.tolist() == [1.0, 0.0]
    assert accept.tolist() == [True, True]  # alpha = 0 accepts every finite verdict
    _, accept = ops.cpn_verify(hidden, weight, [0], [1], 1.0)
    assert accept.tolist() == [False, False]  # alpha = 1 rejects every step


@pytest.mark.parametrize("softcap", [0.0, 30.0, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_hidden_is_rejected(bad, softcap):
    # With soft-capping, tanh would turn an infinite logit into +-cap: finiteness is judged before it.
    h, w, _, pos, neg = random_case(3, 16, 50, 2, 2, torch.float32, seed=2)
    h[1, 5] = bad
    for alpha in (0.0, 0.5):
        for cpn, accept in (ops.cpn_verify(h, w, pos, neg, alpha, logit_softcap=softcap),
                            reference.cpn_verify(h, w, None, pos, neg, alpha, softcap)):
            assert math.isnan(cpn[1].item()) and not accept[1].item()
            assert not torch.isnan(cpn[[0, 2]]).any()


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_infinite_bias_is_rejected(softcap):
    # An infinite verdict logit in only one set, through the bias, on the positive and the negative side.
    h, w, b, pos, neg = random_case(2, 8, 20, 2, 2, torch.float32, seed=5, bias=True)
    for token, value in ((pos[0], float("inf")), (neg[1], -float("inf"))):
        bias = b.clone()
        bias[token] = value
        cpn, accept = ops.cpn_verify(h, w, pos, neg, 0.0, lm_head_bias=bias, logit_softcap=softcap)
        ref_cpn, ref_accept = reference.cpn_verify(h, w, bias, pos, neg, 0.0, softcap)
        assert torch.isnan(cpn).all() and not accept.any()
        assert torch.isnan(ref_cpn).all() and not ref_accept.any()


def test_cpn_verify_random_shapes_match_reference():
    """Seeded random B, H, V, |P|, |N|, dtype, bias and soft-cap, beyond the fixed grid above."""
    rng = torch.Generator().manual_seed(2024)
    for case in range(12):
        pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))  # noqa: E731
        batch, hidden, vocab = pick(0, 9), pick(1, 70), pick(2, 400)
        n_pos = pick(1, min(8, vocab - 1))
        n_neg = pick(1, min(8, vocab - n_pos))
        dtype = DTYPES[pick(0, 3)]
        softcap = (0.0, 0.5, 20.0)[pick(0, 2)]
        h, w, b, pos, neg = random_case(batch, hidden, vocab, n_pos, n_neg, dtype, seed=case, bias=bool(pick(0, 1)))
        alpha = float(torch.rand(1, generator=rng))
        cpn, accept = ops.cpn_verify(h, w, pos, neg, alpha, lm_head_bias=b, logit_softcap=softcap)
        ref_cpn, _ = reference.cpn_verify(h, w, b, pos, neg, alpha, softcap)
        assert cpn.shape == (batch,)
        torch.testing.assert_close(cpn, ref_cpn, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        assert torch.equal(accept, reference.accepts(cpn, alpha))


def _next_float32_up(x: float) -> float:
    return torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(2.0)).item()


def test_threshold_is_decided_in_float32():
    """float32(0.85) = 0.8500000238 > 0.85 in double, yet the kernel (and so every Python caller) rejects it."""
    cpn32 = torch.tensor(0.85, dtype=torch.float32).item()
    assert cpn32 > 0.85  # the double comparison a plain Python `cpn > alpha` would make
    above = _next_float32_up(cpn32)
    cpn = torch.tensor([[cpn32, above]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    _, accept = ops.cpn_window_accept(cpn, valid, 0.85)
    assert accept.tolist() == [[False, True]]
    assert reference.accepts(cpn, 0.85).tolist() == [[False, True]]
    assert [reference.accepts_value(c, 0.85) for c in (cpn32, above)] == [False, True]
    # The same from cpn_verify's own output, at an alpha equal to it and at one a hair below it in double
    # that narrows to the same float32.
    h, w, _, pos, neg = random_case(4, 16, 50, 2, 2, torch.float32, seed=11)
    scores, _ = ops.cpn_verify(h, w, pos, neg, 0.5)
    for row, c in enumerate(scores.tolist()):
        for alpha in (c, math.nextafter(c, 0.0)):
            if reference.round_to_float32(alpha) != c or not 0.0 < alpha < 1.0:
                continue
            _, accept = ops.cpn_verify(h, w, pos, neg, alpha)
            assert not accept[row].item()
            assert not reference.accepts_value(c, alpha)
            assert not reference.accepts(scores, alpha)[row].item()
            assert torch.equal(accept, reference.accepts(scores, alpha))
            assert accept.tolist() == [reference.accepts_value(x, alpha) for x in scores.tolist()]


def test_alpha_one_rejects_explicitly():
    """alpha >= 1 (also a double below 1 that narrows to 1.0f) rejects every cpn, even 1.0 and above."""
    cpn = torch.tensor([[1.0, 1.5, float("inf"), 0.999]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    for alpha in (1.0, 1.0 - 1e-12):
        assert reference.round_to_float32(alpha) == 1.0
        n, accept = ops.cpn_window_accept(cpn, valid, alpha)
        assert not accept.any() and n.tolist() == [0]
        assert not reference.accepts(cpn, alpha).any()
        assert not any(reference.accepts_value(c, alpha) for c in cpn.flatten().tolist())
    assert not reference.accepts_value(1.0, 1.0) and not reference.accepts_value(2.0, 1.5)


def test_accepts_value_ends():
    assert reference.accepts_value(0.0, 0.0) and reference.accepts_value(-0.0, 0.0)
    assert reference.accepts_value(0.0, 1e-60)  # alpha narrows to 0.0f: every finite verdict accepts
    assert not reference.accepts_value(float("nan"), 0.0) and not reference.accepts_value(float("nan"), 0.5)
    assert reference.accepts_value(0.71, 0.7) and not reference.accepts_value(0.7, 0.7)
    assert reference.accepts_value(torch.tensor(0.9), 0.5)  # anything float() takes
    assert reference.round_to_float32(1e300) == math.inf and reference.round_to_float32(-1e300) == -math.inf
    assert math.isnan(reference.round_to_float32(float("nan")))
    # Same decisions as the kernel over a sweep of values around the thresholds.
    values = torch.tensor([0.0, 1e-40, 0.3, 0.29999998, 0.3000001, 0.7, 0.70000005, 0.85, 0.9999999, 1.0])
    valid = torch.ones(1, values.numel(), dtype=torch.bool)
    for alpha in (0.0, 0.3, 0.7, 0.85, 0.9999999, 1.0):
        _, accept = ops.cpn_window_accept(values[None], valid, alpha)
        assert accept[0].tolist() == [reference.accepts_value(v, alpha) for v in values.tolist()]


def test_window_accept_matches_reference():
    g = torch.Generator().manual_seed(3)
    for requests, window in [(1, 1), (5, 4), (33, 8)]:
        cpn = torch.rand(requests, window, generator=g)
        cpn[0, 0] = float("nan")
        valid = torch.rand(requests, window, generator=g) > 0.2
        for alpha in (0.0, 0.5, 0.7, 1.0):
            n, accept = ops.cpn_window_accept(cpn, valid, alpha)
            ref_n, ref_accept = reference.cpn_window_accept(cpn, valid, alpha)
            assert torch.equal(n, ref_n) and torch.equal(accept, ref_accept)


def test_window_accept_counts_leading_run():
    cpn = torch.tensor([[0.9, 0.8, 0.1, 0.9], [0.9, 0.9, 0.9, 0.9], [0.2, 0.9, 0.9, 0.9]])
    valid = torch.tensor([[True] * 4, [True, True, False, True], [True] * 4])
    n, accept = ops.cpn_window_accept(cpn, valid, 0.7)
    assert n.tolist() == [2, 2, 0]
    assert accept[0].tolist() == [True, True, False, True]


def _case():
    return random_case(2, 8, 20, 2, 2, torch.float32, seed=4)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.update(hidden=a["hidden"][0]), "hidden must be \\[B, H\\]"),
        (lambda a: a.update(hidden=a["hidden"].double()), "lm_head_weight must be torch.float64, got torch.float32"),
        (lambda a: a.update(hidden=a["hidden"].long()), "hidden must be float32"),
        (lambda a: a.update(lm_head_weight=a["lm_head_weight"][:, :4].contiguous()), "lm_head_weight must be \\[V, H\\]"),
        (lambda a: a.update(lm_head_weight=a["lm_head_weight"].t().contiguous().t()), "must be contiguous"),
        (lambda a: a.update(hidden=a["hidden"][:, ::2].contiguous(), lm_head_weight=a["lm_head_weight"][:, ::2]),
         "lm_head_weight must be contiguous"),
        (lambda a: a.update(positive_ids=[]), "positive_ids is empty"),
        (lambda a: a.update(negative_ids=[]), "negative_ids is empty"),
        (lambda a: a.update(positive_ids=[20]), "outside the vocabulary"),
        (lambda a: a.update(negative_ids=[-1]), "outside the vocabulary"),
        (lambda a: a.update(negative_ids=a["positive_ids"][:1]), "disjoint"),
        (lambda a: a.update(positive_ids=[3, 3]), "repeats token id 3"),
        (lambda a: a.update(positive_ids=list(range(65))), "more than the 64"),
        (lambda a: a.update(alpha=1.5), "alpha must be a number in \\[0, 1\\]"),
        (lambda a: a.update(alpha=float("nan")), "alpha must be a number in \\[0, 1\\]"),
        (lambda a: a.update(lm_head_bias=torch.zeros(3)), "lm_head_bias must be \\[V\\]"),
        (lambda a: a.update(logit_softcap=-1.0), "logit_softcap must be >= 0"),
        # checked by the Python wrapper
        (lambda a: a.update(alpha=None), "alpha must be a real number"),
        (lambda a: a.update(alpha="0.5"), "alpha must be a real number"),
        (lambda a: a.update(alpha=True), "alpha must be a real number"),
        (lambda a: a.update(logit_softcap=None), "logit_softcap must be a real number"),
        (lambda a: a.update(positive_ids=[1.7]), r"positive_ids\[0\] must be an int, got float"),
        (lambda a: a.update(negative_ids=[True]), r"negative_ids\[0\] must be an int, got bool"),
        (lambda a: a.update(positive_ids=torch.tensor([[1, 2]])), "positive_ids must be a 1-D integer tensor"),
        (lambda a: a.update(positive_ids=torch.tensor([1.0])), "positive_ids must be a 1-D integer tensor"),
        (lambda a: a.update(positive_ids=[[1, 2]]), r"positive_ids\[0\] must be an int, got list"),
        (lambda a: a.update(negative_ids=5), "negative_ids must be a sequence of ints"),
        (lambda a: a.update(positive_ids=torch.tensor([1], device="meta")),
         "positive_ids is a tensor on meta; pass a list of ints or a CPU tensor"),
        (lambda a: a.update(lm_head_weight=a["lm_head_weight"].to("meta")),
         "lm_head_weight is on meta but the other inputs are on cpu"),
        (lambda a: a.update(hidden=a["hidden"].to("meta")), "lm_head_weight is on cpu but the other inputs are on meta"),
        (lambda a: a.update(lm_head_bias=torch.zeros(20, device="meta")),
         "lm_head_bias is on meta but the other inputs are on cpu"),
        (lambda a: a.update(hidden=a["hidden"].tolist()), "hidden must be a torch.Tensor, got list"),
    ],
)
def test_cpn_verify_rejects_bad_input(mutate, message):
    h, w, _, pos, neg = _case()
    args = dict(hidden=h, lm_head_weight=w, positive_ids=pos, negative_ids=neg, alpha=0.5)
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ops.cpn_verify(**args)


def test_cpn_verify_takes_integer_ids_of_any_kind():
    h, w, _, pos, neg = _case()
    cpn, _ = ops.cpn_verify(h, w, pos, neg, 0.5)
    cpn_t, _ = ops.cpn_verify(h, w, torch.tensor(pos), tuple(torch.tensor(neg).int().tolist()), 0.5)
    assert torch.equal(cpn, cpn_t)
    # All-meta inputs (shape propagation) still reach the fake implementation.
    meta_cpn, meta_accept = ops.cpn_verify(h.to("meta"), w.to("meta"), pos, neg, 0.5)
    assert meta_cpn.device.type == "meta" and meta_cpn.shape == (2,) and meta_accept.dtype == torch.bool


def test_window_accept_rejects_bad_input():
    with pytest.raises(ValueError, match="valid must have cpn's shape"):
        ops.cpn_window_accept(torch.rand(2, 3), torch.ones(2, 4, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="cpn must be torch.float32, got torch.float64"):
        ops.cpn_window_accept(torch.rand(2, 3).double(), torch.ones(2, 3, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="valid must be torch.bool"):
        ops.cpn_window_accept(torch.rand(2, 3), torch.ones(2, 3), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        ops.cpn_window_accept(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), -0.1)
    with pytest.raises(ValueError, match="alpha must be a real number"):
        ops.cpn_window_accept(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="valid is on meta but the other inputs are on cpu"):
        ops.cpn_window_accept(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool, device="meta"), 0.5)


def test_cpn_verify_compiles_with_torch_compile():
    h, w, _, pos, neg = _case()

    @torch.compile(backend="eager", fullgraph=True)
    def verify(hidden, weight):
        return torch.ops.dreamr.cpn_verify(hidden * 1.0, weight, None, pos, neg, 0.5, 0.0)

    cpn, accept = verify(h, w)
    ref_cpn, ref_accept = reference.cpn_verify(h, w, None, pos, neg, 0.5)
    torch.testing.assert_close(cpn, ref_cpn)
    assert torch.equal(accept, ref_accept)


def test_python_wrapper_traces_with_fullgraph():
    """The wrappers' argument checks read only types, shapes and devices: dynamo traces them whole."""
    h, w, _, pos, neg = _case()

    @torch.compile(backend="eager", fullgraph=True)
    def verify(hidden, weight):
        return ops.cpn_verify(hidden * 1.0, weight, pos, neg, 0.5, logit_softcap=5.0)

    cpn, accept = verify(h, w)
    ref_cpn, ref_accept = reference.cpn_verify(h, w, None, pos, neg, 0.5, 5.0)
    torch.testing.assert_close(cpn, ref_cpn)
    assert torch.equal(accept, ref_accept)


def test_fake_implementations_pass_opcheck():
    h, w, _, pos, neg = _case()
    torch.library.opcheck(torch.ops.dreamr.cpn_verify.default, (h, w, None, pos, neg, 0.5, 0.0))
    torch.library.opcheck(
        torch.ops.dreamr.cpn_window_accept.default, (torch.rand(3, 4), torch.ones(3, 4, dtype=torch.bool), 0.5)
    )
