"""dreamr.cache: rollback through the core op, and CachedSequence, held to a fresh prefill."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_gemma3
from dreamr.cache import CachedSequence, cache_kwarg, cache_length, cache_tensors, new_cache, rollback


def prefill(model, ids):
    cache = new_cache()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg(model): cache})
    return cache, out.logits[0, -1]


def assert_same_cache(a, b, atol=1e-10):
    ta, tb = cache_tensors(a), cache_tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def assert_matches_prefill(seq: CachedSequence):
    """The sequence's cache equals a fresh prefill of its cached prefix, and its next-token logits equal a
    fresh prefill of all its ids (checked on a copy, so ``seq`` is left as it was).

    The committed token ids are the truth (the text is their decode): the engines re-tokenize the other
    model's steps one at a time, so ``seq.ids`` can differ from a re-tokenization of the joined text, and
    "the cache equals a fresh prefill of the committed text" means a prefill of these ids."""
    fresh, _ = prefill(seq.model, seq.ids[: seq.cached])
    assert cache_length(seq.cache) == seq.cached
    if seq.cached:
        assert_same_cache(seq.cache, fresh)
    probe = CachedSequence(seq.model, seq.ids)
    probe.cache = copy.deepcopy(seq.cache)
    _, want = prefill(seq.model, seq.ids)
    torch.testing.assert_close(probe.next_logits(), want, atol=1e-9, rtol=0)


@pytest.fixture(params=["llama", "gemma3"])
def model(request, target_model, tok_a):
    return target_model if request.param == "llama" else tiny_gemma3(tok_a)


def test_rollback_equals_fresh_prefill(model):
    ids = list(range(5, 25))
    cache, _ = prefill(model, ids)
    for keep in (15, 9, 9, 1):
        rollback(cache, keep)
        assert cache_length(cache) == keep
        fresh, _ = prefill(model, ids[:keep])
        assert_same_cache(cache, fresh)
        # decoding on from the rolled-back cache gives the fresh prefill's logits
        probe = copy.deepcopy(cache)
        with torch.no_grad():
            got = model(input_ids=torch.tensor([ids[keep:keep + 3]]), use_cache=True,
                        **{cache_kwarg(model): probe}).logits[0, -1]
        _, want = prefill(model, ids[: keep + 3])
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_rollback_twice_without_update_handles_cropped_views(target_model):
    cache, _ = prefill(target_model, list(range(3, 15)))
    rollback(cache, 10)  # crop leaves strided views
    rollback(cache, 6)  # the op needs contiguous tensors: made so, not an error
    fresh, _ = prefill(target_model, list(range(3, 9)))
    assert_same_cache(cache, fresh)


def test_rollback_bad_lengths(target_model):
    cache, _ = prefill(target_model, list(range(3, 10)))
    with pytest.raises(ValueError, match="lengths"):
        rollback(cache, 8)
    with pytest.raises(ValueError, match="lengths"):
        rollback(cache, -1)
    with pytest.raises(ValueError, match="batch size"):
        rollback(cache, [3, 3])
    with pytest.raises(ValueError, match="empty"):
        rollback(new_cache(), 2)
    rollback(new_cache(), 0)  # nothing to do


def test_rollback_refuses_sliding_window_layers(tok_a):
    model = tiny_gemma3(tok_a)
    cache = DynamicCache(config=model.config)  # sliding layers drop old positions
    with torch.no_grad():
        model(input_ids=torch.tensor([list(range(3, 13))]), use_cache=True, **{cache_kwarg(model): cache})
    with pytest.raises(ValueError, match="sliding"):
        rollback(cache, 5)


def test_cached_sequence_truncate_extend(target_model):
    seq = CachedSequence(target_model, list(range(3, 12)))
    seq.next_logits()
    assert seq.cached == 9 and seq.forward_passes == 1
    seq.extend([40, 41, 42])
    seq.next_logits()
    assert seq.cached == 12
    assert_matches_prefill(seq)
    seq.truncate(7)
    assert seq.cached == 7 and len(seq.ids) == 7
    assert_matches_prefill(seq)  # nothing pending: the last token is re-fed
    seq.extend([50])
    seq.uncache_to(4)
    assert seq.cached == 4
    assert_matches_prefill(seq)
    with pytest.raises(ValueError, match="truncate"):
        seq.truncate(99)


def test_last_hidden_matches_full_model_hidden_states(target_model):
    seq = CachedSequence(target_model, list(range(3, 9)))
    seq.next_logits()
    h = seq.last_hidden([20, 21, 22])
    assert h.shape == (1, target_model.config.hidden_size)
    with torch.no_grad():
        ref = target_model(input_ids=torch.tensor([list(range(3, 9)) + [20, 21, 22]]),
                           output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(h, ref, atol=1e-10, rtol=0)
    assert seq.cached == 9  # the extra tokens are in the cache until the caller rolls them back


def test_last_hidden_needs_a_decoder_and_never_forms_full_logits(target_model):
    from dreamr.cache import decoder_of

    assert decoder_of(target_model) is target_model.base_model

    class HeadOnly(torch.nn.Module):  # a causal LM with no decoder module apart from itself
        def forward(self, input_ids, **kwargs):
            raise AssertionError("the full model must not run for hidden states")

    with pytest.raises(ValueError, match="HeadOnly: no decoder module"):
        decoder_of(HeadOnly())

    class Wrapped(torch.nn.Module):  # no base_model / get_decoder: found as .model
        def __init__(self):
            super().__init__()
            self.model = target_model.model

    assert decoder_of(Wrapped()) is target_model.model


def test_logits_over_equals_fresh_prefills_and_refeeds_the_last_token(model):
    ids, extra = list(range(3, 10)), [20, 21, 22]
    seq = CachedSequence(model, ids)
    seq.next_logits()
    assert seq.cached == len(ids)  # everything cached: the last committed token is fed again
    rows = seq.logits_over(extra)
    assert rows.shape == (len(extra) + 1, model.config.vocab_size)
    for i in range(len(extra) + 1):
        _, want = prefill(model, ids + extra[:i])
        torch.testing.assert_close(rows[i], want, atol=1e-9, rtol=0)
    assert seq.cached == len(ids) + len(extra) and seq.ids == ids and seq.forward_passes == 2
    seq.uncache_to(len(ids) - 1)  # the caller keeps nothing of the proposal
    seq.extend([extra[0]])  # two pending tokens, then a proposal of one
    rows = seq.logits_over(extra[1:2])
    for i, prefix in enumerate([ids + extra[:1], ids + extra[:2]]):
        torch.testing.assert_close(rows[i], prefill(model, prefix)[1], atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="logits_over: the sequence is empty"):
        CachedSequence(model, []).logits_over([1])
    with pytest.raises(ValueError, match="next_logits: the sequence is empty"):
        CachedSequence(model, []).next_logits()
