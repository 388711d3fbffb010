"""Mode "fpsr": fully parallel speculative reasoning (METHOD.md, section 2), driven by the C++ scheduler.

The scheduler (``csrc/scheduler/fpsr_scheduler.h``, through :mod:`dreamr.scheduler`) decides what runs
and what is committed; this executor runs its actions on the two models and reports what finished:

    loop until every request is done:
        apply the scheduler's actions (launch / cancel / commit / finish)
        one *chain* forward of the target: the pending verifications of every request, several drafted
            steps of one request in the same pass (a tree mask keeps each verdict prompt private)
        one *branch* forward of the target: one token for every live fallback branch t_i of every open
            slot of every request (one batched forward per token for all of them)
        one forward of the draft: one token for every request's running draft step
        report finished steps / verdicts to the scheduler

The scheduler's commits are those of the paper's round-by-round loop, whatever the order in which work
finishes, so with greedy decoding FPSR commits exactly the steps of mode "speculative".

Caches
------
Each model's rows live in :class:`RaggedBatch` objects: one transformers ``DynamicCache`` whose batch rows
are *ragged*: every row keeps a validity flag and a logical position per cache column. A forward feeds
each row a different number of tokens (padded to the longest), with explicit ``position_ids`` and a 4-D
attention mask built from the flags and positions (causal, per-row sliding windows by logical position,
private verdict prompts); so decoding rows, prefills and verification chunks of different lengths share
one forward, and any model whose forward accepts a prepared 4-D mask works (Llama, Qwen2, Gemma 3 with
its sliding-window layers). Rolling a row back only clears flags; a released row is dropped and the
batch is compacted (one gather per layer tensor) before the next forward; a fork copies a row's prefix
into another batch. Nothing accepted is recomputed: the target *chain* row of a request keeps the
committed prefix plus the verified drafted steps, new fallback branches fork from it, and a committed
fallback branch becomes the next chain (and, in eager mode, continues as the next head's branch).

Three target batches: ``chains`` (verification), ``branches`` (live fallback decoding) and ``parked``
(finished branches waiting for their slot to resolve; never run). One draft batch.

CUDA streams and CUDA graphs are not implemented: on every device the same single-threaded loop runs
(see the note in :class:`FpsrEngine`). Greedy decoding reproduces mode "speculative" exactly (up to the
last bits of batched arithmetic: exact in float64); with sampling the runs are seeded but not the same
draws as mode "speculative" (cancelled work consumes random numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generator, Optional, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from dreamr.cache import cache_kwarg
from dreamr.engines.base import LM, Engine, Request, RequestState, drain, timed
from dreamr.result import Result, Step
from dreamr.scheduler import WORK_DRAFT, WORK_TARGET, WORK_VERIFY, ActionKind, Scheduler, StepEnd, TargetLaunch
from dreamr.steps import StepWriter, has_answer

__all__ = ["FpsrEngine", "RaggedBatch", "Row"]


# --------------------------------------------------------------------------------------------------
# Ragged batched KV cache
# --------------------------------------------------------------------------------------------------


class Row:
    """One sequence in a :class:`RaggedBatch`: ``ids`` it stands for, the first ``cached`` in the cache."""

    __slots__ = ("ids", "cached", "batch", "index", "alive", "owner")

    def __init__(self, ids: Sequence[int], owner=None):
        self.ids: list[int] = [int(t) for t in ids]
        self.cached = 0
        self.batch: Optional["RaggedBatch"] = None
        self.index = -1
        self.alive = True
        self.owner = owner  # the request index (metrics)

    @property
    def pending(self) -> list[int]:
        return self.ids[self.cached:]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class RaggedBatch:
    """A batched ``DynamicCache`` with ragged rows (see the module docstring)."""

    def __init__(self, lm: LM, name: str = ""):
        self.lm, self.name = lm, name
        model = lm.model
        base = getattr(model, "base_model", None)
        if base is None or base is model:
            raise ValueError(f"{lm.name}: FPSR needs a causal LM with a separate base model (model.base_model)")
        self.base = base
        self._cache_kw = cache_kwarg(base)
        config = _text_config(model)
        self.layer_types = list(getattr(config, "layer_types", None) or [])
        self.sliding_window = getattr(config, "sliding_window", None)
        self.additive_mask = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.head = model.get_output_embeddings()
        self.softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        self.device = lm.device
        self.rows: list[Row] = []
        self.cache = DynamicCache()
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self.pos = torch.zeros(0, 0, dtype=torch.long)
        self.forward_passes = 0
        self._dirty = False

    # -- structure -----------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def _layers(self) -> list:
        return [layer for layer in self.cache.layers
                if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.dim() == 4]

    def live_tokens(self) -> int:
        """Cached positions over all live rows (what the batch really holds)."""
        return int(sum(r.cached for r in self.rows if r.alive))

    def dense(self, row: Row, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of ``row``'s first ``n`` cached positions, each ``[1, H, n, D]``."""
        assert row.batch is self and row.alive and n <= row.cached
        b = row.index
        cols = torch.nonzero(self.valid[b] & (self.pos[b] < n)).flatten()
        assert cols.numel() == n, (cols.numel(), n)
        cols = cols.to(self.device)
        return [(layer.keys[b:b + 1].index_select(2, cols), layer.values[b:b + 1].index_select(2, cols))
                for layer in self._layers()]

    def add(self, ids: Sequence[int], *, src: Optional[Row] = None, cached: int = 0, owner=None) -> Row:
        """A new row standing for ``ids``; its first ``cached`` positions are copied from ``src``'s."""
        row = Row(ids, owner)
        kv = src.batch.dense(src, cached) if (src is not None and cached > 0) else None
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
        if kv is not None and cached > T:  # widen every row (new columns are invalid)
            grow = cached - T
            for layer in self._layers():
                k, v = layer.keys, layer.values
                layer.keys = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], grow, k.shape[3])], dim=2)
                layer.values = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], grow, v.shape[3])], dim=2)
            self.valid = torch.cat([self.valid, torch.zeros(B, grow, dtype=torch.bool)], dim=1)
            self.pos = torch.cat([self.pos, torch.full((B, grow), -1, dtype=torch.long)], dim=1)
            T = cached
        layers = self._layers()
        if kv is not None and not layers and B == 0:
            # an empty batch: build its layers from the copied prefix
            self.cache = DynamicCache()
            for k, v in kv:
                layer = DynamicLayer()
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k.clone(), v.clone()
                self.cache.layers.append(layer)
        elif layers:
            if kv is None:
                kv = [(layer.keys.new_zeros(1, layer.keys.shape[1], 0, layer.keys.shape[3]),
                       layer.values.new_zeros(1, layer.values.shape[1], 0, layer.values.shape[3]))
                      for layer in layers]
            for layer, (k, v) in zip(layers, kv):
                pad = T - k.shape[2]
                if pad:
                    k = torch.cat([k, k.new_zeros(1, k.shape[1], pad, k.shape[3])], dim=2)
                    v = torch.cat([v, v.new_zeros(1, v.shape[1], pad, v.shape[3])], dim=2)
                layer.keys = torch.cat([layer.keys, k], dim=0)
                layer.values = torch.cat([layer.values, v], dim=0)
        elif kv is not None:
            raise RuntimeError("RaggedBatch: rows without cache next to a copied prefix")  # not reached
        T = self.width if B or kv is None else cached
        valid = torch.zeros(1, T, dtype=torch.bool)
        valid[0, :cached] = True
        pos = torch.full((1, T), -1, dtype=torch.long)
        pos[0, :cached] = torch.arange(cached)
        self.valid = torch.cat([self.valid.reshape(B, -1), valid], dim=0) if B else valid
        self.pos = torch.cat([self.pos.reshape(B, -1), pos], dim=0) if B else pos
        row.cached, row.batch, row.index = cached, self, B
        self.rows.append(row)

    def truncate(self, row: Row, n: int) -> None:
        """``row`` keeps its first ``n`` ids; cache entries past them are dropped (flags cleared)."""
        assert row.batch is self and row.alive
        if not 0 <= n <= len(row.ids):
            raise ValueError(f"truncate: n={n} outside [0, {len(row.ids)}]")
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
        layer tensor."""
        live = [r for r in self.rows if r.alive]
        if not live:
            self.rows, self.cache = [], DynamicCache()
            self.valid = torch.zeros(0, 0, dtype=torch.bool)
            self.pos = torch.zeros(0, 0, dtype=torch.long)
            self._dirty = False
            return
        counts = [r.cached for r in live]
        width = max(counts)
        index = torch.zeros(len(live), width, dtype=torch.long)
        for i, r in enumerate(live):
            cols = torch.nonzero(self.valid[r.index]).flatten()
            assert cols.numel() == r.cached
            index[i, :r.cached] = cols
        rows_idx = torch.tensor([r.index for r in live], dtype=torch.long, device=self.device)
        gather = index.to(self.device)
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name).index_select(0, rows_idx)
                idx = gather[:, None, :, None].expand(t.shape[0], t.shape[1], width, t.shape[3])
                setattr(layer, name, torch.gather(t, 2, idx))
        counts_t = torch.tensor(counts)
        self.valid = torch.arange(width)[None, :] < counts_t[:, None]
        self.pos = torch.where(self.valid, torch.arange(width)[None, :], torch.full_like(index, -1))
        for i, r in enumerate(live):
            r.index = i
        self.rows = live
        self._dirty = False

    # -- forward -------------------------------------------------------------------------------------

    def _mask(self, q_pos, q_tag, q_valid, sliding: bool):
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
        m = m[:, None].to(self.device)
        if self.additive_mask:
            dtype = self.lm.dtype
            return torch.zeros(m.shape, dtype=dtype, device=self.device).masked_fill_(~m, torch.finfo(dtype).min)
        return m

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
        if self._plain(q_pos, q_tag, q_valid):
            mask = None  # one dense row fed in order: the model's own causal (and sliding) masks are exact
        else:
            mask = self._masks(q_pos, q_tag, q_valid)
        out = self.base(input_ids=input_ids.to(self.device), attention_mask=mask,
                        position_ids=q_pos.to(self.device), use_cache=True, **{self._cache_kw: self.cache})
        hidden = out.last_hidden_state
        return self._after_forward(plans, hidden, q_pos, q_tag, q_valid)

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

    def _masks(self, q_pos, q_tag, q_valid):
        full = self._mask(q_pos, q_tag, q_valid, sliding=False)
        if self.layer_types:
            mask = {lt: (self._mask(q_pos, q_tag, q_valid, sliding=True) if lt == "sliding_attention" else full)
                    for lt in set(self.layer_types)}
        else:
            mask = full
        return mask

    def _after_forward(self, plans, hidden, q_pos, q_tag, q_valid) -> dict:
        B = len(self.rows)
        self.forward_passes += 1
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

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states ``[N, H]`` (LM head, soft-capping as the model does)."""
        logits = self.head(hidden.to(self.head.weight.dtype))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# --------------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------------


