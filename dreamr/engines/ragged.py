"""A batched KV cache with ragged rows, in preallocated storage: what the FPSR executor runs its models on.

Every row of a :class:`RaggedBatch` is one sequence (a request's target chain, a fallback branch, a
request's draft). The rows share one set of per-layer storage tensors ``[R, H_kv, L, D]`` (R rows and L
columns of capacity); columns ``[0, width)`` are in use. Each row keeps, per column, a validity flag and the
logical position of the token cached there, so rows of different lengths, rows that were rolled back and
rows fed private tokens (verdict prompts) live side by side:

- a forward feeds each row a different number of tokens (padded to the longest) at columns
  ``[width, width + S)`` with explicit ``position_ids`` and a 4-D attention mask built from the flags and
  positions (causal by position, per-row sliding windows by position, private segments seen only by
  themselves), so any model whose forward takes a prepared 4-D mask works (Llama, Qwen2, Gemma 3,
  Mistral); which layers slide, and how far, is :attr:`dreamr.lm.LM.attention_layout` (a layout these
  masks cannot reproduce, such as chunked attention, is refused there with a ValueError);
- rolling a row back clears its flags and erases the dropped entries from the storage; a released row
  is dropped and the batch compacted (one :func:`dreamr.ops.kv_compact` call for every layer, in place)
  before the next forward; a fork or a move copies a row's prefix into a new row.

The storage belongs to a :class:`KVStore`: one set of per-layer tensors per model, in which each batch of
that model owns a block of rows. The target's batches of mode "fpsr" (chains, branches, parked) share
one store, so a row's cache passes from one batch to another inside one tensor: forks, moves and
truncations are :func:`dreamr.ops.kv_rollback` calls, compaction (a row's entries move left within the
row itself and rows move up over released ones, which a row-to-row copy cannot express) a
:func:`dreamr.ops.kv_compact` call; each covers every layer in one call (see ``docs/architecture.md``,
mode "fpsr", hop 10). Every move of entries inside the storage goes through those two compiled ops; what
is plain ``copy_`` is growing the storage (the old tensors copied whole into the new ones) and copying an
image prefix in from its own cache.

Host inputs (ids, positions, masks, index plans) reach a CUDA device through pinned memory
(:func:`host_to_device`), so that no copy waits for the stream.

The storage is written in place (:class:`RaggedKVLayer`), never reallocated except to grow, so a decode
forward (one token per row) has fixed tensor addresses for a given batch size and column bucket: that is
what lets :class:`dreamr.engines.decode_graphs.DecodeGraphs` capture it as a CUDA graph.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from dreamr import ops
from dreamr.cache import cache_kwarg
from dreamr.lm import LM, eager_attention, lm_head_of

__all__ = ["KVStore", "RaggedBatch", "RaggedKVLayer", "Row", "copy_from_host", "host_to_device"]

MIN_COLUMNS = 64  # first storage width (it doubles when outgrown); also the narrowest graph width bucket


class Row:
    """One sequence in a :class:`RaggedBatch`: ``ids`` it stands for, the first ``cached`` in the cache."""

    __slots__ = ("ids", "cached", "batch", "index", "alive", "owner", "offset", "floor")

    def __init__(self, ids: Sequence[int], owner=None):
        self.ids: list[int] = [int(t) for t in ids]
        self.cached = 0
        self.batch: Optional["RaggedBatch"] = None
        self.index = -1
        self.alive = True
        self.owner = owner  # the request index (metrics)
        self.offset = 0  # rotary position of the token at index i is i + offset (an image prefix's; 0 for text)
        self.floor = 0  # positions below this (an image prefix) are never rolled back

    @property
    def pending(self) -> list[int]:
        return self.ids[self.cached:]


class RaggedKVLayer(CacheLayerMixin):
    """One layer's cache for one forward of a :class:`RaggedBatch`: views of the batch's storage.

    ``keys``/``values`` are ``[B, H_kv, width + S, D]`` views; ``update`` writes the forward's S new
    columns at ``write_cols`` ``[S]`` in place (``index_copy_``: no reallocation, so CUDA graphs can replay
    it) and returns the views. ``past`` is the width before the forward (what the model's own mask
    builder needs when no 4-D mask is given).
    """

    # False, as DynamicLayer: True makes transformers materialise a mask for one-token forwards where it
    # lets sdpa run unmasked, which changes kernels and bf16 roundings against mode "speculative"
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_cols: torch.Tensor, past: int):
        super().__init__()
        self.keys, self.values, self.write_cols, self.past = keys, values, write_cols, past
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # storage is preallocated
        raise RuntimeError("RaggedKVLayer is built over existing storage")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[1] != self.keys.shape[1] or key_states.shape[3] != self.keys.shape[3] \
                or value_states.shape[3] != self.values.shape[3]:
            raise ValueError(f"RaggedBatch: the model's keys are {tuple(key_states.shape)} but the storage was sized "
                             f"from its config as [B, {self.keys.shape[1]}, T, {self.keys.shape[3]}] (num_key_value_heads"
                             ", head_dim); this model's attention layout is not supported by mode 'fpsr'")
        self.keys.index_copy_(2, self.write_cols, key_states)
        self.values.index_copy_(2, self.write_cols, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.past + query_length, 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


def _grown(have: int, need: int, least: int) -> int:
    """A capacity of at least ``need``: doubling ``have`` (amortised growth), never below ``least``."""
    if need <= have:
        return have
    return max(need, 2 * have, least)


def host_to_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host tensors on ``device``, copied on the current stream. On CUDA each is staged through pinned
    memory and copied without blocking the host (a copy from pageable memory waits for the stream); the
    caching host allocator keeps a pinned block until the copy that reads it has run."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a host ``src``; into a CUDA ``dst`` staged through pinned memory without
    blocking the host (see :func:`host_to_device`)."""
    if dst.device.type == "cuda":
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)


