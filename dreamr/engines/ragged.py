"""A batched KV cache with ragged rows, in preallocated storage: what the FPSR executor runs its models on.

Every row of a :class:`RaggedBatch` is one sequence (a request's target chain, a fallback branch, a
request's draft). The rows share one set of per-layer storage tensors ``[R, H_kv, L, D]`` (R rows and L
columns of capacity); columns ``[0, width)`` are in use. Each row keeps, per column, a validity flag and the
logical position of the token cached there, so rows of different lengths, rows that were rolled back and
rows fed private tokens (verdict prompts) live side by side:

- a forward feeds each row a different number of tokens (padded to the longest) at columns
  ``[width, width + S)`` with explicit ``position_ids`` and a 4-D attention mask built from the flags and
  positions (causal by position, per-row sliding windows by position, private segments seen only by
  themselves), so any model whose forward takes a prepared 4-D mask works (Llama, Qwen2, Gemma 3);
- rolling a row back only clears flags; a released row is dropped and the batch compacted (one gather
  per layer tensor, written back in place) before the next forward; a fork copies a row's prefix.

The storage is written in place (:class:`RaggedKVLayer`), never reallocated except to grow, so a decode
forward (one token per row) has fixed tensor addresses for a given batch size and column bucket: that is
what lets :class:`dreamr.engines.decode_graphs.DecodeGraphs` capture it as a CUDA graph.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from dreamr.cache import cache_kwarg

__all__ = ["RaggedBatch", "RaggedKVLayer", "Row"]

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


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _grown(have: int, need: int, least: int) -> int:
    """A capacity of at least ``need``: doubling ``have`` (amortised growth), never below ``least``."""
    if need <= have:
        return have
    return max(need, 2 * have, least)


class RaggedBatch:
    """A batched KV cache with ragged rows (see the module docstring).

    Parameters
    ----------
    lm : dreamr.engines.base.LM
        The model (a causal LM whose ``base_model`` takes ``position_ids`` and a 4-D mask).
    name : str
        For messages and tests ("chains", "branches", "parked", "drafts").
    stream : torch.cuda.Stream, optional
        Where this batch's device work runs (the FPSR draft runs on its own stream); every tensor of the
        batch is allocated and used there.
    """

    def __init__(self, lm, name: str = "", *, stream=None):
        self.lm, self.name = lm, name
        model = lm.model
        base = getattr(model, "base_model", None)
        if base is None or base is model:
            raise ValueError(f"{lm.name}: FPSR needs a causal LM with a separate base model (model.base_model)")
        self.base = base
        self._cache_kw = cache_kwarg(base)
        config = _text_config(model)
        self.layer_types = list(getattr(config, "layer_types", None) or [])
        # the mask each layer type takes: its own sliding-window mask, else the full causal one
        self._mask_of_layer = {lt: "sliding_attention" if lt == "sliding_attention" else "full" for lt in self.layer_types}
        self.sliding_window = getattr(config, "sliding_window", None)
        self.additive_mask = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.head = model.get_output_embeddings()
        self.softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        self.num_layers = int(config.num_hidden_layers)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.device, self.dtype = lm.device, lm.dtype
        self.stream = stream
        self.rows: list[Row] = []
        # storage, per layer [R, H_kv, L, D]; rows [0, len(rows)) and columns [0, width) in use
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.storage_version = 0  # bumped when the storage is reallocated (captured graphs go stale)
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
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    @contextlib.contextmanager
    def on_stream(self):
        """A context that makes this batch's stream current, after the work already queued on the caller's
        stream (so inputs made there are ready); nothing on a CPU or without a stream."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        if caller != self.stream:
            self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield

    def reserve(self, rows: int, columns: int) -> None:
        """Grow the storage (doubling) so that it holds ``rows`` x ``columns``; what is in use is kept."""
        R, L = self.capacity
        if self.keys and rows <= R and columns <= L:
            return
        R2, L2 = _grown(R, rows, 4), _grown(L, columns, MIN_COLUMNS)
        B, T = len(self.rows), self.width
        shape = (R2, self.kv_heads, L2, self.head_dim)
        with self.on_stream():
            # zeros, not empty: masked columns still meet the value matrix (0 * NaN would poison a row)
            keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
            values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
            for new, old in zip(keys + values, self.keys + self.values):
                new[:B, :, :T].copy_(old[:B, :, :T])
        self.keys, self.values = keys, values
        self.storage_version += 1

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
        """Keys and values of ``row``'s first ``n`` cached positions, each ``[1, H_kv, n, D]``."""
        assert row.batch is self and row.alive and n <= row.cached
        b = row.index
        cols = torch.nonzero(self.valid[b] & (self.pos[b] < n)).flatten()
        assert cols.numel() == n, (cols.numel(), n)
        with self.on_stream():
            cols = cols.to(self.device)
            return [(k[b:b + 1].index_select(2, cols), v[b:b + 1].index_select(2, cols))
                    for k, v in zip(self.keys, self.values)]

    def add(self, ids: Sequence[int], *, src: Optional[Row] = None, cached: int = 0, owner=None,
            prefix=None) -> Row:
        """A new row standing for ``ids``; its first ``cached`` positions are copied from ``src``'s, or
        from ``prefix`` (a :class:`dreamr.multimodal.ImagePrefix`: an image prompt encoded once, whose
        position offset the row keeps; forks and moves carry it on)."""
        row = Row(ids, owner)
        kv = src.batch.dense(src, cached) if (src is not None and cached > 0) else None
        if kv is not None and src.batch.stream is not None and src.batch.stream != self.stream:
            # dense() ran on the source's stream: this batch's copy must come after it
            torch.cuda.current_stream(self.device).wait_stream(src.batch.stream)
        if src is not None:
            if cached < src.floor:
                raise ValueError(f"add: copying {cached} positions would cut into the source's image prefix "
                                 f"({src.floor} positions)")
            row.offset, row.floor = src.offset, src.floor
        elif prefix is not None:
            if list(ids[:prefix.cached]) != list(prefix.ids[:prefix.cached]):
                raise ValueError(f"add: the row's ids do not start with its image prefix's {prefix.cached} ids")
            kv = [(layer.keys, layer.values) for layer in prefix.cache.layers]
            cached, row.offset = prefix.cached, int(prefix.position_offset)
            row.floor = cached
        if self._dirty and src is not None and src.batch is not self:
            self.compact()  # released rows go before the batch grows
        self._append_row(row, kv, cached)
        return row

    def fork(self, src: Row, n: int) -> Row:
        """A new row in this batch standing for ``src.ids[:n]``; the cache is copied, at least the last
        token left pending (so that a decode step has logits to read)."""
        if not 1 <= n <= len(src.ids):
            raise ValueError(f"fork: n={n} outside [1, {len(src.ids)}]")
        return self.add(src.ids[:n], src=src, cached=min(src.cached, n - 1), owner=src.owner)

    def _append_row(self, row: Row, kv, cached: int) -> None:
        B, T = len(self.rows), self.width
        self.reserve(B + 1, max(T, cached))
        if cached > T:  # widen every row (the new columns are invalid for the rows already here)
            self.valid = torch.cat([self.valid.reshape(B, T), torch.zeros(B, cached - T, dtype=torch.bool)], dim=1)
            self.pos = torch.cat([self.pos.reshape(B, T), torch.full((B, cached - T), -1, dtype=torch.long)], dim=1)
            T = cached
        if kv is not None:
            with self.on_stream():
                for store, (k, v) in zip(zip(self.keys, self.values), kv):
                    store[0][B, :, :cached].copy_(k[0])
                    store[1][B, :, :cached].copy_(v[0])
                    if self.stream is not None:  # made on another stream: not reused before this copy ran
                        k.record_stream(self.stream)
                        v.record_stream(self.stream)
        valid = torch.zeros(1, T, dtype=torch.bool)
        valid[0, :cached] = True
        pos = torch.full((1, T), -1, dtype=torch.long)
        pos[0, :cached] = torch.arange(cached)
        self.valid = torch.cat([self.valid.reshape(B, T), valid], dim=0)
        self.pos = torch.cat([self.pos.reshape(B, T), pos], dim=0)
        row.cached, row.batch, row.index = cached, self, B
        self.rows.append(row)

    def truncate(self, row: Row, n: int) -> None:
        """``row`` keeps its first ``n`` ids; cache entries past them are dropped (flags cleared)."""
        assert row.batch is self and row.alive
        if not row.floor <= n <= len(row.ids):
            raise ValueError(f"truncate: n={n} outside [{row.floor}, {len(row.ids)}] (an image prefix is never rolled "
                             "back: start a new row instead)")
        del row.ids[n:]
        if row.cached > n:
            b = row.index
            drop = self.pos[b] >= n
            self.valid[b] &= ~drop
            self.pos[b][drop] = -1
            row.cached = n
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
        """The same sequence in ``dst`` (cache copied, nothing recomputed); ``row`` is released."""
        new = dst.add(row.ids, src=row, cached=row.cached, owner=row.owner)
        self.release(row)
        return new

    def compact(self) -> None:
        """Drop released rows and invalid columns: every live row's entries left-aligned, one gather per
        layer tensor, written back into the same storage."""
        live = [r for r in self.rows if r.alive]
        counts = [r.cached for r in live]
        width = max(counts, default=0)
        if live and width:
            index = torch.zeros(len(live), width, dtype=torch.long)
            for i, r in enumerate(live):
                cols = torch.nonzero(self.valid[r.index]).flatten()
                assert cols.numel() == r.cached
                index[i, :r.cached] = cols
            with self.on_stream():
                rows_idx = torch.tensor([r.index for r in live], dtype=torch.long, device=self.device)
                gather = index.to(self.device)
                for t in self.keys + self.values:
                    picked = t.index_select(0, rows_idx)
                    idx = gather[:, None, :, None].expand(len(live), t.shape[1], width, t.shape[3])
                    t[:len(live), :, :width].copy_(torch.gather(picked, 2, idx))
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
        if sliding and self.sliding_window:
            m &= (q_pos[:, :, None] - k_pos[:, None, :]) < int(self.sliding_window)
        # padding queries see themselves only (no empty rows in the softmax)
        m[:, torch.arange(S), q_col] |= ~q_valid
        return m[:, None]

    def mask_kinds(self) -> list[str]:
        """The masks a forward passes: one per attention kind of the model ("full", "sliding_attention")."""
        return sorted(set(self._mask_of_layer.values())) or ["full"]

    def to_model_mask(self, m: torch.Tensor) -> torch.Tensor:
        """A host bool mask as the model takes it: on the device, additive for eager attention."""
        m = m.to(self.device)
        if self.additive_mask:
            return torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill_(~m, torch.finfo(self.dtype).min)
        return m

    def model_masks(self, masks: dict):
        """``{kind: mask}`` as the model's ``attention_mask``: a dict by layer type where the model has them."""
        if not self._mask_of_layer:
            return masks["full"]
        return {lt: masks[kind] for lt, kind in self._mask_of_layer.items()}

    def cache_view(self, rows: int, past: int, columns: int, write_cols: torch.Tensor) -> Cache:
        """A transformers cache over storage rows ``[0, rows)`` and columns ``[0, columns)`` that writes the
        forward's new keys/values at ``write_cols``."""
        return Cache(layers=[RaggedKVLayer(k[:rows, :, :columns], v[:rows, :, :columns], write_cols, past)
                             for k, v in zip(self.keys, self.values)])

    @torch.no_grad()
    def forward(self, feeds: dict) -> dict:
        """One forward of every row of the batch.

        ``feeds`` maps a row to a list of segments ``(ids, persist)`` fed after the row's pending ids;
        a persistent segment's ids join the row's ids, a private one (``persist=False``: a verdict
        prompt) is seen only by itself and dropped after the pass. Rows not in ``feeds`` are not fed
        (they only pad the pass). Returns, per fed row, ``(last, segment_last)``: the final hidden state
        ``[H]`` at the row's last persistent token (None if it fed none) and at the last token of each
        segment.
        """
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
                for j, (ids, persist) in enumerate(feeds.get(row, ())):
                    q = p
                    for t in ids:
                        toks.append(int(t)), poss.append(q), tags.append(0 if persist else j + 1)
                        q += 1
                    if persist:
                        row.ids.extend(int(t) for t in ids)
                        p = q
                        if ids:
                            last = len(toks) - 1
                    seg_ends.append(len(toks) - 1)
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
        out = self.base(input_ids=input_ids.to(self.device), attention_mask=mask,
                        position_ids=positions.to(self.device), use_cache=True,
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

    def next_token_logits(self, rows: Sequence[Row]) -> torch.Tensor:
        """One decode forward of ``rows`` (a row with nothing pending feeds its last token again): their
        next-token logits ``[len(rows), V]``, on this batch's stream."""
        for row in rows:
            if not row.pending:
                self.uncache_to(row, len(row.ids) - 1)
        out = self.forward({row: [] for row in rows})
        with self.on_stream():
            return self.logits(torch.stack([out[row][0] for row in rows]))

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states ``[N, H]`` (LM head, soft-capping as the model does)."""
        with self.on_stream():
            logits = self.head(hidden.to(self.head.weight.dtype))
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
