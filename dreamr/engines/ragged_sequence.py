"""A sequential engine's sequence in preallocated storage, so that its one-token decode replays a CUDA graph.

The sequential modes ("target", "draft", "token", "speculative") decode each model through one sequence
(:class:`dreamr.cache.CachedSequence` over transformers' ``DynamicCache``, which grows by ``torch.cat``
and so cannot be captured). :class:`RaggedSequence` has the same interface over a one-row
:class:`~dreamr.engines.ragged.RaggedBatch`, whose storage is written in place: its one-token forwards
go through :class:`~dreamr.engines.decode_graphs.DecodeGraphs`, the bucketed CUDA graphs FPSR's
branches and draft replay, and every other forward (a prefill, a proposal checked by token-level
speculation, a verification) runs eagerly on the same storage. On a CPU the bucketed forward runs eagerly
(``capture=False``): that is how the tests hold it to ``CachedSequence`` without a GPU.

A :class:`SequencePool` keeps a model's batches (storage and captured graphs) from request to request and
lends each to one sequence at a time; a batch comes back when its sequence is gone (the engine's run ended
and dropped it).
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from dreamr.cache import SequenceIds
from dreamr.engines.decode_graphs import DecodeGraphs
from dreamr.engines.ragged import MIN_COLUMNS, KVStore, RaggedBatch
from dreamr.lm import LM

__all__ = ["RaggedSequence", "SequencePool"]


class RaggedSequence(SequenceIds):
    """:class:`dreamr.cache.CachedSequence`'s interface over a one-row :class:`RaggedBatch` (``extend``,
    ``truncate`` and ``uncache_to`` from :class:`dreamr.cache.SequenceIds`, as there).

    ``ids`` is the committed token sequence; the batch's row holds the keys and values of its first
    ``cached`` tokens (and, after :meth:`logits_over` or :meth:`last_hidden`, of the extra tokens fed
    there until the caller rolls them back, exactly as with ``CachedSequence``). The row's own ids are the
    cached tokens; the pending ones (``ids[cached:]``) join it at the next forward.

    Parameters
    ----------
    batch : RaggedBatch
        An empty batch lent to this sequence alone (:meth:`SequencePool.open`); its ``graphs``, where set,
        replay the one-token forwards.
    ids : sequence of int
        The prompt's token ids.
    prefix : dreamr.cache.ImagePrefix, optional
        A prompt with images, encoded once: its cache is copied into the row, never rolled back.
    longest : int
        The most tokens the sequence will hold (prompt, new tokens, a step's verdict prompt and proposal):
        the storage is reserved for it up front where graphs run, so that growing it does not drop and
        recapture them mid-request.

    Examples
    --------
    >>> from dreamr.testing import target_tokenizer, tiny_llama
    >>> from dreamr.lm import LM
    >>> tok = target_tokenizer()
    >>> lm = LM(tiny_llama(tok), tok, "target")
    >>> seq = SequencePool(lm, "target", capture=False).open(tok.encode("2 + 2 ="))
    >>> seq.next_logits().shape == (lm.model.config.vocab_size,)
    True
    """

    def __init__(self, batch: RaggedBatch, ids: Sequence[int], *, prefix=None, longest: int = 0):
        self.batch = batch
        self.model = batch.lm.model
        self.device = batch.device
        self.ids: list[int] = [int(t) for t in ids]
        self.forward_passes = 0
        if prefix is not None and self.ids[:len(prefix.ids)] != list(prefix.ids):
            raise ValueError("RaggedSequence: ids must start with the image prefix's ids")
        if batch.graphs is not None and longest > 0:
            # a one-row batch compacts at its next forward after every rollback, so its width never passes
            # its longest length; the graphs' width bucket is the next power of two above the width
            batch.reserve(1, max(MIN_COLUMNS, 1 << int(longest).bit_length()))
        self.row = batch.add(self.ids[:prefix.cached] if prefix is not None else [], prefix=prefix)

    @property
    def cached(self) -> int:
        return self.row.cached

    @property
    def min_cached(self) -> int:
        """Positions that are never rolled back (an image prefix's)."""
        return self.row.floor

    def _drop_cached(self, length: int) -> None:
        self.batch.truncate(self.row, length)

    def _sync(self) -> None:
        """Before a forward: the row stands for ``ids`` (its cached tokens, then the pending ones)."""
        row = self.row
        if row.cached > len(self.ids):
            raise RuntimeError(f"RaggedSequence: {row.cached} positions cached past the {len(self.ids)} ids; roll "
                               "back what logits_over / last_hidden fed (uncache_to) before the next forward")
        del row.ids[row.cached:]
        row.ids.extend(self.ids[row.cached:])

    def next_logits(self) -> torch.Tensor:
        """Feed the pending tokens; return the next-token logits, shape ``[V]``."""
        if not self.ids:
            raise ValueError("next_logits: the sequence is empty")
        return self.logits_over(())[0]

    def logits_over(self, extra: Sequence[int]) -> torch.Tensor:
        """Feed the pending tokens plus ``extra`` in one forward; the logits at the last pending position
        and at each of ``extra``, shape ``[len(extra) + 1, V]`` (as :meth:`CachedSequence.logits_over`: the
        cache then holds ``extra`` too, the caller rolls back what it does not keep)."""
        if not self.ids:
            raise ValueError("logits_over: the sequence is empty")
        self._sync()
        extra = [int(t) for t in extra]
        logits = self.batch.next_token_logits([self.row], [extra])  # [K + 1, V]
        self.forward_passes += 1
        return logits

    @torch.no_grad()
    def last_hidden(self, extra: Sequence[int]) -> torch.Tensor:
        """Feed the pending tokens plus ``extra`` through the decoder; the final hidden state at the last
        position, shape ``[1, H]`` (no LM head). The cache then holds ``extra`` too: the caller rolls it
        back."""
        if not self.ids:
            raise ValueError("last_hidden: the sequence is empty")
        self._sync()
        extra = [int(t) for t in extra]
        if not extra and not self.row.pending:  # the output at the last committed token: feed it again
            self.batch.uncache_to(self.row, self.row.cached - 1)
        out = self.batch.forward({self.row: [(extra, True)] if extra else []})
        self.forward_passes += 1
        return out[self.row][0][None].contiguous()


class SequencePool:
    """A model's one-row batches for :class:`RaggedSequence`: their storage and CUDA graphs are kept from
    request to request, each batch lent to one sequence at a time.

    Parameters
    ----------
    lm : dreamr.lm.LM
    name : str
        For messages ("target", "draft").
    capture : bool, optional
        Capture CUDA graphs (default: on a CUDA device); False runs the bucketed forward eagerly.
    keep : int
        At most this many batches are kept (sequences open at once beyond that get a batch of their own,
        dropped with them).
    """

    def __init__(self, lm: LM, name: str, capture: Optional[bool] = None, keep: int = 4):
        self.lm, self.name, self.capture, self.keep = lm, name, capture, int(keep)
        self._batches: list[tuple[RaggedBatch, Optional[weakref.ref]]] = []
        self._last: Optional[RaggedBatch] = None  # the batch of the sequence opened last (stats)

    def open(self, ids: Sequence[int], *, prefix=None, longest: int = 0) -> RaggedSequence:
        """A new sequence of ``ids`` (on ``prefix``, an image prompt's cache) on a batch no other holds."""
        for i, (batch, holder) in enumerate(self._batches):
            if holder is None or holder() is None:
                break
        else:
            batch = RaggedBatch(self.lm, self.name, store=KVStore(self.lm, least_rows=1))
            batch.graphs = DecodeGraphs(batch, (1,), capture=self.capture)
            i = len(self._batches)
            if i < self.keep:
                self._batches.append((batch, None))
        batch.reset()
        batch.graphs.reset_stats()
        seq = RaggedSequence(batch, ids, prefix=prefix, longest=longest)
        if i < len(self._batches):
            self._batches[i] = (batch, weakref.ref(seq))
        self._last = batch
        return seq

    def stats(self) -> dict:
        """The decode-graph counters (:attr:`DecodeGraphs.stats`) of the sequence opened last; empty before
        the first."""
        return dict(self._last.graphs.stats) if self._last is not None else {}