@dataclass
class _Epoch:
    """One slot's work on one step (an epoch of the scheduler)."""

    request: int
    slot: int
    step: int
    d_prefix: int  # draft ids before this step
    t_prefix: int  # target ids before this step (committed + earlier open drafted steps)
    cap: int = 0
    d_writer: Optional[StepWriter] = None
    d_done: bool = False
    t_step_ids: Optional[list[int]] = None  # the drafted step in the target's tokens
    in_chain: bool = False  # the chain row holds the drafted step
    cpn: float = math.nan
    accepted: Optional[bool] = None
    t_writer: Optional[StepWriter] = None
    t_cap: int = 0
    branch: Optional[Row] = None  # the target fallback branch (branches batch, or parked)
    t_waiting: bool = False  # launched, waiting for the chain to hold its prefix
    t_done: bool = False


@dataclass
class _Req:
    index: int
    request: Request
    state: RequestState
    chain: Row  # target: committed prefix + verified open drafted steps
    d_row: Row  # draft: committed prefix + open drafted steps
    t_view: list[int]  # target ids of committed prefix + finished open drafted steps
    t_sampler: object
    d_sampler: object
    epochs: dict = field(default_factory=dict)
    verify_queue: list = field(default_factory=list)
    draft_epoch: Optional[int] = None
    committed_branch: Optional[tuple] = None  # (epoch, row) of a committed target branch (continuation)
    done: bool = False
    result: Optional[Result] = None
    t_forwards: int = 0
    d_forwards: int = 0


