"""RaggedBatch.compact on a tiny model: released rows and private columns closed by one ops.kv_compact call
for every layer, each live row's cache still a fresh prefill of its ids; a no-op kv_compact breaks it."""

import pytest
import torch

from dreamr import ops, reference
from dreamr.engines import ragged
from dreamr.engines.ragged import RaggedBatch


def fresh(lm, ids, n):
    batch = RaggedBatch(lm, "fresh")
    row = batch.add(ids)
    batch.forward({row: []})
    return batch.dense(row, n)


def assert_rows_are_fresh_prefills(lm, batch):
    for row in batch.rows:
        for (k, v), (k0, v0) in zip(batch.dense(row, row.cached), fresh(lm, row.ids, row.cached)):
            torch.testing.assert_close(k, k0, atol=1e-12, rtol=0)
            torch.testing.assert_close(v, v0, atol=1e-12, rtol=0)


def run_compaction(lm):
    """Four rows, one released, three with private (verdict) columns between their entries: after the
    compaction each live row is left-aligned in its new row, its dead span up to the width zeroed, and a
    further forward over the compacted storage still equals a fresh prefill."""
    batch = RaggedBatch(lm, "chains")
    rows = [batch.add([3 + i + 5 * k for i in range(4 + k)]) for k in range(4)]
    batch.forward({rows[0]: [([40, 41], False)], rows[1]: [], rows[2]: [([42], False), ([7, 8], True)],
                   rows[3]: [([43, 44, 45], False), ([9], True)]})
    batch.release(rows[1])
    gaps = int((~batch.valid).sum())
    assert gaps > 0
    batch.compact()
    live = [rows[0], rows[2], rows[3]]
    assert batch.rows == live and [r.index for r in live] == [0, 1, 2]
    assert batch.width == max(r.cached for r in live) and bool(batch.valid.sum() == sum(r.cached for r in live))
    for t in batch.keys + batch.values:
        for r in live:
            assert not t[r.index, :, r.cached:batch.width].any()  # the dead span is zeroed, not stale
    assert_rows_are_fresh_prefills(lm, batch)
    rows[0].ids += [11, 12]
    batch.forward({rows[0]: [], rows[3]: [([13], True)]})
    assert_rows_are_fresh_prefills(lm, batch)


def test_compaction_keeps_every_row_a_fresh_prefill(reasoner, monkeypatch):
    lm = reasoner.engine("fpsr").target
    calls = []
    real = ops.kv_compact
    monkeypatch.setattr(ops, "kv_compact", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_compaction(lm)
    assert calls  # the compaction went through the op
    monkeypatch.setattr(ops, "kv_compact", lambda *a, **k: None)
    with pytest.raises(AssertionError):
        run_compaction(lm)


def test_compaction_moves_no_entry_outside_the_compiled_op(reasoner, monkeypatch):
    """Every KV move of a compaction is the kv_compact call: no index_select or gather on the storage."""
    lm = reasoner.engine("fpsr").target
    batch = RaggedBatch(lm, "chains")
    a, b = batch.add([3, 4, 5, 6]), batch.add([7, 8, 9])
    batch.forward({a: [([40, 41], False)], b: []})
    batch.release(b)
    for name in ("gather", "index_select"):
        monkeypatch.setattr(torch, name, lambda *x, _n=name, **k: pytest.fail(f"torch.{_n} in compact"))
        monkeypatch.setattr(torch.Tensor, name, lambda *x, _n=name, **k: pytest.fail(f"Tensor.{_n} in compact"))
    batch.compact()
    monkeypatch.undo()
    assert_rows_are_fresh_prefills(lm, batch)


def test_layer_groups_cover_every_tensor_once():
    """More than ops.MAX_CACHE_TENSORS tensors, in two layouts: several op calls, each tensor compacted."""
    g = torch.Generator().manual_seed(0)
    storage = [torch.randn(4, 2, 7, 3, generator=g) for _ in range(ops.MAX_CACHE_TENSORS + 9)]
    tensors = storage[:-4] + [t[:, :, :6] for t in storage[-4:]]  # cropped views: a second group
    groups = ragged._layer_groups(tensors)
    assert sorted(len(grp) for grp in groups) == [4, 5, ops.MAX_CACHE_TENSORS]
    plan = (torch.tensor([1, 3]), torch.tensor([[0, 2, 5], [1, 4, 0]]), torch.tensor([3, 2]))
    expected = [t.clone() for t in tensors]
    reference.kv_compact(expected, *plan)
    ragged._kv_compact(tensors, *plan)
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want)
