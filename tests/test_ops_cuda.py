"""The CUDA kernels against the references (runs on a GPU machine; skipped elsewhere)."""

import pytest
import torch

from dreamr import ops, reference
from dreamr._extension import has_cuda_kernels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not has_cuda_kernels(), reason="core built without CUDA"),
]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-6, torch.bfloat16: 2e-3, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("batch,hidden,vocab,n_pos,n_neg,softcap", [(1, 64, 100, 1, 1, 0.0), (64, 4096, 151936, 6, 6, 30.0)])
def test_cpn_verify_cuda(dtype, batch, hidden, vocab, n_pos, n_neg, softcap):
    g = torch.Generator().manual_seed(batch)
    h = (torch.randn(batch, hidden, generator=g) / hidden**0.5 * 4).to(dtype)
    w = torch.randn(vocab, hidden, generator=g).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype)
    ids = torch.randperm(vocab, generator=g)[: n_pos + n_neg].tolist()
    h[0, 0] = float("nan") if batch > 1 else h[0, 0]
    cpn, accept = ops.cpn_verify(h.cuda(), w.cuda(), ids[:n_pos], ids[n_pos:], 0.7, lm_head_bias=b.cuda(),
                                 logit_softcap=softcap)
    ref_cpn, _ = reference.cpn_verify(h, w, b, ids[:n_pos], ids[n_pos:], 0.7, softcap)
    torch.testing.assert_close(cpn.cpu(), ref_cpn, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype], equal_nan=True)
    assert torch.equal(accept.cpu(), reference.accepts(cpn.cpu(), 0.7))


def test_window_accept_cuda():
    cpn = torch.rand(37, 4)
    valid = torch.rand(37, 4) > 0.1
    for alpha in (0.0, 0.6, 1.0):
        n, accept = ops.cpn_window_accept(cpn.cuda(), valid.cuda(), alpha)
        ref_n, ref_accept = reference.cpn_window_accept(cpn, valid, alpha)
        assert torch.equal(n.cpu(), ref_n) and torch.equal(accept.cpu(), ref_accept)


@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 128), (torch.float32, 64), (torch.float16, 3)])
def test_kv_rollback_cuda(dtype, dim):
    cache = [torch.randn(6, 4, 50, dim).to(dtype) for _ in range(64)]
    lengths = torch.tensor([5, 9, 0, 14, 20, 7])
    copy = dict(copy_src_row=torch.tensor([3, 4, 5, -1, -1, -1]), copy_src_start=torch.tensor([5, 9, 0, 0, 0, 0]),
                copy_length=torch.tensor([9, 11, 7, 0, 0, 0]))
    expected = [t.clone() for t in cache]
    ref_lengths = reference.kv_rollback(expected, lengths, *copy.values())
    gpu = [t.cuda() for t in cache]
    new_lengths = ops.kv_rollback(gpu, lengths.cuda(), **{k: v.cuda() for k, v in copy.items()})
    assert torch.equal(new_lengths.cpu(), ref_lengths)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_speculative_sample_cuda(dtype):
    g = torch.Generator().manual_seed(0)
    batch, k, vocab = 32, 5, 32000
    q = torch.softmax(torch.randn(batch, k, vocab, generator=g), -1).to(dtype)
    p = torch.softmax(torch.randn(batch, k + 1, vocab, generator=g), -1).to(dtype)
    ids = torch.multinomial(q.float().reshape(-1, vocab), 1, generator=g).reshape(batch, k)
    u = torch.rand(batch, k + 1, generator=g)
    tokens, n = ops.speculative_sample(q.cuda(), ids.cuda(), p.cuda(), uniforms=u.cuda())
    ref_tokens, ref_n = reference.speculative_sample(q, ids, p, u)
    assert torch.equal(n.cpu(), ref_n)
    # The extra token is an inverse-CDF draw: summation order may move a boundary by one ulp, rarely.
    assert (tokens.cpu() == ref_tokens).float().mean() > 0.99


