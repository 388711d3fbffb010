"""Step-level KV-cache rollback: the CPU kernel against the per-layer PyTorch reference."""

import pytest
import torch

from dreamr import ops, reference
from dreamr.testing import misaligned_cache


def random_cache(layers, batch, heads, time, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, time, dim, generator=g).to(dtype) for _ in range(2 * layers)]


def clone(cache):
    return [t.clone() for t in cache]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layers,batch,heads,time,dim", [(1, 1, 1, 1, 1), (3, 5, 2, 17, 8), (4, 8, 3, 40, 5)])
def test_truncate_matches_reference(dtype, layers, batch, heads, time, dim):
    g = torch.Generator().manual_seed(layers * 7 + batch)
    cache = random_cache(layers, batch, heads, time, dim, dtype, seed=batch)
    lengths = torch.randint(0, time + 1, (batch,), generator=g)
    lengths[0] = 0  # rollback to length 0
    expected = clone(cache)
    expected_lengths = reference.kv_rollback(expected, lengths)
    new_lengths = ops.kv_rollback(cache, lengths)
    assert torch.equal(new_lengths, expected_lengths)
    for got, want in zip(cache, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_long_spans_at_any_alignment_match_reference(offset):
    # Dead spans of several KiB take the kernel's streaming-store path; ``offset`` elements into the
    # storage puts the rows at 2-, 6- or 16-byte-aligned addresses (head, body and tail of the span).
    batch, heads, time, dim = 3, 2, 160, 64
    cache = misaligned_cache(offset, batch, heads, time, dim)
    lengths = torch.tensor([3, 150, 57])  # zeroed spans of 147 and 93 positions (18.8 and 11.9 KiB)
    expected = clone(cache)
    assert torch.equal(ops.kv_rollback(cache, lengths), reference.kv_rollback(expected, lengths))
    for got, want in zip(cache, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("seed", range(5))
def test_branch_copy_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    batch, time = 6, 24
    cache = random_cache(2, batch, 2, time, 4, seed=seed)
    # Rows 0-2 are main sequences, rows 3-5 their target branches; each main row takes its branch's step.
    lengths = torch.tensor([5, 9, 0, 14, 20, 7])
    src_row = torch.tensor([3, 4, 5, -1, -1, -1])
    src_start = torch.tensor([5, 9, 0, 0, 0, 0])
    copy_length = torch.tensor([9, 11, 7, 0, 0, 0])
    if seed % 2:  # ragged sources that start anywhere inside what the source keeps
        src_start[0] = int(torch.randint(0, 6, (1,), generator=g))
        copy_length[0] = 14 - int(src_start[0])
    expected = clone(cache)
    expected_lengths = reference.kv_rollback(expected, lengths, src_row, src_start, copy_length)
    new_lengths = ops.kv_rollback(
        cache, lengths, copy_src_row=src_row, copy_src_start=src_start, copy_length=copy_length
    )
    assert torch.equal(new_lengths, expected_lengths)
    assert new_lengths.tolist()[:3] == [5 + int(copy_length[0]), 20, 7]
    for got, want in zip(cache, expected):
        assert torch.equal(got, want)


def test_python_ints_are_accepted_and_checked():
    cache = random_cache(1, 2, 1, 6, 2)
    assert ops.kv_rollback(cache, [3, 6]).tolist() == [3, 6]
    assert torch.count_nonzero(cache[0][0, :, 3:]) == 0
    with pytest.raises(ValueError, match=r"lengths\[1\] = 7 is outside \[0, T\] with T = 6"):
        ops.kv_rollback(cache, [3, 7])


def test_rollback_then_crop_equals_original_prefix():
    cache = random_cache(2, 3, 2, 10, 4)
    original = clone(cache)
    new_lengths = ops.kv_rollback(cache, [4, 4, 4])
    t = int(new_lengths.max())
    for got, want in zip(cache, original):
        assert torch.equal(got[:, :, :t], want[:, :, :t])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lengths=[1, -1]), r"lengths\[1\] = -1"),
        (dict(lengths=[1, 2], copy_src_row=[1, -1], copy_src_start=[0, 0], copy_length=[3, 0]),
         r"copies positions \[0, 3\) of row 1, which keeps only \[0, 2\)"),
        (dict(lengths=[1, 2], copy_src_row=[0, -1], copy_src_start=[0, 0], copy_length=[1, 0]), "into itself"),
        (dict(lengths=[1, 2], copy_src_row=[2, -1], copy_src_start=[0, 0], copy_length=[1, 0]), "not a row"),
        (dict(lengths=[1, 2], copy_src_row=[1, 0], copy_src_start=[0, 0], copy_length=[1, 1]),
         "also receives a copy"),
        (dict(lengths=[5, 6], copy_src_row=[1, -1], copy_src_start=[0, 0], copy_length=[2, 0]),
         "would grow to 7 positions"),
        (dict(lengths=[1, 2], copy_src_row=[1, -1], copy_src_start=[0, 0], copy_length=[-1, 0]), "negative"),
        (dict(lengths=[1, 2], copy_src_row=[1, -1]), "must be given together"),
    ],
)
def test_rollback_rejects_bad_values(kwargs, message):
    for as_tensors in (False, True):  # host ints (kv_rollback_check) and CPU tensors (the kernel's checks)
        cache = random_cache(1, 2, 1, 6, 2)
        args = {k: torch.tensor(v) if as_tensors else v for k, v in kwargs.items()}
        with pytest.raises(ValueError, match=message):
            ops.kv_rollback(cache, **args)