def _layer_groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` split into the groups one compiled KV op takes: one shape, layout and dtype each, at most
    ``ops.MAX_CACHE_TENSORS`` tensors (as ``dreamr.cache.rollback`` groups); one group for a store's layers
    of up to 128 layers."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((tuple(t.shape), t.stride(), t.dtype), []).append(t)
    return [group[start:start + ops.MAX_CACHE_TENSORS] for group in groups.values()
            for start in range(0, len(group), ops.MAX_CACHE_TENSORS)]


def _kv_rollback(tensors: list[torch.Tensor], lengths: list[int], src_row: list[int], src_start: list[int],
                 length: list[int]) -> None:
    """:func:`dreamr.ops.kv_rollback` over ``tensors`` (all ``[R, H_kv, T, D]``), one call per group."""
    for group in _layer_groups(tensors):
        ops.kv_rollback(group, lengths, copy_src_row=src_row, copy_src_start=src_start, copy_length=length)


def _kv_compact(tensors: list[torch.Tensor], src_rows: torch.Tensor, columns: torch.Tensor,
                counts: torch.Tensor) -> None:
    """:func:`dreamr.ops.kv_compact` over ``tensors`` (all ``[R, H_kv, T, D]``) with a host plan
    (``src_rows [B']``, ``columns [B', W]``, ``counts [B']``, int64 CPU tensors), one call per group."""
    for group in _layer_groups(tensors):
        ops.kv_compact(group, src_rows, columns, counts)


class KVStore:
    """The KV storage of one model, shared by the :class:`RaggedBatch` objects that pass rows to each other.

    Per layer one key and one value tensor ``[R, H_kv, L, D]`` (zeros where never written); each attached
    batch owns the rows ``[batch.base_row, batch.base_row + batch.row_capacity)`` and all share the L columns.
    Growing any block or the columns reallocates the whole storage (doubling, contents kept) and bumps
    ``version`` (captured CUDA graphs of every batch go stale).

    Parameters
    ----------
    lm : dreamr.lm.LM
        The model; its KV layout (layers, KV heads, head size), device and dtype size the storage.
    stream : torch.cuda.Stream, optional
        Where the storage and every attached batch's device work live.
    least_rows : int
        The fewest rows a block grows to (FPSR's batches: 4; a one-row sequence's: 1).
    """

    def __init__(self, lm: LM, stream=None, least_rows: int = 4):
        self.lm, self.stream, self.least_rows = lm, stream, int(least_rows)
        self.num_layers, self.kv_heads, self.head_dim = lm.num_layers, lm.num_kv_heads, lm.head_dim
        self.device, self.dtype = lm.device, lm.dtype
        self.keys: list[torch.Tensor] = []  # per layer [R, H_kv, L, D]
        self.values: list[torch.Tensor] = []
        self.columns = 0
        self.version = 0
        self.batches: list["RaggedBatch"] = []

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def attach(self, batch: "RaggedBatch") -> None:
        """Give ``batch`` a block (empty until it reserves rows)."""
        batch.base_row, batch.row_capacity = self.rows, 0
        self.batches.append(batch)
        batch.keys, batch.values = self._views(batch)

    def _views(self, batch: "RaggedBatch") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        lo, hi = batch.base_row, batch.base_row + batch.row_capacity
        return [k[lo:hi] for k in self.keys], [v[lo:hi] for v in self.values]

    def reserve(self, batch: "RaggedBatch", rows: int, columns: int) -> None:
        """Grow (doubling) so that ``batch``'s block holds ``rows`` rows and the storage ``columns``
        columns; what every batch has in use is kept."""
        if self.keys and rows <= batch.row_capacity and columns <= self.columns:
            return
        capacity = {id(b): b.row_capacity for b in self.batches}
        capacity[id(batch)] = _grown(batch.row_capacity, rows, self.least_rows)
        L2 = _grown(self.columns, columns, MIN_COLUMNS)
        shape = (sum(capacity.values()), self.kv_heads, L2, self.head_dim)
        # not inference tensors even when reserved under torch.inference_mode: the storage outlives the call
        # (kept from run to run) and is written in place by later ones, which may run outside it
        with self.on_stream(), torch.inference_mode(False):
            # zeros, not empty: masked columns still meet the value matrix (0 * NaN would poison a row)
            keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
            values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
            base = 0
            for b in self.batches:
                B, T = len(b.rows), b.width
                if self.keys and B and T:
                    for new, old in zip(keys + values, self.keys + self.values):
                        new[base:base + B, :, :T].copy_(old[b.base_row:b.base_row + B, :, :T])
                b.base_row, b.row_capacity = base, capacity[id(b)]
                base += b.row_capacity
        self.keys, self.values, self.columns = keys, values, L2
        self.version += 1
        for b in self.batches:
            b.keys, b.values = self._views(b)

    @contextlib.contextmanager
    def on_stream(self):
        """This store's stream made current, after the caller's queued work; nothing without a stream."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        if caller != self.stream:
            self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield

    def rollback(self, columns: int, keep: dict[int, int], copies: Optional[dict[int, tuple[int, int, int]]] = None
                 ) -> None:
        """One :func:`dreamr.ops.kv_rollback` over every row of the storage, columns ``[0, columns)``.

        ``keep`` maps a storage row to the columns it keeps (``[0, keep)``; the rest up to ``columns`` is
        zeroed); ``copies`` maps a storage row to ``(src_row, src_start, n)``: it then receives the source's
        columns ``[src_start, src_start + n)`` at its kept length. Every other row keeps all ``columns``
        (so the zeroed span always reaches ``columns``). A source must not receive a copy itself.
        """
        R = self.rows
        lengths, src, start, length = [columns] * R, [-1] * R, [0] * R, [0] * R
        for row, n in keep.items():
            lengths[row] = n
        for row, (s, first, n) in (copies or {}).items():
            src[row], start[row], length[row] = s, first, n
        with self.on_stream():
            _kv_rollback([t[:, :, :columns] for t in self.keys + self.values], lengths, src, start, length)


class RaggedBatch:
    """A batched KV cache with ragged rows (see the module docstring).

    Parameters
    ----------
    lm : dreamr.lm.LM
        The model (a causal LM whose decoder takes ``position_ids`` and a 4-D mask). Its attention layout
        (:attr:`dreamr.lm.LM.attention_layout`) must be one these masks reproduce: ValueError otherwise.
    name : str
        For messages and tests ("chains", "branches", "parked", "drafts").
    stream : torch.cuda.Stream, optional
        Where this batch's device work runs (the FPSR draft runs on its own stream); every tensor of the
        batch is allocated and used there. Taken from ``store`` where one is given.
    store : KVStore, optional
        The storage to take a block of; rows are copied only between batches of one store. Default: a
        store of its own.
    """

    def __init__(self, lm: LM, name: str = "", *, stream=None, store: Optional[KVStore] = None):
        self.lm, self.name = lm, name
        self.layout = lm.attention_layout  # ValueError for attention these masks cannot reproduce
        self.base = lm.decoder
        self._cache_kw = cache_kwarg(self.base)
        self.additive_mask = eager_attention(lm.model)
        self.head = lm_head_of(lm.model)
        self.device, self.dtype = lm.device, lm.dtype
        if store is None:
            store = KVStore(lm, stream)
        elif store.lm is not lm or (stream is not None and stream != store.stream):
            raise ValueError(f"RaggedBatch {name!r}: store belongs to another model or stream; give batches of one "
                             "model and one stream the same KVStore")
        self.store, self.stream = store, store.stream
        self.rows: list[Row] = []
        # this batch's block of the store's per-layer [R, H_kv, L, D] storage, set by the store (views);
        # rows [0, len(rows)) and columns [0, width) in use
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.base_row, self.row_capacity = 0, 0  # the block: storage rows [base_row, base_row + row_capacity)
        store.attach(self)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [B, width] on the host
        self.pos = torch.zeros(0, 0, dtype=torch.long)  # [B, width] logical positions, -1 where invalid
        self.graphs = None  # a DecodeGraphs runs one-token-per-row forwards (CUDA graphs) when set
        self._dirty = False

    # -- structure -----------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) the storage holds without growing."""
        return (self.row_capacity, self.store.columns) if self.keys else (0, 0)

    @property
    def storage_version(self) -> int:
        """Bumped when the storage is reallocated (captured graphs go stale)."""
        return self.store.version

    def on_stream(self):
        """A context that makes this batch's stream current, after the work already queued on the caller's
        stream (so inputs made there are ready); nothing on a CPU or without a stream."""
        return self.store.on_stream()

    def reserve(self, rows: int, columns: int) -> None:
        """Grow the storage (doubling) so that it holds ``rows`` x ``columns``; what is in use is kept."""
        self.store.reserve(self, rows, columns)

    def reset(self) -> None:
        """Drop every row (between runs); the storage and any captured graphs are kept for the next."""
        for row in self.rows:
            row.alive, row.batch = False, None
        self.rows = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self.pos = torch.zeros(0, 0, dtype=torch.long)
        self._dirty = False

    def live_tokens(self) -> int:
        """Cached positions over all live rows (what the batch really holds)."""
        return int(sum(r.cached for r in self.rows if r.alive))

    def dense(self, row: Row, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of ``row``'s first ``n`` cached positions, each ``[1, H_kv, n, D]`` (a copy, for
        inspection: rows pass between batches with :meth:`add` / :meth:`fork` / :meth:`move`)."""
        assert row.batch is self and row.alive and n <= row.cached
        b = row.index
        cols = torch.nonzero(self.valid[b] & (self.pos[b] < n)).flatten()
        assert cols.numel() == n, (cols.numel(), n)
        with self.on_stream():
            (cols,) = host_to_device(self.device, cols)
            return [(k[b:b + 1].index_select(2, cols), v[b:b + 1].index_select(2, cols))
                    for k, v in zip(self.keys, self.values)]

    def _span(self, row: Row, n: int) -> int:
        """Columns ``[0, span)`` of ``row`` hold its first ``n`` cached positions (and only gaps besides):
        a row's valid entries lie in position order along the columns."""
        kept = torch.nonzero(self.valid[row.index] & (self.pos[row.index] < n)).flatten()
        assert kept.numel() == n, (kept.numel(), n)
        return int(kept[-1]) + 1 if n else 0

    def add(self, ids: Sequence[int], *, src: Optional[Row] = None, cached: int = 0, owner=None,
            prefix=None) -> Row:
        """A new row standing for ``ids``; its first ``cached`` positions are copied from ``src``'s (a row of
        a batch on the same :class:`KVStore`: one :func:`dreamr.ops.kv_rollback` call for all layers), or
        from ``prefix`` (a :class:`dreamr.cache.ImagePrefix`: an image prompt encoded once, whose
        position offset the row keeps; forks and moves carry it on)."""
        row = Row(ids, owner)
        kv, span = None, cached
        if src is not None:
            if cached < src.floor:
                raise ValueError(f"add: copying {cached} positions would cut into the source's image prefix "
                                 f"({src.floor} positions)")
            if src.batch.store is not self.store:
                raise ValueError(f"add: the source row is in batch {src.batch.name!r} on another KVStore than "
                                 f"{self.name!r}; rows are copied only between batches of one store")
            row.offset, row.floor = src.offset, src.floor
            span = src.batch._span(src, cached) if cached > 0 else 0
        elif prefix is not None:
            if list(ids[:prefix.cached]) != list(prefix.ids[:prefix.cached]):
                raise ValueError(f"add: the row's ids do not start with its image prefix's {prefix.cached} ids")
            kv = [(layer.keys, layer.values) for layer in prefix.cache.layers]
            cached, row.offset = prefix.cached, int(prefix.position_offset)
            span = row.floor = cached
        if self._dirty and src is not None and src.batch is not self:
            self.compact()  # released rows go before the batch grows
        self._append_row(row, kv, cached, span, src)
        return row

    def fork(self, src: Row, n: int) -> Row:
        """A new row in this batch standing for ``src.ids[:n]``; the cache is copied, at least the last
        token left pending (so that a decode step has logits to read)."""
        if not 1 <= n <= len(src.ids):
            raise ValueError(f"fork: n={n} outside [1, {len(src.ids)}]")
        return self.add(src.ids[:n], src=src, cached=min(src.cached, n - 1), owner=src.owner)

    def _append_row(self, row: Row, kv, cached: int, span: int, src: Optional[Row]) -> None:
        """Row ``B`` gets columns ``[0, span)``: ``src``'s (its positions < cached kept, gaps as in the
        source) or, from an image prefix's cache ``kv``, its ``cached`` positions."""
        B, T = len(self.rows), self.width
        self.reserve(B + 1, max(T, span, src.batch.width if src is not None else 0))
        if span > T:  # widen every row (the new columns are invalid for the rows already here)
            self.valid = torch.cat([self.valid.reshape(B, T), torch.zeros(B, span - T, dtype=torch.bool)], dim=1)
            self.pos = torch.cat([self.pos.reshape(B, T), torch.full((B, span - T), -1, dtype=torch.long)], dim=1)
            T = span
        valid = torch.zeros(1, T, dtype=torch.bool)
        pos = torch.full((1, T), -1, dtype=torch.long)
        if src is not None and cached > 0:
            sb = src.batch
            # one call for every layer: the new row's columns [0, span) become the source's, the rest of
            # its columns (up to the wider of the two batches) are zeroed
            columns = max(T, sb.width)
            self.store.rollback(columns, keep={self.base_row + B: 0},
                                copies={self.base_row + B: (sb.base_row + src.index, 0, span)})
            keep = sb.valid[src.index, :span] & (sb.pos[src.index, :span] < cached)
            valid[0, :span] = keep
            pos[0, :span] = torch.where(keep, sb.pos[src.index, :span], -1)
        elif kv is not None:
            with self.on_stream():
                for store, (k, v) in zip(zip(self.keys, self.values), kv):
                    store[0][B, :, :cached].copy_(k[0])
                    store[1][B, :, :cached].copy_(v[0])
                    if self.stream is not None:  # made on another stream: not reused before this copy ran
                        k.record_stream(self.stream)
                        v.record_stream(self.stream)
            valid[0, :cached] = True
            pos[0, :cached] = torch.arange(cached)
        self.valid = torch.cat([self.valid.reshape(B, T), valid], dim=0)
        self.pos = torch.cat([self.pos.reshape(B, T), pos], dim=0)
        row.cached, row.batch, row.index = cached, self, B
        self.rows.append(row)

    def truncate(self, row: Row, n: int) -> None:
        """``row`` keeps its first ``n`` ids; cache entries past them are dropped: flags cleared and the
        storage rolled back (one :func:`dreamr.ops.kv_rollback` call: the row keeps the columns of its
        first ``n`` positions, the rest of its width is zeroed)."""
        self.truncate_rows([(row, n)])

    def truncate_rows(self, cuts: Sequence[tuple[Row, int]]) -> None:
        """:meth:`truncate` of several rows ``(row, n)`` (distinct rows of this batch) with one
        :func:`dreamr.ops.kv_rollback` call for all of them (token-level speculation drops each row's
        rejected proposal after a pass)."""
        for row, n in cuts:
            assert row.batch is self and row.alive
            if not row.floor <= n <= len(row.ids):
                raise ValueError(f"truncate: n={n} outside [{row.floor}, {len(row.ids)}] (an image prefix is never "
                                 "rolled back: start a new row instead)")
        keep = {}
        for row, n in cuts:
            del row.ids[n:]
            if row.cached > n:
                b = row.index
                keep[self.base_row + b] = self._span(row, n)
                drop = self.pos[b] >= n
                self.valid[b] &= ~drop
                self.pos[b][drop] = -1
                row.cached = n
        if keep:
            self.store.rollback(self.width, keep=keep)
            self._dirty = True

    def uncache_to(self, row: Row, n: int) -> None:
        """Drop cache entries past ``n`` but keep the ids (they are fed again)."""
        ids = list(row.ids)
        self.truncate(row, n)
        row.ids = ids

    def release(self, row: Optional[Row]) -> None:
        if row is None or not row.alive:
            return
        assert row.batch is self
        row.alive = False
        self.valid[row.index] = False
        self.pos[row.index] = -1
        self._dirty = True

    def move(self, row: Row, dst: "RaggedBatch") -> Row:
        """The same sequence in ``dst`` (a batch on the same store: cache copied, nothing recomputed);
        ``row`` is released."""
        new = dst.add(row.ids, src=row, cached=row.cached, owner=row.owner)
        self.release(row)
        return new

    def compact(self) -> None:
        """Drop released rows and invalid columns: every live row's entries left-aligned, written back into
        the same storage by one :func:`dreamr.ops.kv_compact` call for every layer. Live rows keep their
        order and each row's valid columns their order, so the plan moves entries only towards the front
        (the op's order rules for an in-place pass)."""
        live = [r for r in self.rows if r.alive]
        counts = [r.cached for r in live]
        width = max(counts, default=0)
        if live and width:
            src_rows = torch.tensor([r.index for r in live], dtype=torch.long)
            valid = self.valid[src_rows]  # [B', T]
            assert valid.sum(dim=1).tolist() == counts
            # each row's valid columns first, in column order (a stable sort of the invalid flags); what
            # follows a row's count is padding the op does not read
            columns = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :width].contiguous()
            with self.on_stream():
                _kv_compact(self.keys + self.values, src_rows, columns, torch.tensor(counts, dtype=torch.long))
        counts_t = torch.tensor(counts, dtype=torch.long)
        self.valid = torch.arange(width)[None, :] < counts_t[:, None]
        self.pos = torch.where(self.valid, torch.arange(width)[None, :], torch.full((len(live), width), -1))
        for i, r in enumerate(live):
            r.index = i
        self.rows = live
        self._dirty = False

    # -- forward -------------------------------------------------------------------------------------

    def mask(self, q_pos, q_tag, q_valid, sliding: bool) -> torch.Tensor:
        """The 4-D mask ``[B, 1, S, width + S]`` of a forward feeding ``[B, S]`` queries at logical positions
        ``q_pos`` with segment tags ``q_tag`` (0: persistent; j > 0: private segment j) and validity
        ``q_valid``; on the host, bool."""
        T, S = self.width, q_pos.shape[1]
        k_valid = torch.cat([self.valid, q_valid], dim=1)
        k_pos = torch.cat([self.pos, q_pos], dim=1)
        k_tag = torch.cat([torch.zeros_like(self.pos), q_tag], dim=1)
        k_col = torch.arange(T + S)
        q_col = T + torch.arange(S)
        m = (k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
             & ((k_tag[:, None, :] == 0) | (k_tag[:, None, :] == q_tag[:, :, None]))
             & (k_col[None, None, :] <= q_col[None, :, None]))
        if sliding:  # the window of transformers' sliding masks: q - window < k <= q
            m &= (q_pos[:, :, None] - k_pos[:, None, :]) < int(self.layout.sliding_window)
        # padding queries see themselves only (no empty rows in the softmax)
        m[:, torch.arange(S), q_col] |= ~q_valid
        return m[:, None]

    def mask_kinds(self) -> list[str]:
        """The masks a forward passes: one per attention kind of the model ("full", "sliding"; see
        :class:`dreamr.lm.AttentionLayout`)."""
        return self.layout.kinds

    def to_model_mask(self, m: torch.Tensor) -> torch.Tensor:
        """A host bool mask as the model takes it: on the device, additive for eager attention."""
        (m,) = host_to_device(self.device, m)
        if self.additive_mask:
            return torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill_(~m, torch.finfo(self.dtype).min)
        return m

    def model_masks(self, masks: dict):
        """``{kind: mask}`` as the model's ``attention_mask``: a dict by layer type where the model has them,
        else its one mask (sliding for a Mistral-style config)."""
        if not self.layout.mask_of_layer:
            return masks[self.layout.single_kind]
        return {lt: masks[kind] for lt, kind in self.layout.mask_of_layer.items()}

    def cache_view(self, rows: int, past: int, columns: int, write_cols: torch.Tensor) -> Cache:
        """A transformers cache over storage rows ``[0, rows)`` and columns ``[0, columns)`` that writes the
        forward's new keys/values at ``write_cols``."""
        return Cache(layers=[RaggedKVLayer(k[:rows, :, :columns], v[:rows, :, :columns], write_cols, past)
                             for k, v in zip(self.keys, self.values)])

    @torch.no_grad()
    def forward(self, feeds: dict) -> dict:
        """One forward of every row of the batch.

        ``feeds`` maps a row to a list of segments ``(ids, persist)`` or ``(ids, persist, every)`` fed
        after the row's pending ids; a persistent segment's ids join the row's ids, a private one
        (``persist=False``: a verdict prompt) is seen only by itself and dropped after the pass. Rows not
        in ``feeds`` are not fed (they only pad the pass). Returns, per fed row, ``(last, segment_out)``:
        the final hidden state ``[H]`` at the row's last persistent token (None if it fed none) and, per
        segment, the one at its last token ``[H]``, or with ``every=True`` the ones at every position
        that predicts one of its tokens or the token after it, ``[len(ids) + 1, H]``: the last persistent
        token fed before the segment in this pass, then each of the segment's tokens (token-level
        speculation checks a proposal with them; a ValueError where nothing persistent is fed before
        such a segment).
        """
        for row, segs in feeds.items():  # checked before any row's ids change
            fed = bool(row.pending)
            for ids, persist, *every in segs:
                if every and every[0] and not fed:
                    raise ValueError(f"forward: a segment with every=True in batch {self.name!r} needs a persistent "
                                     "token fed before it in the same pass (the position that predicts its first "
                                     "token): give the row a pending token or a persistent segment before it")
                fed = fed or bool(persist and len(ids))
        if self._dirty:
            self.compact()
        B, T = len(self.rows), self.width
        plans = []
        for row in self.rows:
            toks, poss, tags, seg_ends, last = [], [], [], [], None
            if row.alive and row in feeds:
                p = row.cached
                for t in row.pending:
                    toks.append(t), poss.append(p), tags.append(0)
                    p += 1
                if toks:
                    last = len(toks) - 1
                for j, (ids, persist, *every) in enumerate(feeds.get(row, ())):
                    every = bool(every and every[0])
                    q, first = p, len(toks)
                    for t in ids:
                        toks.append(int(t)), poss.append(q), tags.append(0 if persist else j + 1)
                        q += 1
                    # every=True: the positions [last fed before it, its own tokens...]; a slice where they
                    # are contiguous (the usual case: right after the pending ids; no index copied to a device)
                    if every:
                        seg_ends.append(slice(last, len(toks)) if last == first - 1
                                        else [last, *range(first, len(toks))])
                    else:
                        seg_ends.append(len(toks) - 1)
                    if persist:
                        row.ids.extend(int(t) for t in ids)
                        p = q
                        if ids:
                            last = len(toks) - 1
            plans.append((toks, poss, tags, seg_ends, last))
        S = max((len(p[0]) for p in plans), default=0)
        if S == 0:
            return {}
        input_ids = torch.zeros(B, S, dtype=torch.long)
        q_pos = torch.zeros(B, S, dtype=torch.long)
        q_tag = torch.full((B, S), -1, dtype=torch.long)
        q_valid = torch.zeros(B, S, dtype=torch.bool)
        for b, (toks, poss, tags, _, _) in enumerate(plans):
            n = len(toks)
            if n:
                input_ids[b, :n] = torch.tensor(toks)
                q_pos[b, :n] = torch.tensor(poss)
                q_tag[b, :n] = torch.tensor(tags)
                q_valid[b, :n] = True
        self.reserve(B, T + S)
        positions = self.rotary_positions(q_pos)
        with self.on_stream():
            hidden = None
            if self.graphs is not None and S == 1 and bool(q_valid.all()) and not bool(q_tag.any()):
                hidden = self.graphs.run(input_ids, q_pos, positions)  # None: no graph for this shape
            if hidden is None:
                hidden = self._eager(input_ids, positions, q_pos, q_tag, q_valid)
        return self._after_forward(plans, hidden, q_pos, q_tag, q_valid)

    def _eager(self, input_ids, positions, q_pos, q_tag, q_valid) -> torch.Tensor:
        B, S = input_ids.shape
        T = self.width
        if self._plain(q_pos, q_tag, q_valid):
            mask = None  # one dense row fed in order: the model's own causal (and sliding) masks are exact
        else:
            mask = self.model_masks({kind: self.to_model_mask(self.mask(q_pos, q_tag, q_valid, kind != "full"))
                                     for kind in self.mask_kinds()})
        write_cols = torch.arange(T, T + S, device=self.device)
        cache = self.cache_view(B, T, T + S, write_cols)
        input_ids, positions = host_to_device(self.device, input_ids, positions)
        out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{self._cache_kw: cache})
        return out.last_hidden_state

    def rotary_positions(self, q_pos: torch.Tensor) -> torch.Tensor:
        """The model's ``position_ids [B, S]`` (host): each row's logical positions plus its offset (image
        rows). Masks use the logical positions."""
        offsets = [r.offset for r in self.rows]
        if any(offsets):
            q_pos = q_pos + torch.tensor(offsets, dtype=q_pos.dtype)[:, None]
        return q_pos

    def _plain(self, q_pos, q_tag, q_valid) -> bool:
        """True for one row with no gaps, fed without padding, private tokens (if any) only at the end."""
        if len(self.rows) != 1 or not bool(q_valid.all()):
            return False
        T = self.width
        if T and not (bool(self.valid.all()) and bool((self.pos[0] == torch.arange(T)).all())):
            return False
        if not bool((q_pos[0] == T + torch.arange(q_pos.shape[1])).all()):
            return False
        tags = q_tag[0].tolist()
        first = next((i for i, t in enumerate(tags) if t != 0), len(tags))
        return all(t == tags[first] for t in tags[first:]) if first < len(tags) else True

    def _after_forward(self, plans, hidden, q_pos, q_tag, q_valid) -> dict:
        B = len(self.rows)
        keep = q_valid & (q_tag == 0)
        self.valid = torch.cat([self.valid, keep], dim=1) if B else keep
        self.pos = torch.cat([self.pos, torch.where(keep, q_pos, torch.full_like(q_pos, -1))], dim=1)
        if bool((q_valid & ~keep).any()):
            self._dirty = True  # private columns left gaps
        result = {}
        for b, (row, (toks, _, _, seg_ends, last)) in enumerate(zip(self.rows, plans)):
            if row.alive and toks:
                row.cached = len(row.ids)
                result[row] = (None if last is None else hidden[b, last],
                               [hidden[b, e] for e in seg_ends])
        if self.width > 64 and self.width > 2 * max((r.cached for r in self.rows if r.alive), default=0):
            self._dirty = True
        return result

    def next_token_logits(self, rows: Sequence[Row], proposals: Optional[Sequence[Sequence[int]]] = None
                          ) -> torch.Tensor:
        """One decode forward of ``rows`` (a row with nothing pending feeds its last token again), on this
        batch's stream.

        Parameters
        ----------
        rows : sequence of Row, length N
        proposals : sequence of N token lists, optional
            Token-level speculation: row i also feeds ``proposals[i]`` (K_i tokens, 0 for none) after its
            pending ids, in the same pass; they join its ids and its cache, and the caller truncates what
            it does not keep (:meth:`truncate_rows`). A pass with any proposal feeds several tokens per
            row and runs eagerly (not from the decode graphs, which hold one token per row).

        Returns
        -------
        torch.Tensor, shape ``[sum(K_i + 1), V]``
            Row by row, the ``K_i + 1`` logits after the row's pending ids and after each of its proposed
            tokens (row i's start at ``sum(K_j + 1 for j < i)``); ``[N, V]`` without proposals.
        """
        if proposals is not None and len(proposals) != len(rows):
            raise ValueError(f"next_token_logits: {len(proposals)} proposals for {len(rows)} rows; give one "
                             "(possibly empty) token list per row")
        proposals = [list(p) for p in proposals] if proposals is not None else [[] for _ in rows]
        for row in rows:
            if not row.pending:
                self.uncache_to(row, len(row.ids) - 1)
        out = self.forward({row: [(p, True, True)] if p else [] for row, p in zip(rows, proposals)})
        with self.on_stream():
            hidden = [out[row][1][0] if p else out[row][0][None] for row, p in zip(rows, proposals)]
            return self.logits(torch.cat(hidden))

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states ``[N, H]``: the LM head, then logit scaling (Cohere,
        Granite) and soft-capping (Gemma) as the model's own forward applies them (:mod:`dreamr.lm`)."""
        scale, softcap = self.lm.logit_scale, self.lm.logit_softcap
        with self.on_stream():
            logits = self.head(hidden.to(self.head.weight.dtype))
            if scale != 1.0:
                logits = logits * scale
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
        return logits