def test_greedy_verify_cuda():
    logits = torch.randn(16, 6, 32000)
    draft = logits[:, :5].argmax(-1)
    draft[::3, 2] += 1
    tokens, n = ops.greedy_verify(draft.cuda(), logits.cuda())
    ref_tokens, ref_n = reference.greedy_verify(draft, logits)
    assert torch.equal(tokens.cpu(), ref_tokens) and torch.equal(n.cpu(), ref_n)


def test_device_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="lm_head_weight is on cpu but the other inputs are on cuda"):
        ops.cpn_verify(torch.randn(2, 8).cuda(), torch.randn(10, 8), [0], [1], 0.5)


def test_ops_capture_in_a_cuda_graph():
    h, w = torch.randn(8, 256, device="cuda"), torch.randn(1000, 256, device="cuda")
    cache = [torch.randn(4, 2, 16, 8, device="cuda") for _ in range(4)]
    lengths = torch.tensor([3, 5, 7, 9], device="cuda")
    ops.cpn_verify(h, w, [1, 2], [3], 0.5)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cpn, accept = ops.cpn_verify(h, w, [1, 2], [3], 0.5)
        new_lengths = ops.kv_rollback(cache, lengths)
    h.copy_(torch.randn_like(h))
    graph.replay()
    ref_cpn, _ = reference.cpn_verify(h, w, None, [1, 2], [3], 0.5)
    torch.testing.assert_close(cpn, ref_cpn)
    assert new_lengths.tolist() == [3, 5, 7, 9]


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_cpn_verify_cuda_rejects_infinite_hidden_with_softcap(softcap):
    h, w = torch.randn(3, 16), torch.randn(50, 16)
    h[1, 5] = float("inf")
    cpn, accept = ops.cpn_verify(h.cuda(), w.cuda(), [0, 1], [2, 3], 0.0, logit_softcap=softcap)
    assert torch.isnan(cpn[1]).item() and not accept[1].item()
    assert not torch.isnan(cpn[[0, 2]]).any().item()


def test_greedy_verify_cuda_out_of_range_ids_are_rejections():
    logits = torch.zeros(2, 3, 5)
    logits[:, :, 1] = 1.0  # argmax 1 everywhere
    draft = torch.tensor([[1, 7], [-3, 1]])  # not checked on CUDA (no host read): they never match
    tokens, n = ops.greedy_verify(draft.cuda(), logits.cuda())
    assert n.tolist() == [1, 0] and tokens.tolist() == [[1, 1, -1], [1, -1, -1]]


@pytest.mark.parametrize("src_row,valid_src_row", [([1, 2, -1], [-1, 2, -1]), ([0, -1, -1], [-1, -1, -1])])
def test_kv_rollback_cuda_invalid_device_plans_copy_nothing(src_row, valid_src_row):
    """Device-held plans are not checked; a self-copy or a source that also receives copies nothing."""
    cache = [torch.randn(3, 2, 6, 4) for _ in range(2)]
    lengths = torch.tensor([2, 4, 3])
    start, length = torch.tensor([0, 0, 0]), torch.tensor([1, 2, 0])
    expected = [t.clone() for t in cache]
    valid = torch.tensor(valid_src_row)
    ref_lengths = reference.kv_rollback(expected, lengths, valid, start, torch.where(valid >= 0, length, 0))
    gpu = [t.cuda() for t in cache]
    new_lengths = ops.kv_rollback(gpu, lengths.cuda(), copy_src_row=torch.tensor(src_row).cuda(),
                                  copy_src_start=start.cuda(), copy_length=length.cuda())
    assert torch.equal(new_lengths.cpu(), ref_lengths)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, expected))


def test_kv_rollback_cuda_device_lengths_with_list_plan():
    cache = [torch.randn(3, 2, 6, 4) for _ in range(2)]
    expected = [t.clone() for t in cache]
    plan = ([2, -1, -1], [0, 0, 0], [2, 0, 0])
    ref_lengths = reference.kv_rollback(expected, torch.tensor([2, 4, 3]), *(torch.tensor(v) for v in plan))
    gpu = [t.cuda() for t in cache]
    new_lengths = ops.kv_rollback(gpu, torch.tensor([2, 4, 3], device="cuda"), copy_src_row=plan[0],
                                  copy_src_start=plan[1], copy_length=plan[2])
    assert torch.equal(new_lengths.cpu(), ref_lengths)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, expected))