def test_rollback_rejects_bad_tensors():
    cache = random_cache(2, 2, 1, 6, 2)
    with pytest.raises(ValueError, match=r"cache\[1\] has shape"):
        ops.kv_rollback([cache[0], cache[1][:, :, :5].contiguous()], [1, 1])
    with pytest.raises(ValueError, match=r"cache\[1\] must be torch.float32, got torch.float64"):
        ops.kv_rollback([cache[0], cache[1].double()], [1, 1])
    with pytest.raises(ValueError, match=r"cache\[0\] must be dense in its last \(head\) dimension"):
        ops.kv_rollback([cache[0].transpose(2, 3)], [1, 1])
    with pytest.raises(ValueError, match=r"cache\[1\] has strides"):
        ops.kv_rollback([cache[0], torch.randn(2, 1, 9, 2)[:, :, :6]], [1, 1])
    with pytest.raises(ValueError, match=r"cache\[0\] must be \[B, H_kv, T, D\]"):
        ops.kv_rollback([cache[0][0]], [1])
    with pytest.raises(ValueError, match=r"lengths must be \[B\] with B = 2"):
        ops.kv_rollback(cache, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"lengths must be torch.int64, got torch.int32"):
        ops.kv_rollback(cache, torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache is empty"):
        ops.kv_rollback([], [1])
    with pytest.raises(ValueError, match="more than the 256"):
        ops.kv_rollback([cache[0]] * 257, [1, 1])


def test_rollback_opcheck():
    cache = random_cache(1, 2, 1, 6, 2)
    torch.library.opcheck(
        torch.ops.dreamr.kv_rollback_.default, (cache, torch.tensor([2, 3]), None, None, None)
    )


def test_positions_past_the_longest_row_are_left_for_the_crop():
    cache = random_cache(1, 2, 1, 6, 2)
    original = clone(cache)
    assert ops.kv_rollback(cache, [2, 4]).tolist() == [2, 4]
    for got, want in zip(cache, original):
        assert torch.equal(got[:, :, 4:], want[:, :, 4:])  # cropped by the caller, not written
        assert torch.count_nonzero(got[0, :, 2:4]) == 0  # the shorter row's stale span is zeroed
        assert torch.equal(got[1, :, :4], want[1, :, :4])


@pytest.mark.parametrize("with_copy", [False, True])
def test_strided_views_like_a_cropped_cache(with_copy):
    """transformers' crop leaves views whose time axis is shorter than their storage: no copy needed."""
    storage = random_cache(2, 4, 3, 20, 8, dtype=torch.bfloat16, seed=9)
    cache = [t[:, :, :13] for t in storage]  # [4, 3, 13, 8] views with stride_time 8, stride_head 160
    assert not cache[0].is_contiguous()
    expected = [t.clone() for t in cache]
    lengths = torch.tensor([3, 9, 5, 13])
    kwargs = {}
    if with_copy:
        kwargs = dict(copy_src_row=torch.tensor([3, -1, -1, -1]), copy_src_start=torch.tensor([2, 0, 0, 0]),
                      copy_length=torch.tensor([6, 0, 0, 0]))
    ref_lengths = reference.kv_rollback(expected, lengths, *kwargs.values())
    tails = [t[:, :, 13:].clone() for t in storage]
    new_lengths = ops.kv_rollback(cache, lengths, **kwargs)
    assert torch.equal(new_lengths, ref_lengths)
    for got, want in zip(cache, expected):
        assert torch.equal(got, want)
    for t, tail in zip(storage, tails):
        assert torch.equal(t[:, :, 13:], tail)  # storage past the view is never touched


def test_random_shapes_and_plans_match_reference():
    """Seeded random layers, B, H_kv, T, D, dtypes, ragged lengths (including 0) and copy plans."""
    rng = torch.Generator().manual_seed(31)
    for case in range(12):
        pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))  # noqa: E731
        layers, batch, heads, time, dim = pick(1, 3), pick(1, 7), pick(1, 3), pick(1, 20), pick(1, 9)
        dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[pick(0, 3)]
        cache = random_cache(layers, batch, heads, time, dim, dtype, seed=case)
        lengths = torch.randint(0, time + 1, (batch,), generator=rng)
        lengths[pick(0, batch - 1)] = 0
        src_row = torch.full((batch,), -1, dtype=torch.long)
        src_start = torch.zeros(batch, dtype=torch.long)
        copy_length = torch.zeros(batch, dtype=torch.long)
        rows = torch.randperm(batch, generator=rng).tolist()
        sources, receivers = rows[: batch // 2], rows[batch // 2:]
        for b in receivers:  # a valid plan: sources never receive, spans lie inside what the source keeps
            if not sources or pick(0, 3) == 0:
                continue
            s = sources[pick(0, len(sources) - 1)]
            start = pick(0, int(lengths[s]))
            n = min(pick(0, int(lengths[s]) - start), time - int(lengths[b]))
            src_row[b], src_start[b], copy_length[b] = s, start, n
        copies = (src_row, src_start, copy_length) if pick(0, 1) else ()
        expected = clone(cache)
        expected_lengths = reference.kv_rollback(expected, lengths, *copies)
        as_lists = bool(pick(0, 1))  # host lists go through kv_rollback_check, tensors through the kernel
        args = [v.tolist() if as_lists else v for v in (lengths, *copies)]
        kwargs = dict(zip(("copy_src_row", "copy_src_start", "copy_length"), args[1:]))
        new_lengths = ops.kv_rollback(cache, args[0], **kwargs)
        assert torch.equal(new_lengths, expected_lengths), case
        for got, want in zip(cache, expected):
            assert torch.equal(got, want), case


def test_rollback_rejects_overlapping_cache():
    """An expanded view (stride 0 over the batch) would let one row's writes land in another's."""
    base = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match=r"cache\[0\] has elements that share memory"):
        ops.kv_rollback([base.expand(3, 2, 6, 4)], [1, 2, 3])
    heads = torch.randn(3, 1, 6, 4)  # the heads share memory
    with pytest.raises(ValueError, match=r"cache\[0\] has elements that share memory"):
        ops.kv_rollback([heads.expand(3, 2, 6, 4)], torch.tensor([1, 2, 3]))
    assert torch.count_nonzero(base) == base.numel() and torch.count_nonzero(heads) == heads.numel()  # unwritten


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lengths=[1.7, 2]), r"lengths\[0\] must be an int, got float"),
        (dict(lengths=[True, 2]), r"lengths\[0\] must be an int, got bool"),
        (dict(lengths=[[1, 2]]), r"lengths\[0\] must be an int, got list"),
        (dict(lengths=[1, 2], copy_src_row=[1, -1], copy_src_start=[0.5, 0], copy_length=[1, 0]),
         r"copy_src_start\[0\] must be an int, got float"),
        (dict(lengths=torch.tensor([1, 2], device="meta")), "lengths is on meta but the other inputs are on cpu"),
        (dict(lengths=[1, 2], copy_src_row=torch.tensor([1, -1], device="meta"), copy_src_start=[0, 0],
              copy_length=[1, 0]), "copy_src_row is on meta but the other inputs are on cpu"),
        (dict(lengths=torch.tensor([1.0, 2.0])), "lengths must be torch.int64"),
    ],
)
def test_rollback_rejects_bad_python_arguments(kwargs, message):
    cache = random_cache(1, 2, 1, 6, 2)
    with pytest.raises(ValueError, match=message):
        ops.kv_rollback(cache, **kwargs)


def test_rollback_wrong_device_cache():
    cache = random_cache(2, 2, 1, 6, 2)
    with pytest.raises(ValueError, match=r"cache\[1\] is on meta but the other inputs are on cpu"):
        ops.kv_rollback([cache[0], cache[1].to("meta")], [1, 1])
    with pytest.raises(ValueError, match=r"lengths is on cpu but the other inputs are on meta"):
        ops.kv_rollback([t.to("meta") for t in cache], torch.tensor([1, 1]))


def test_device_lengths_with_host_copy_plan_read_nothing_back(monkeypatch):
    """A device tensor next to Python lists: the lists move to the device, no device value is read.

    Meta stands in for CUDA here: reading a meta tensor's values fails, just as reading a CUDA tensor's
    values would synchronise.
    """
    cache = [t.to("meta") for t in random_cache(1, 2, 1, 6, 2)]
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() on a device tensor"))
    new_lengths = ops.kv_rollback(cache, torch.tensor([1, 2], device="meta"), copy_src_row=[1, -1],
                                  copy_src_start=[0, 0], copy_length=[1, 0])
    assert new_lengths.device.type == "meta" and new_lengths.shape == (2,)
