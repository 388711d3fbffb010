"""KV-cache compaction in place: the CPU kernel against the gather-from-a-copy PyTorch reference."""

import pytest
import torch

from dreamr import ops, reference
from dreamr.testing import misaligned_cache

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def random_cache(tensors, batch, heads, time, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, time, dim, generator=g).to(dtype) for _ in range(tensors)]


def clone(cache):
    return [t.clone() for t in cache]


def random_plan(g, batch, time, width=None, pad=-7):
    """A plan that meets the order rules: a sorted random subset of rows, in each a sorted random subset of
    positions; what follows a row's count is ``pad`` (never read)."""
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    rows = sorted(torch.randperm(batch, generator=g)[:pick(0, batch)].tolist())
    chosen = [sorted(torch.randperm(time, generator=g)[:pick(0, time)].tolist()) for _ in rows]
    counts = [len(c) for c in chosen]
    width = max(counts, default=0) if width is None else width
    columns = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, c in enumerate(chosen):
        columns[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long), columns, torch.tensor(counts, dtype=torch.long)


def assert_matches_reference(cache, plan, as_lists=False):
    expected = clone(cache)
    reference.kv_compact(expected, *plan)
    args = [p.tolist() for p in plan] if as_lists else plan
    assert ops.kv_compact(cache, *args) is None
    for got, want in zip(cache, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensors,batch,heads,time,dim", [(1, 1, 1, 1, 1), (6, 5, 2, 17, 8), (8, 8, 3, 40, 5)])
def test_random_plans_match_reference(dtype, tensors, batch, heads, time, dim):
    g = torch.Generator().manual_seed(tensors * 13 + batch)
    for case in range(4):
        cache = random_cache(tensors, batch, heads, time, dim, dtype, seed=case)
        assert_matches_reference(cache, random_plan(g, batch, time), as_lists=bool(case % 2))


def test_seeded_random_shapes_and_plans():
    """Seeded random B, H_kv, T, D, dtypes and plans, padded past the longest count with junk values."""
    g = torch.Generator().manual_seed(5)
    for case in range(16):
        pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        batch, heads, time, dim = pick(1, 7), pick(1, 3), pick(1, 24), pick(1, 9)
        cache = random_cache(pick(1, 5), batch, heads, time, dim, DTYPES[pick(0, 3)], seed=case)
        src_rows, columns, counts = random_plan(g, batch, time, pad=pick(-3, 10 ** 6))
        wider = torch.full((columns.shape[0], min(time, columns.shape[1] + pick(0, 3))), 99, dtype=torch.long)
        wider[:, :columns.shape[1]] = columns
        assert_matches_reference(cache, (src_rows, wider, counts))


def test_rows_move_up_and_entries_left_within_a_row():
    """Row 0 is released, row 1 loses a private column (a gap) and moves to row 0, row 2 is kept whole and
    moves to row 1, row 3 (with its own gap) stays where it is."""
    cache = random_cache(4, 4, 2, 9, 4, torch.bfloat16, seed=3)
    plan = (torch.tensor([1, 2, 3]), torch.tensor([[0, 1, 2, 4, 5, 6], [0, 1, 2, 3, 0, 0], [0, 2, 3, 4, 5, 8]]),
            torch.tensor([6, 4, 6]))
    original = clone(cache)
    assert_matches_reference(cache, plan)
    for got, want in zip(cache, original):
        assert torch.equal(got[0, :, :3], want[1, :, :3]) and torch.equal(got[0, :, 3:6], want[1, :, 4:7])
        assert torch.equal(got[1, :, :4], want[2, :, :4]) and not got[1, :, 4:6].any()  # the dead span zeroed
        assert torch.equal(got[2, :, 0], want[3, :, 0]) and torch.equal(got[2, :, 5], want[3, :, 8])
        assert torch.equal(got[:3, :, 6:], want[:3, :, 6:])  # past max(counts) = 6: not written
        assert torch.equal(got[3], want[3])  # rows past the plan's are left alone


def test_positions_past_the_longest_count_are_left_for_the_crop():
    cache = random_cache(2, 3, 1, 8, 2)
    original = clone(cache)
    ops.kv_compact(cache, [0, 2], [[1, 3, 0], [0, 4, 5]], [2, 3])
    for got, want in zip(cache, original):
        assert torch.equal(got[:, :, 3:], want[:, :, 3:])  # past max(counts) = 3: not written
        assert not got[0, :, 2].any()  # row 0's dead span [2, 3) is zeroed
        assert torch.equal(got[1, :, :3], want[2, :, [0, 4, 5]])


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_long_spans_at_any_alignment_match_reference(offset):
    # Dead spans and runs of several KiB (the streaming-store and memmove paths), the rows at 2-, 6- or
    # 16-byte-aligned addresses.
    batch, heads, time, dim = 3, 2, 160, 64
    cache = misaligned_cache(offset, batch, heads, time, dim)
    columns = torch.zeros(2, 150, dtype=torch.long)
    columns[0, :5] = torch.arange(5)
    columns[1] = torch.cat([torch.arange(3), torch.arange(13, 160)])  # one gap of 10, then a run of 147
    assert_matches_reference(cache, (torch.tensor([1, 2]), columns, torch.tensor([5, 150])))


@pytest.mark.parametrize("dim", [64, 1])
def test_a_row_moving_within_itself_over_its_own_entries(dim):
    """Rows that stay in place and close gaps: each run of entries moves left onto itself (overlapping
    source and destination), long runs (dim 64) and position-sized ones (dim 1) alike."""
    time = 160
    cache = random_cache(3, 2, 2, time, dim, torch.bfloat16, seed=dim)
    pad = torch.zeros(2, dtype=torch.long)  # W = T; the last two entries of each row are padding
    columns = torch.stack([torch.cat([torch.arange(3), torch.arange(5, time), pad]),
                           torch.cat([torch.arange(1, 40), torch.arange(41, time), pad])])
    counts = torch.tensor([time - 2, time - 2])
    assert_matches_reference(cache, (torch.tensor([0, 1]), columns, counts))


def test_strided_views_like_a_cropped_cache():
    """Views whose time axis is shorter than their storage (ragged batches pass their block views)."""
    storage = random_cache(4, 5, 3, 20, 8, dtype=torch.bfloat16, seed=9)
    cache = [t[1:, :, :13] for t in storage]  # [4, 3, 13, 8]: strided rows and time axis
    assert not cache[0].is_contiguous()
    tails = [t[:, :, 13:].clone() for t in storage]
    heads = [t[0].clone() for t in storage]
    g = torch.Generator().manual_seed(2)
    assert_matches_reference(cache, random_plan(g, 4, 13))
    for t, tail, head in zip(storage, tails, heads):
        assert torch.equal(t[:, :, 13:], tail) and torch.equal(t[0], head)  # storage past the view untouched


def test_empty_plans_write_nothing():
    cache = random_cache(2, 3, 1, 5, 2)
    original = clone(cache)
    ops.kv_compact(cache, [], [], [])
    ops.kv_compact(cache, [0, 1], [[], []], [0, 0])
    for got, want in zip(cache, original):
        assert torch.equal(got, want)


def as_tensors(plan):
    src_rows, columns, counts = plan
    return (torch.tensor(src_rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long).reshape(len(columns), -1),
            torch.tensor(counts, dtype=torch.long))


@pytest.mark.parametrize(
    "plan,message",
    [
        (([3], [[0]], [1]), r"src_rows\[0\] = 3 is not a row of the cache \[0, 3\)"),
        (([-1], [[0]], [1]), r"src_rows\[0\] = -1 is not a row of the cache"),
        (([1, 1], [[0], [0]], [1, 1]), r"src_rows must be strictly increasing .* got src_rows\[0\] = 1 then "
                                       r"src_rows\[1\] = 1"),
        (([2, 0], [[0], [0]], [1, 1]), r"src_rows must be strictly increasing"),
        (([0], [[0, 1]], [3]), r"counts\[0\] = 3 is outside \[0, W\] with W = 2"),
        (([0], [[0, 1]], [-1]), r"counts\[0\] = -1 is outside \[0, W\]"),
        (([0, 1], [[0, 6], [0, 0]], [2, 0]), r"columns\[0, 1\] = 6 is outside \[0, T\) with T = 6"),
        (([0], [[-2, 1]], [2]), r"columns\[0, 0\] = -2 is outside \[0, T\)"),
        (([0, 2], [[0, 1, 2], [3, 2, 4]], [3, 3]), r"columns\[1\] must be strictly increasing over its first "
                                                   r"counts\[1\] = 3 entries .* got columns\[1, 0\] = 3 then "
                                                   r"columns\[1, 1\] = 2"),
        (([0], [[1, 1]], [2]), r"columns\[0\] must be strictly increasing"),
        (([0, 1, 2, 0], [[0]] * 4, [1] * 4), r"src_rows must be \[B'\] with B' <= B = 3 .* got shape \[4\]"),
        (([0, 1], [[0]], [1, 1]), r"columns must be \[B', W\] with B' = 2 \(src_rows' length\) and W <= T = 6, "
                                  r"got shape \[1, 1\]"),
        (([0], [[0] * 7], [1]), r"columns must be \[B', W\] .* W <= T = 6, got shape \[1, 7\]"),
        (([0, 1], [[0], [0]], [1]), r"counts must be \[B'\] with B' = 2 \(src_rows' length\), got shape \[1\]"),
    ],
)
def test_rejects_bad_plans(plan, message):
    """Each order or range rule, as Python ints and as CPU tensors (the kernel's checks), and next to a
    meta cache standing in for CUDA (the host check, kv_compact_check, before the plan moves)."""
    for kind in ("lists", "tensors", "meta"):
        cache = random_cache(2, 3, 1, 6, 2)
        original = clone(cache)
        args = plan if kind == "lists" else as_tensors(plan)
        if kind == "meta":
            cache = [t.to("meta") for t in cache]
        with pytest.raises(ValueError, match=message):
            ops.kv_compact(cache, *args)
        if kind != "meta":
            for got, want in zip(cache, original):
                assert torch.equal(got, want)  # checked before anything is written


def test_rejects_bad_tensors():
    cache = random_cache(2, 3, 1, 6, 2)
    plan = (torch.tensor([0]), torch.tensor([[0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"kv_compact: src_rows must be torch.int64, got torch.int32"):
        ops.kv_compact(cache, plan[0].int(), *plan[1:])
    with pytest.raises(ValueError, match=r"kv_compact: columns must have 2 dimensions, got shape \[1\]"):
        ops.kv_compact(cache, plan[0], plan[1][0], plan[2])
    with pytest.raises(ValueError, match=r"kv_compact: counts must be contiguous"):
        ops.kv_compact(cache, torch.tensor([0, 1]), torch.tensor([[0], [0]]), torch.tensor([1, 9, 1, 9])[::2])
    with pytest.raises(ValueError, match=r"kv_compact: cache\[1\] has shape"):
        ops.kv_compact([cache[0], cache[1][:, :, :5].contiguous()], *plan)
    with pytest.raises(ValueError, match=r"kv_compact: cache\[1\] must be torch.float32, got torch.float64"):
        ops.kv_compact([cache[0], cache[1].double()], *plan)
    with pytest.raises(ValueError, match=r"kv_compact: cache\[0\] must be dense in its last \(head\) dimension"):
        ops.kv_compact([cache[0].transpose(2, 3)], *plan)
    with pytest.raises(ValueError, match=r"kv_compact: cache\[0\] has elements that share memory"):
        ops.kv_compact([torch.randn(1, 1, 6, 2).expand(3, 1, 6, 2)], *plan)
    with pytest.raises(ValueError, match=r"kv_compact: cache\[0\] must be \[B, H_kv, T, D\]"):
        ops.kv_compact([cache[0][0]], *plan)
    with pytest.raises(ValueError, match="kv_compact: cache is empty"):
        ops.kv_compact([], *plan)
    with pytest.raises(ValueError, match="kv_compact: cache must be a list of tensors"):
        ops.kv_compact(cache[0], *plan)
    with pytest.raises(ValueError, match="kv_compact: cache has 257 tensors, more than the 256"):
        ops.kv_compact([cache[0]] * 257, *plan)


@pytest.mark.parametrize(
    "plan,message",
    [
        (([0.5], [[0]], [1]), r"src_rows\[0\] must be an int, got float"),
        (([0], [[True]], [1]), r"columns\[0\]\[0\] must be an int, got bool"),
        (([0], [0], [1]), r"columns\[0\] must be a sequence of ints, got int"),
        (([0], 5, [1]), r"columns must be a sequence of sequences of ints, got int"),
        (([0, 1], [[0, 1], [0]], [1, 1]), r"columns's rows must all have the same length W .* got lengths \[2, 1\]"),
        (([0], [[0]], torch.tensor([1], device="meta")), r"counts is on meta but the cache is on cpu"),
        (([0], [[0]], torch.tensor([[1]])), r"counts must have 1 dimensions, got shape \[1, 1\]"),
    ],
)
def test_rejects_bad_python_arguments(plan, message):
    cache = random_cache(1, 2, 1, 6, 2)
    with pytest.raises(ValueError, match=message):
        ops.kv_compact(cache, *plan)


def test_host_plan_next_to_a_device_cache_is_checked_then_moved(monkeypatch):
    """Meta stands in for CUDA: a host plan (lists and CPU tensors) is checked on the host, then moved in
    one copy; a plan already on the cache's device is passed on unread (reading a meta tensor fails)."""
    cache = [t.to("meta") for t in random_cache(2, 3, 1, 6, 2)]
    ops.kv_compact(cache, [0, 2], torch.tensor([[0, 1], [2, 3]]), [2, 1])
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() on a device tensor"))
    device_plan = [torch.tensor(p, device="meta") for p in ([0, 2], [[0, 1], [2, 3]], [2, 1])]
    ops.kv_compact(cache, *device_plan)
    calls = []
    monkeypatch.setattr(torch.ops.dreamr, "kv_compact_check", lambda *a: calls.append(a))
    ops.kv_compact(cache, device_plan[0], [[0, 1], [2, 3]], [2, 1])  # mixed: nothing read, nothing checked
    assert not calls


def test_opcheck():
    cache = random_cache(2, 3, 1, 6, 2)
    torch.library.opcheck(torch.ops.dreamr.kv_compact_.default,
                          (cache, torch.tensor([0, 2]), torch.tensor([[1, 3], [0, 5]]), torch.tensor([2, 1])))