def test_speculative_sample_cuda_rejects_a_cpu_generator():
    q = torch.full((1, 1, 4), 0.25, device="cuda")
    with pytest.raises(ValueError, match="generator is on cpu but the inputs are on cuda"):
        ops.speculative_sample(q, torch.zeros(1, 1, dtype=torch.long, device="cuda"),
                               torch.full((1, 2, 4), 0.25, device="cuda"), generator=torch.Generator())


@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 128), (torch.float32, 64), (torch.float16, 3)])
@pytest.mark.parametrize("plan_on", ["host", "device"])
def test_kv_compact_cuda(dtype, dim, plan_on):
    """Random plans (rows released, columns closed, rows moving within themselves) over 64 tensors, the
    plan as host values (checked, then moved) or as device tensors (used unread)."""
    from test_ops_compact import random_plan

    g = torch.Generator().manual_seed(dim)
    for case in range(3):
        cache = [torch.randn(6, 4, 300, dim, generator=g).to(dtype) for _ in range(64)]
        plan = random_plan(g, 6, 300)
        expected = [t.clone() for t in cache]
        reference.kv_compact(expected, *plan)
        gpu = [t.cuda() for t in cache]
        ops.kv_compact(gpu, *([p.tolist() for p in plan] if plan_on == "host" else [p.cuda() for p in plan]))
        assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, expected)), case


def test_kv_compact_cuda_strided_views_and_a_row_moving_within_itself():
    storage = [torch.randn(5, 3, 40, 8).to(torch.bfloat16) for _ in range(4)]
    cache = [t[1:, :, :33] for t in storage]  # strided rows and time axis, as a batch's block view
    pad = torch.zeros(2, dtype=torch.long)
    columns = torch.stack([torch.cat([torch.arange(3), torch.arange(5, 33), pad]),  # row 0 closes a gap in place
                           torch.arange(33), torch.cat([torch.arange(1, 33), pad[:1]])])
    plan = (torch.tensor([0, 2, 3]), columns, torch.tensor([31, 33, 32]))
    expected = [t.clone() for t in storage]
    reference.kv_compact([t[1:, :, :33] for t in expected], *plan)
    gpu = [t.cuda() for t in storage]
    ops.kv_compact([t[1:, :, :33] for t in gpu], *plan)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, expected))


def test_kv_compact_cuda_device_plans_are_clamped_into_range():
    """Device-held plans are not checked: out-of-range rows, columns and counts are clamped (here into a
    plan that meets the order rules, so the result is the reference's on the clamped plan)."""
    cache = [torch.randn(4, 2, 8, 4) for _ in range(2)]
    bad = (torch.tensor([-5, 9]), torch.tensor([[-2, 1, 99], [4, 5, 6]]), torch.tensor([9, -1]))
    clamped = (torch.tensor([0, 3]), torch.tensor([[0, 1, 7], [4, 5, 6]]), torch.tensor([3, 0]))
    expected = [t.clone() for t in cache]
    reference.kv_compact(expected, *clamped)
    gpu = [t.cuda() for t in cache]
    ops.kv_compact(gpu, *(p.cuda() for p in bad))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, expected))


def test_kv_compact_cuda_host_plans_are_checked():
    gpu = [torch.randn(3, 1, 6, 2, device="cuda")]
    with pytest.raises(ValueError, match=r"src_rows must be strictly increasing"):
        ops.kv_compact(gpu, [2, 1], [[0], [0]], [1, 1])


def test_kv_compact_captures_in_a_cuda_graph():
    cache = [torch.randn(4, 2, 16, 8, device="cuda") for _ in range(4)]
    plan = [torch.tensor([1, 3], device="cuda"), torch.tensor([[0, 2, 5], [1, 4, 0]], device="cuda"),
            torch.tensor([3, 2], device="cuda")]
    ops.kv_compact([torch.zeros_like(t) for t in cache], *plan)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv_compact(cache, *plan)
    before = [t.cpu() for t in cache]
    graph.replay()
    reference.kv_compact(before, *(p.cpu() for p in plan))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(cache, before))