class FpsrEngine(Engine):
    """Mode "fpsr". ``target_launch`` ("eager": the paper's, every slot's fallback step starts with its
    draft step; "on_reject": a fallback step starts once its draft step is rejected; "auto", the
    default: eager where draft and target work can overlap (``overlap`` on, or a CUDA device), on-reject
    on a CPU without overlap, where every eagerly decoded target token adds to the wall time: measured
    on the default pair on a CPU core, eager FPSR ran at 0.56x the target alone and on-reject at 1.18x;
    both commit the same steps), ``draft_tokens_per_tick``
    (draft tokens per loop turn: > 1 lets the draft run further ahead of the target) and
    ``verify_batch`` (a request's drafted steps wait, while its draft runs, until this many can be
    verified in one target pass; default 1: verify each step at once) and ``overlap`` (run the draft's
    forwards on a worker thread while the target's run on the calling thread: the CPU stand-in for a
    second CUDA stream; it pays only with a free core per model, so it is off by default) may be set on
    the instance (``reasoner.engine("fpsr").target_launch = "on_reject"``). ``last_stats`` holds the
    scheduler's counters and the executor's forward counts after each run.

    On CUDA the intended design is a draft stream and a target stream ordered by events, with the
    fixed-shape decode forwards captured as CUDA graphs per batch-size bucket; it is not implemented:
    on every device the same loop runs, which is exact and batches the target's work, and overlaps
    draft and target work only through batching or, with ``overlap``, through a second CPU thread.
    """

    mode = "fpsr"

    def __init__(self, target: LM, draft: LM, verifier_for=None, *, same_tokenizer: bool = False):
        super().__init__(target, draft, verifier_for, same_tokenizer=same_tokenizer)
        self.target_launch = "auto"
        self.draft_tokens_per_tick = 1
        self.verify_batch = 1
        self.overlap = False
        self.last_stats: dict = {}
        self._executor = None

    def _pool(self):
        """One worker thread for the draft's forwards (created on first use, kept with the engine)."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamr-fpsr-draft")
        return self._executor

    # -- public ------------------------------------------------------------------------------------

    def run(self, requests: Sequence[Request], progress: bool = False) -> list[Result]:
        return drain(self._drive(list(requests)))

    def stream(self, request: Request) -> Generator[Step, None, Result]:
        gen = self._drive([request])
        while True:
            try:
                _, step = next(gen)
            except StopIteration as stop:
                return stop.value[0]
            yield step

    # -- the loop ----------------------------------------------------------------------------------

    def _drive(self, requests: list[Request]):
        if not requests:
            return []
        cfg = requests[0].config
        for r in requests[1:]:
            for name in ("window", "alpha", "max_step_tokens", "step_delimiter", "verdict_template",
                         "positive_words", "negative_words"):
                if getattr(r.config, name) != getattr(cfg, name):
                    raise ValueError(f"fpsr: all requests of a batch must share {name}")
        policy = self.target_launch
        if policy == "auto":
            policy = "eager" if (self.overlap or self.target.device.type == "cuda") else "on_reject"
        launch = {"eager": TargetLaunch.EAGER, "on_reject": TargetLaunch.ON_REJECT}.get(policy)
        if launch is None:
            raise ValueError(f"target_launch must be 'auto', 'eager' or 'on_reject', got {self.target_launch!r}")
        if int(self.verify_batch) < 1:
            raise ValueError(f"verify_batch must be >= 1, got {self.verify_batch!r}")
        if int(self.draft_tokens_per_tick) < 1:
            raise ValueError(f"draft_tokens_per_tick must be >= 1, got {self.draft_tokens_per_tick!r}")
        self.verifier = self.verifier_for(cfg)
        self.cfg = cfg
        self.suffix_len = max(len(self.verifier.suffix_ids("")), len(self.verifier.suffix_ids(cfg.step_delimiter)))
        sched = Scheduler(window=cfg.window, alpha=cfg.alpha, target_launch=launch,
                          max_step_tokens=cfg.max_step_tokens)
        self.sched = sched
        self.chains = RaggedBatch(self.target, "chains")
        self.branches = RaggedBatch(self.target, "branches")
        self.parked = RaggedBatch(self.target, "parked")
        self.drafts = RaggedBatch(self.draft, "drafts")
        reqs: list[_Req] = []
        for i, request in enumerate(requests):
            rc = request.config
            rid = sched.add_request(rc.max_new_tokens, 0)
            assert rid == i
            reqs.append(_Req(
                index=i, request=request, state=RequestState(rc),
                chain=self.chains.add(request.target_ids, owner=i),
                d_row=self.drafts.add(request.draft_ids, owner=i),
                t_view=list(request.target_ids),
                t_sampler=self.sampler(rc, 0), d_sampler=self.sampler(rc, 1),
            ))
        self.reqs = reqs
        forwards = {"chain": 0, "branch": 0, "draft": 0}
        ticks = int(self.draft_tokens_per_tick)
        pool = self._pool() if self.overlap else None
        self._multi_verify = 0
        job = None
        try:
            while True:
                self._events = False
                live_metrics = [r.state.metrics for r in reqs if not r.done]
                with timed("scheduler_time_s", *live_metrics):
                    committed = self._apply(sched.poll())
                for item in committed:
                    yield item
                if sched.all_done():
                    break
                worked = False
                # the draft's forwards (its own thread when overlapping) while the target's run here
                live = [(r, r.draft_epoch) for r in reqs if not r.done and r.draft_epoch is not None]
                job = pool.submit(self._draft_job, live, ticks) if (pool and live) else None
                live_metrics = [r.state.metrics for r in reqs if not r.done]
                with timed("verify_time_s", *live_metrics):
                    if self._chain_forward():
                        forwards["chain"] += 1
                        worked = True
                with timed("target_time_s", *live_metrics):
                    self._materialize_branches()
                    if self._branch_forward():
                        forwards["branch"] += 1
                        worked = True
                if live:
                    with timed("draft_time_s", *live_metrics):  # with overlap: the wait for the draft thread
                        passes, finished = job.result() if job is not None else self._draft_job(live, ticks)
                    forwards["draft"] += passes
                    worked = True
                    self._draft_finish(finished)
                if not worked and not self._events:
                    raise RuntimeError("fpsr: no work to run and no action to apply; scheduler state: "
                                       + str([sched.info(r.index) for r in reqs if not r.done]))
        finally:
            if job is not None and not job.done():
                job.exception()  # an error on this thread: let the draft's forward finish first
            stats = dict(sched.stats())
            stats.update({f"{k}_forwards": v for k, v in forwards.items()})
            stats["multi_step_verify_passes"] = self._multi_verify
            self.last_stats = stats
            self.chains = self.branches = self.parked = self.drafts = None
            self.sched = None
            self.reqs = []
        return [r.result for r in reqs]

    # -- actions -----------------------------------------------------------------------------------

    def _apply(self, actions) -> list:
        committed = []
        touched = set()
        for a in actions:
            req = self.reqs[a.request]
            touched.add(a.request)
            k = a.kind
            if k == ActionKind.LAUNCH_DRAFT:
                self._launch_draft(req, a)
            elif k == ActionKind.LAUNCH_VERIFY:
                req.verify_queue.append(a.epoch)
            elif k == ActionKind.LAUNCH_TARGET:
                self._launch_target(req, a)
            elif k == ActionKind.CANCEL:
                self._cancel(req, a)
            elif k in (ActionKind.COMMIT_DRAFT, ActionKind.COMMIT_TARGET):
                step = self._commit(req, a)
                if step is not None:
                    committed.append((req.index, step))
            elif k == ActionKind.FINISH:
                self._finish(req, a)
        for i in touched:  # a committed branch not continued by this poll's actions is freed
            req = self.reqs[i]
            if req.committed_branch is not None:
                _, row = req.committed_branch
                row.batch.release(row)
                req.committed_branch = None
        return committed

    def _room(self, req: _Req, tokens: int) -> int:
        """The step cap: the scheduler's (budget, max_step_tokens) and each model's context room."""
        cap = min(tokens, self.target.context_length - len(req.t_view) - self.suffix_len,
                  self.draft.context_length - len(req.d_row.ids) - self.suffix_len)
        return cap

    def _launch_draft(self, req: _Req, a) -> None:
        if req.draft_epoch is not None:
            raise RuntimeError(f"fpsr: draft for step {a.step} launched while another draft step runs")
        cap = self._room(req, a.tokens)
        e = _Epoch(a.request, a.slot, a.step, d_prefix=len(req.d_row.ids), t_prefix=len(req.t_view), cap=cap)
        req.epochs[a.epoch] = e
        if cap <= 0:  # a model's context is full: the request ends here (as in mode "speculative")
            req.state.finish_reason = "length"
            self.sched.abort(a.request)
            self._events = True
            return
        e.d_writer = StepWriter(self.draft.tokenizer, self.draft.eos_ids, self.cfg.step_delimiter, cap)
        req.draft_epoch = a.epoch

    def _launch_target(self, req: _Req, a) -> None:
        e = req.epochs[a.epoch]
        cap = min(a.tokens, e.cap) if e.cap > 0 else a.tokens
        e.t_cap = cap
        e.t_writer = StepWriter(self.target.tokenizer, self.target.eos_ids, self.cfg.step_delimiter, cap)
        if a.aux >= 0 and req.committed_branch is not None and req.committed_branch[0] == a.aux:
            _, row = req.committed_branch
            req.committed_branch = None
            assert len(row.ids) == e.t_prefix and row.ids == req.t_view[:e.t_prefix]
            e.branch = row if row.batch is self.branches else row.batch.move(row, self.branches)
        else:
            e.t_waiting = True

    def _materialize_branches(self) -> None:
        """Start the branches whose prefix the chain now holds (a fork: the prefix is copied)."""
        for req in self.reqs:
            for e in req.epochs.values():
                if e.t_waiting and len(req.chain.ids) >= e.t_prefix and req.chain.cached >= e.t_prefix - 1:
                    e.branch = self.branches.fork(req.chain, e.t_prefix)
                    e.t_waiting = False

    def _stop_draft(self, req: _Req, epoch: int) -> None:
        if req.draft_epoch == epoch:
            req.draft_epoch = None

    def _cancel(self, req: _Req, a) -> None:
        e = req.epochs.get(a.epoch)
        if e is None:
            return
        if a.aux & (WORK_DRAFT | WORK_VERIFY):
            if a.epoch in req.verify_queue:
                req.verify_queue.remove(a.epoch)
            if e.in_chain or len(req.chain.ids) > e.t_prefix:
                self.chains.truncate(req.chain, min(len(req.chain.ids), e.t_prefix))
                e.in_chain = False
            if len(req.t_view) > e.t_prefix:
                del req.t_view[e.t_prefix:]
        if a.aux & WORK_DRAFT:
            self._stop_draft(req, a.epoch)
            if len(req.d_row.ids) > e.d_prefix:
                self.drafts.truncate(req.d_row, e.d_prefix)
        if a.aux & WORK_TARGET:
            self._drop_branch(e)
        if self._epoch_idle(req, a.epoch):
            del req.epochs[a.epoch]

    def _drop_branch(self, e: _Epoch) -> None:
        e.t_waiting = False
        e.t_writer = None if not e.t_done else e.t_writer
        if e.branch is not None:
            e.branch.batch.release(e.branch)
            e.branch = None

    def _epoch_idle(self, req: _Req, epoch: int) -> bool:
        e = req.epochs[epoch]
        return (req.draft_epoch != epoch and epoch not in req.verify_queue and e.branch is None
                and not e.t_waiting and self.sched.slot_epoch(req.index, e.slot) != epoch)

    def _commit(self, req: _Req, a) -> Optional[Step]:
        e = req.epochs[a.epoch]
        state = req.state
        if a.kind == ActionKind.COMMIT_DRAFT:
            w = e.d_writer
            assert e.d_done and e.accepted and e.in_chain
            step = Step(w.text, "draft", e.cpn, True, len(w.ids))
            state.metrics.accepted_steps += 1
            end = w.end
        else:
            w = e.t_writer
            assert e.t_done and e.accepted is False
            step = Step(w.text, "target", e.cpn, False, len(w.ids))
            end = w.end
            row = e.branch
            e.branch = None
            # the committed prefix becomes P + t_i in both models
            del req.t_view[e.t_prefix:]
            req.t_view.extend(row.ids[e.t_prefix:])
            assert len(row.ids) == len(req.t_view)
            self._stop_draft(req, req.draft_epoch)
            self.drafts.truncate(req.d_row, min(len(req.d_row.ids), e.d_prefix))
            req.d_row.ids.extend(w.content_ids if self.same_tokenizer else self.draft.encode_text(w.text))
            self.chains.release(req.chain)
            req.chain = self.chains.fork(row, len(row.ids))
            req.committed_branch = (a.epoch, row)
        state.metrics.verified_steps += 1
        if math.isnan(e.cpn):
            state.metrics.nonfinite_verdicts += 1
        state.commit(step, end)
        req.epochs.pop(a.epoch, None)
        if self.observer is not None:  # debug hook: the target chain and the draft row (Row objects)
            self.observer(req.chain, req.d_row)
        return step

    def _finish(self, req: _Req, a) -> None:
        state = req.state
        if state.finish_reason is None:
            state.finish_reason = {1: "eos", 2: "answer"}.get(a.aux, "length")
        for e in req.epochs.values():
            if e.branch is not None:
                e.branch.batch.release(e.branch)
        if req.committed_branch is not None:
            _, row = req.committed_branch
            row.batch.release(row)
            req.committed_branch = None
        req.epochs.clear()
        req.verify_queue.clear()
        req.draft_epoch = None
        self.chains.release(req.chain)
        self.drafts.release(req.d_row)
        state.metrics.target_forward_passes = req.t_forwards
        state.metrics.draft_forward_passes = req.d_forwards
        req.result = state.result(self.mode)
        req.done = True

    # -- work --------------------------------------------------------------------------------------

    def _step_end(self, w: StepWriter) -> int:
        if w.end == "eos":
            return int(StepEnd.EOS)
        if has_answer(w.text, self.cfg.answer_marker):
            return int(StepEnd.ANSWER_MARKER)
        return int(StepEnd.NONE)

    def _chain_forward(self) -> bool:
        """Verify every queued drafted step (several per request in one pass), and prefill chains that
        waiting branches need."""
        feeds, jobs = {}, []
        for req in self.reqs:
            if req.done:
                continue
            segs = []
            expect = len(req.chain.ids)
            queue = req.verify_queue
            if req.draft_epoch is not None and len(queue) < int(self.verify_batch):
                queue = []  # wait for more drafted steps: one pass verifies them together
            if len(queue) > 1:
                self._multi_verify += 1
            for epoch in queue:
                e = req.epochs[epoch]
                assert e.t_step_ids is not None and expect == e.t_prefix, (expect, e.t_prefix)
                expect += len(e.t_step_ids)
                w = e.d_writer
                segs += [(e.t_step_ids, True), (self.verifier.suffix_ids(w.text), False)]
                jobs.append((req, epoch, len(segs) - 1))
                e.in_chain = True
            if queue:
                req.verify_queue.clear()
            needs_prefill = any(e.t_waiting and req.chain.cached < e.t_prefix - 1 <= len(req.chain.ids)
                                for e in req.epochs.values())
            if segs or (needs_prefill and req.chain.pending):
                feeds[req.chain] = segs
        if not feeds:
            return False
        out = self.chains.forward(feeds)
        for req in self.reqs:
            if req.chain in out:
                req.t_forwards += 1
        if jobs:
            hidden = torch.stack([out[req.chain][1][j] for req, _, j in jobs])
            cpn, accept = self.verifier.cpn(hidden, self.cfg.alpha)
            for (req, epoch, _), c, ok in zip(jobs, cpn.tolist(), accept.tolist()):
                e = req.epochs[epoch]
                e.cpn, e.accepted = float(c), bool(ok)
                self._events = True
                self.sched.on_verdict(req.index, e.slot, epoch, bool(ok))
        return True

    def _branch_forward(self) -> bool:
        live = [(req, epoch, e) for req in self.reqs for epoch, e in req.epochs.items()
                if e.branch is not None and not e.t_done]
        if not live:
            return False
        for _, _, e in live:
            if not e.branch.pending:
                self.branches.uncache_to(e.branch, len(e.branch.ids) - 1)
        out = self.branches.forward({e.branch: [] for _, _, e in live})
        counted = set()
        hidden = torch.stack([out[e.branch][0] for _, _, e in live])
        logits = self.branches.logits(hidden)
        for (req, epoch, e), row_logits in zip(live, logits):
            if req.index not in counted:
                req.t_forwards += 1
                counted.add(req.index)
            token = req.t_sampler(row_logits)
            w = e.t_writer
            if w.add(token) != "eos":
                e.branch.ids.append(token)
            req.state.metrics.target_tokens += 1
            if w.end is not None:
                e.t_done = True
                e.branch = self.branches.move(e.branch, self.parked)
                self._events = True
                self.sched.on_target_step(req.index, e.slot, epoch, len(w.ids), self._step_end(w))
        return True

    def _draft_job(self, live: list, ticks: int) -> tuple[int, list]:
        """Up to ``ticks`` draft forwards (one token for each running draft step per forward).

        Touches only draft-side state (the draft batch and rows, the draft writers and sampler), so it
        may run on its own thread while the target's forwards run; finished steps are returned and
        reported to the scheduler by :meth:`_draft_finish` on the driving thread.
        """
        finished, passes = [], 0
        for _ in range(ticks):
            live = [(req, epoch) for req, epoch in live if (req, epoch) not in finished]
            if not live:
                break
            for req, _ in live:
                if not req.d_row.pending:
                    self.drafts.uncache_to(req.d_row, len(req.d_row.ids) - 1)
            out = self.drafts.forward({req.d_row: [] for req, _ in live})
            passes += 1
            hidden = torch.stack([out[req.d_row][0] for req, _ in live])
            logits = self.drafts.logits(hidden)
            for (req, epoch), row_logits in zip(live, logits):
                req.d_forwards += 1
                w = req.epochs[epoch].d_writer
                token = req.d_sampler(row_logits)
                if w.add(token) != "eos":
                    req.d_row.ids.append(token)
                req.state.metrics.draft_tokens += 1
                if w.end is not None:
                    finished.append((req, epoch))
        return passes, finished

    def _draft_finish(self, finished: list) -> None:
        for req, epoch in finished:
            e = req.epochs[epoch]
            w = e.d_writer
            e.d_done = True
            req.draft_epoch = None
            e.t_step_ids = w.content_ids if self.same_tokenizer else self.target.encode_text(w.text)
            assert len(req.t_view) == e.t_prefix
            req.t_view.extend(e.t_step_ids)
            self._events = True
            self.sched.on_draft_step(req.index, e.slot, epoch, len(w.ids), self._step_end(w))
