"""Mode "fpsr": fully parallel speculative reasoning (docs/method.md, FPSR), driven by the C++ scheduler.

The scheduler (``csrc/scheduler/fpsr_scheduler.h``, through :mod:`dreamr.scheduler`) decides what runs
and what is committed; this executor runs its actions on the two models and reports what finished:

    loop until every request is done (FpsrEngine._drive; the run's state is one _Run object):
        apply the scheduler's actions (launch / cancel / commit / finish; commits through
            RequestState.commit_verified)
        one *chain* forward of the target: the pending verifications of every request, several drafted
            steps of one request in the same pass (a tree mask keeps each verdict prompt private)
        one *branch* forward of the target: every live fallback branch t_i of every open slot of every
            request feeds its pending token and, with token-level speculation, a proposal (its slot's
            drafted step, else n-gram lookup), all in one batched forward with logits at every fed
            position; each row keeps the tokens ops.greedy_verify / ops.speculative_sample accept
        one forward of the draft: every request's running draft step, the same way (n-gram proposals,
            with draft_token_speculation)
        report finished steps / verdicts to the scheduler (a request's verdicts of one pass resolved
            together by ops.cpn_window_accept: its leading accepted run, then the first rejection)

The scheduler's commits are those of the paper's round-by-round loop, whatever the order in which work
finishes, so with greedy decoding FPSR commits exactly the steps of mode "speculative" where both draft
the same steps (``draft_policy="always"``; alpha = 1, where neither drafts).

Adaptive drafting (``draft_policy="adaptive"``, the default;
:class:`dreamr.speculation.AdaptiveDrafting`, one for the batch, carried from run to run as in mode
"speculative"; a seeded sampled request gets its own, and its own proposal gates): before each event it
reports, the executor tells the scheduler whether each request's next position is drafted
(``set_drafting``, set wherever a policy changes). A position without a draft is one target branch at the
committed text (:meth:`_Run._open_alone`), committed once written and continued into the next step
written alone. Each row's forwards are priced as they run (:meth:`_Run._count_row`, in
:class:`~dreamr.speculation.PairCost` units) and each step is reported to the policy once resolved
(:meth:`_Run._observe`). Decisions lag by the positions already open: the window drains before the target
writes alone, so which steps are drafted can differ from mode "speculative".

Token-level speculation (``token_speculation``, ``num_speculative_tokens``; docs/method.md) runs inside
the batched steps as in the sequential modes' :func:`dreamr.speculation.write_step`, and is as lossless:
a row's proposal (:func:`dreamr.speculation.propose`: at most the step's room left) is fed after its
pending token in the pass, :func:`dreamr.speculation.proposal_verdict` decides it from that row's logits,
the row keeps the accepted tokens and its model's own next one, and the rejected tokens are cut from its
cache (one ``ops.kv_rollback`` for all rows of a pass: :meth:`RaggedBatch.truncate_rows`). A fallback
branch proposes its slot's drafted step first (source "step": the draft wrote it for the same prefix; once
finished, or, launched eagerly, as far as the draft has written it), then n-gram lookup over the branch's
ids; the draft's steps propose by n-gram lookup where ``draft_token_speculation`` asks for it (on by
default, as in mode "speculative"); the proposal gate (``proposal_policy="adaptive"``, one per model for
the batch) decides row by row whether a row's proposal is checked. Unlike ``write_step`` nothing is carried
past a step's end (tokens verified past it are dropped: the next step starts on another row or prefix). The counts
(``target_step_forwards``, ``target_proposals``, ...; ``draft_*``) are ``write_step``'s: one step forward
per row fed.

Caches
------
Each model's rows live in :class:`~dreamr.engines.ragged.RaggedBatch` objects (ragged rows over
preallocated storage; see that module). Nothing accepted is recomputed: the target *chain* row of a
request keeps the committed prefix plus the verified drafted steps, new fallback branches fork from it,
and a committed fallback branch becomes the next chain (and, in eager mode, continues as the next head's
branch). Three target batches: ``chains`` (verification), ``branches`` (live fallback decoding) and
``parked`` (finished branches waiting for their slot to resolve; never run), on one
:class:`~dreamr.engines.ragged.KVStore`, so that forks, moves and truncations are ``ops.kv_rollback``
calls inside one storage. One draft batch, on its own store. The batches (their storage and captured
graphs) are kept by the engine from one run to the next; a run reserves the storage it will need at its
start.

On CUDA
-------
- Two streams: the draft's batch runs on its own stream. Each turn queues the draft's forward there
  first, then runs the target's verification and branch forwards on the current stream, and only then
  waits (an event) for the draft's logits, so the two models' kernels overlap.
  Each turn the draft stream waits for the current stream's earlier work and the current stream for
  the draft's, so tensors never cross streams unordered.
- CUDA graphs: the one-token-per-row decode forwards of the branches and the draft are replayed from
  graphs bucketed by batch size and cache width (:mod:`dreamr.engines.decode_graphs`); verification
  chunks, prefills, catch-ups and passes that check a token-level proposal (several tokens per row) and
  shapes outside the buckets run eagerly.
On a CPU the same loop runs without streams or graphs (``cuda_graphs="on"`` runs the bucketed
static-buffer decode path eagerly, which the tests use to check it).

Greedy decoding reproduces mode "speculative" exactly (up to the last bits of batched arithmetic: exact
in float64), with token-level speculation on or off; with sampling the runs are seeded but not the same
draws as mode "speculative" (cancelled work and checked proposals consume random numbers), and each step
keeps its model's distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generator, Optional, Sequence

import torch

from dreamr import ops
from dreamr.config import ReasonerConfig
from dreamr.engines.base import Engine, RequestState, drain, image_prefix, switch, timed, verdict_fits
from dreamr.engines.decode_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs, check_batch_sizes
from dreamr.engines.ragged import KVStore, RaggedBatch, Row
from dreamr.engines.ragged_speculation import cut_rows, decide, take
from dreamr.lm import LM
from dreamr.request import Request
from dreamr.result import Result, Step
from dreamr.sampling import Sampler
from dreamr.scheduler import (WORK_DRAFT, WORK_TARGET, WORK_VERIFY, ActionKind, FinishReason, Scheduler, StepEnd,
                              TargetLaunch)
from dreamr.speculation import AdaptiveDrafting, PairCost, ProposalGate, count_forward, propose, proposer_for
from dreamr.steps import StepWriter, has_answer
from dreamr.verify import StepVerifier

__all__ = ["FpsrEngine", "RaggedBatch", "Row"]


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
    alpha: float = math.nan  # the threshold the verdict was taken at
    t_writer: Optional[StepWriter] = None
    t_cap: int = 0
    branch: Optional[Row] = None  # the target fallback branch (branches batch, or parked)
    t_proposer: Optional[tuple] = None  # (key, proposer) of the branch's token-level speculation (see _branch_proposer)
    t_waiting: bool = False  # launched, waiting for the chain to hold its prefix
    t_done: bool = False
    undrafted: bool = False  # the target writes this step alone (drafting off: no draft, no verdict)
    d_cost: float = 0.0  # this epoch's draft forwards, priced (PairCost; adaptive drafting only)
    t_cost: float = 0.0  # this epoch's fallback branch forwards, priced
    observed: bool = False  # reported to adaptive drafting


@dataclass
class _Req:
    index: int
    request: Request
    state: RequestState
    chain: Row  # target: committed prefix + verified open drafted steps
    d_row: Row  # draft: committed prefix + open drafted steps
    t_view: list[int]  # target ids of committed prefix + finished open drafted steps
    t_sampler: Sampler
    d_sampler: Sampler
    sources: tuple = ()  # token_speculation's sources (config.speculation_sources): the fallback branches'
    k: int = 0  # num_speculative_tokens for the fallback branches (0: no token-level speculation)
    ngram: object = None  # a fallback branch's proposer while it has no drafted step to propose from
    d_proposer: object = None  # the draft's steps' proposer (draft_token_speculation; None: plain decoding)
    d_k: int = 0  # num_speculative_tokens for the draft's steps
    epochs: dict = field(default_factory=dict)
    verify_queue: list = field(default_factory=list)
    draft_epoch: Optional[int] = None
    committed_branch: Optional[tuple] = None  # (epoch, row) of a committed target branch (continuation)
    # a drafted step too long for the target's context once re-tokenized (see base.verdict_fits): the request
    # ends ("length") once every earlier open step is committed, unless a rejection cancels it first
    overflow_epoch: Optional[int] = None
    done: bool = False
    result: Optional[Result] = None
    t_forwards: int = 0
    d_forwards: int = 0
    waste: float = 0.0  # priced draft work of cancelled epochs since the last drafted step reported to the policy
    # adaptive drafting and each model's proposal gate (None: draft every step, check every proposal): the
    # batch's carried ones, or a seeded sampled request's own (its draws must not depend on its batch-mates)
    drafting: Optional[AdaptiveDrafting] = None
    t_gate: Optional[ProposalGate] = None
    d_gate: Optional[ProposalGate] = None


class FpsrEngine(Engine):
    """Mode "fpsr". Knobs, set on the instance (``reasoner.engine("fpsr").target_launch = "on_reject"``):

    - ``target_launch``: "eager" (the paper's: every slot's fallback step starts with its draft step),
      "on_reject" (a fallback step starts once its draft step is rejected) or "auto", the default: eager
      where draft and target work can overlap (a CUDA device, or ``overlap`` on), on-reject on a CPU
      without overlap, where every eagerly decoded target token adds to the wall time (measured on the
      default pair on a CPU core: eager 0.56x the target alone, on-reject 1.18x; both commit the same
      steps with ``draft_policy="always"``; adaptive drafting prices their steps differently).
    - ``draft_tokens_per_tick``: draft tokens per loop turn (> 1 lets the draft run further ahead).
    - ``verify_batch``: a request's drafted steps wait, while its draft runs, until this many can be
      verified in one target pass (default 1: verify each step at once).
    - ``draft_stream``: "auto" (default: on CUDA), "on" or "off": the draft runs on its own CUDA stream.
    - ``cuda_graphs``: "auto" (default: on CUDA), "on" or "off": decode forwards replayed from CUDA graphs
      bucketed by ``graph_batch_sizes`` (on a CPU, "on" runs the same bucketed path eagerly).
    - ``overlap``: the draft's forwards on a worker thread while the target's run on the calling thread
      (the CPU stand-in for a second stream; it pays only with a free core per model; off by default).

    ``last_stats`` holds the scheduler's counters, the executor's forward counts and, per batch, the
    graph counters of the last run. The batches' KV storage (grown to the largest run so far) and graphs
    are kept between runs; :meth:`free` releases them.
    """

    mode = "fpsr"

    def __init__(self, target: LM, draft: LM, *, same_tokenizer: bool = False):
        super().__init__(target, draft, same_tokenizer=same_tokenizer)
        self.target_launch = "auto"
        self.draft_tokens_per_tick = 1
        self.verify_batch = 1
        self.overlap = False
        self.draft_stream = "auto"
        self.graph_batch_sizes = DEFAULT_BATCH_SIZES
        self.last_stats: dict = {}
        self._executor = None
        self._batches: dict = {}  # name -> RaggedBatch, kept across runs (storage and graphs)
        self._batch_key = None

    def free(self) -> None:
        """Drop the kept batches (KV storage, CUDA graphs and the draft stream); the next run rebuilds them."""
        super().free()
        self._batches, self._batch_key = {}, None

    def _make_batches(self) -> dict:
        """The four ragged batches, reused while the settings that shape them are unchanged. The target's
        three share one :class:`~dreamr.engines.ragged.KVStore` (forks and moves between them are
        ``kv_rollback`` copies inside one storage); the draft's batch has its own, on its stream."""
        use_stream = switch("draft_stream", self.draft_stream, self.draft.device)
        use_graphs = switch("cuda_graphs", self.cuda_graphs, self.target.device)
        if use_stream and self.draft.device.type != "cuda":
            raise ValueError(f"draft_stream='on' needs a CUDA draft; the draft is on {self.draft.device}")
        if self.overlap and self.target.device.type == "cuda":
            # the draft on a second host thread: its stream and graph captures would race the main
            # thread's launches (a capture must see no other thread's CUDA calls)
            if any(v is True or v == "on" for v in (self.draft_stream, self.cuda_graphs)):
                raise ValueError("overlap=True (the draft on a worker thread) cannot be combined with "
                                 "draft_stream='on' or cuda_graphs='on' on CUDA; the draft stream already "
                                 "overlaps the two models: set overlap=False")
            use_stream = use_graphs = False
        key = (use_stream, use_graphs, check_batch_sizes(self.graph_batch_sizes))
        if key != self._batch_key:
            stream = torch.cuda.Stream(self.draft.device) if use_stream else None
            target_store = KVStore(self.target)
            self._batches = {name: RaggedBatch(self.target, name, store=target_store)
                             for name in ("chains", "branches", "parked")}
            self._batches["drafts"] = RaggedBatch(self.draft, "drafts", store=KVStore(self.draft, stream))
            if use_graphs:
                for name in ("branches", "drafts"):
                    batch = self._batches[name]
                    if self.cuda_graphs == "auto" and batch.lm.vision:
                        continue  # vision-language forwards are not checked for capture (host reads): eager
                    batch.graphs = DecodeGraphs(batch, key[2])
            self._batch_key = key
        for batch in self._batches.values():
            batch.reset()
            if batch.graphs is not None:
                batch.graphs.reset_stats()
        return dict(self._batches)

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
        run = self._start(requests)
        try:
            while True:
                for item in run.apply_actions():  # launch / cancel / commit / finish
                    yield item
                if run.sched.all_done():
                    break
                run.turn()  # chain forward, branch forward, draft forward, report
        finally:
            self.last_stats = run.close()
        return [r.result for r in run.reqs]

    def _start(self, requests: list[Request]) -> "_Run":
        """A run over ``requests``: settings checked, the scheduler and batches ready, each request's
        rows added (its prompt, on top of its image prefix)."""
        cfg = requests[0].config
        for r in requests[1:]:
            for name in ("window", "alpha", "max_step_tokens", "step_delimiter", "verdict_template",
                         "positive_words", "negative_words", "draft_policy", "proposal_policy"):
                if getattr(r.config, name) != getattr(cfg, name):
                    raise ValueError(f"fpsr: all requests of a batch must share {name}")
            # one verifier and one threshold judge the whole batch (a verify pass scores all its steps)
            if r.verifier is not requests[0].verifier:
                raise ValueError("fpsr: all requests of a batch must share the verifier (verdict_head, calibrate "
                                 "and the verdict settings); run requests with other judges in another batch")
            if r.threshold is not requests[0].threshold:
                raise ValueError("fpsr: all requests of a batch must share the threshold (alpha, target_acceptance, "
                                 "alpha_gamma); run requests with other thresholds in another batch")
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
        # the scheduler is told each verdict as accept / reject (on_verdict): its alpha is a placeholder with "auto"
        sched = Scheduler(window=cfg.window, alpha=0.5 if cfg.auto_alpha else cfg.alpha, target_launch=launch,
                          max_step_tokens=cfg.max_step_tokens)
        batches = self._make_batches()
        run = _Run(sched=sched, cfg=cfg, verifier=requests[0].verifier,  # shared verdict settings (checked above)
                   target=self.target, draft=self.draft, same_tokenizer=self.same_tokenizer, mode=self.mode,
                   observer=self.observer, **batches, ticks=int(self.draft_tokens_per_tick),
                   verify_batch=int(self.verify_batch), pool=self._pool() if self.overlap else None)
        self._reserve(run, requests)
        for i, request in enumerate(requests):
            rc = request.config
            # one drafting policy and one proposal gate per model for the batch, carried from run to run as in
            # mode "speculative" (the costs of drafted steps depend on when fallback steps start); a seeded
            # sampled request gets its own, fresh (Engine.carried)
            drafting, run.pair = self.drafting_policy(rc, policy)
            hopeless = drafting is not None and drafting.accepts_nothing
            rid = sched.add_request(rc.max_new_tokens, 0, drafting is None or drafting.drafts_next())
            assert rid == i
            state = RequestState(rc)
            # an image prompt is encoded once per model here; every row of the request copies its cache
            t_prefix = image_prefix(self.target, request.target_inputs, state.metrics)
            d_prefix = image_prefix(self.draft, request.draft_inputs, state.metrics)
            sources, d_proposer = rc.speculation_sources, proposer_for(rc.draft_speculation_sources)
            run.reqs.append(_Req(
                index=i, request=request, state=state,
                chain=run.chains.add(request.target_ids, owner=i, prefix=t_prefix),
                d_row=run.drafts.add(request.draft_ids, owner=i, prefix=d_prefix),
                t_view=list(request.target_ids),
                t_sampler=self.sampler(rc, 0), d_sampler=self.sampler(rc, 1),
                sources=sources, k=int(rc.num_speculative_tokens) if sources else 0, ngram=proposer_for(sources),
                d_proposer=d_proposer, d_k=int(rc.num_speculative_tokens) if d_proposer is not None else 0,
                drafting=drafting, t_gate=self.proposal_gate("target", rc),
                d_gate=None if hopeless else self.proposal_gate("draft", rc),  # (hopeless: no draft steps)
            ))
        return run

    def _reserve(self, run: "_Run", requests: list[Request]) -> None:
        """Reserve the batches' storage for the whole run up front (rows for every request's window,
        columns for its longest row), so that a long run does not reallocate it, which would drop and
        recapture every CUDA graph.

        A batch's width runs up to twice its longest row before a compaction (ragged.py), a forward adds
        up to ``num_speculative_tokens + 1`` columns (a proposal after the pending token), and a graph's
        width bucket is the next power of two: the columns reserved are the bucket of twice the longest
        row a request can reach plus one proposal. A rare wider forward still grows the storage, as
        without a reserve.

        Only where decode graphs run (on CUDA by default): without graphs nothing is lost by growing on
        demand, and the worst case reserved here (every slot's branch live and parked at once) is more
        than most runs use."""
        if all(b.graphs is None for b in (run.branches, run.drafts)):
            return
        n, window = len(requests), int(run.cfg.window)
        longest = max(max(len(r.target_ids), len(r.draft_ids)) + r.config.max_new_tokens for r in requests)
        longest = min(longest + run.suffix_len + int(run.cfg.max_step_tokens),
                      max(self.target.context_length, self.draft.context_length))
        fed = 1 + max(int(r.config.num_speculative_tokens) if (r.config.speculation_sources
                                                              or r.config.draft_speculation_sources) else 0
                      for r in requests)
        columns = 1 << (2 * longest + fed).bit_length()
        for batch, rows in ((run.chains, n), (run.branches, n * window), (run.parked, n * window),
                            (run.drafts, n)):
            if batch.graphs is not None:  # the row bucket the graphs will pad to
                rows = next((b for b in batch.graphs.batch_sizes if b >= rows), rows)
            batch.reserve(rows, columns)



# --------------------------------------------------------------------------------------------------
# One run: its state in one object, one turn of the loop on one screen
# --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """The state of one FPSR run (one batch of requests), and the executor's steps over it.

    The engine builds it (:meth:`FpsrEngine._start`) and drives it: :meth:`apply_actions` (the scheduler's poll), then
    :meth:`turn`, until the scheduler is done.
    """

    sched: Scheduler
    cfg: ReasonerConfig  # the batch's shared verdict settings (window, alpha, step delimiter, ...)
    verifier: StepVerifier  # the batch's one verifier (tests may swap its cpn for a fixed judge)
    target: LM
    draft: LM
    same_tokenizer: bool
    mode: str
    observer: object  # the engine's debug hook, or None
    chains: RaggedBatch  # target: each request's committed prefix + verified open drafted steps
    branches: RaggedBatch  # target: live fallback branches
    parked: RaggedBatch  # target: finished branches waiting for their slot to resolve (never run)
    drafts: RaggedBatch  # draft: each request's committed prefix + open drafted steps
    ticks: int  # draft tokens per turn
    verify_batch: int
    pool: object = None  # the draft's worker thread (overlap=True), or None
    pair: Optional[PairCost] = None  # what adaptive drafting prices steps in (None: it weighs nothing)
    reqs: list = field(default_factory=list)  # _Req per request, by scheduler id
    forwards: dict = field(default_factory=lambda: {"chain": 0, "branch": 0, "draft": 0})
    multi_verify: int = 0  # chain passes that verified several steps of one request
    events: bool = False  # this turn reported something to the scheduler (or changed its state)
    job: object = None  # the draft's running forwards on the worker thread

    @property
    def suffix_len(self) -> int:
        return self.verifier.reserve

    def metrics(self) -> list:
        return [r.state.metrics for r in self.reqs if not r.done]

    def turn(self) -> None:
        """One turn after the actions are applied: the draft's forward is queued first (its own stream or
        thread), the target's chain and branch forwards run here meanwhile, then the draft's finished
        steps are reported."""
        live = [(r, r.draft_epoch) for r in self.reqs if not r.done and r.draft_epoch is not None]
        self.job = self.pool.submit(self._draft_job, live, self.ticks) if (self.pool and live) else None
        launched = self._draft_launch(live) if (live and self.job is None and self.drafts.stream is not None) else None
        worked = False
        with timed("verify_time_s", *self.metrics()):
            worked |= self._count("chain", self._chain_forward())  # verify queued drafted steps
        with timed("target_time_s", *self.metrics()):
            self._materialize_branches()
            worked |= self._count("branch", self._branch_forward())  # one token per live fallback branch
        if live:
            with timed("draft_time_s", *self.metrics()):  # with a stream or a thread: the wait for the draft
                passes, finished, spent = self.job.result() if self.job is not None else self._draft_job(
                    live, self.ticks, launched)
            self.forwards["draft"] += passes
            # adaptive drafting charges the draft's forwards only where they added to the turn: not where
            # they ran on their own thread or stream beside the target's
            if not (worked and (self.job is not None or launched is not None)):
                for e, cost in spent:
                    e.d_cost += cost
            worked = True
            self._draft_finish(finished)  # report finished draft steps
        if not worked and not self.events:
            raise RuntimeError("fpsr: no work to run and no action to apply; scheduler state: "
                               + str([self.sched.info(r.index) for r in self.reqs if not r.done]))

    def _count(self, name: str, ran: bool) -> bool:
        self.forwards[name] += int(ran)
        return ran

    def close(self) -> dict:
        """End the run (normally or on an error): the stats, and every batch emptied for the next run."""
        if self.job is not None and not self.job.done():
            self.job.exception()  # an error on this thread: let the draft's forward finish first
        stats = dict(self.sched.stats())
        stats.update({f"{k}_forwards": v for k, v in self.forwards.items()})
        stats["multi_step_verify_passes"] = self.multi_verify
        stats["draft_stream"] = self.drafts.stream is not None
        if self.drafts.stream is not None:  # later work on the current stream sees the draft's
            torch.cuda.current_stream(self.draft.device).wait_stream(self.drafts.stream)
        for batch in (self.chains, self.branches, self.parked, self.drafts):
            if batch.graphs is not None:
                stats.update({f"{batch.name}_{k}": v for k, v in batch.graphs.stats.items()})
            batch.reset()
        return stats

    def apply_actions(self) -> list:
        """Poll the scheduler and apply its actions; the steps committed, as ``(request, Step)``."""
        self.events = False
        with timed("scheduler_time_s", *self.metrics()):
            return self._apply(self.sched.poll())

    # -- actions -----------------------------------------------------------------------------------

    def _apply(self, actions) -> list:
        committed = []
        touched = set()
        for a in actions:
            req = self.reqs[a.request]
            touched.add(a.request)
            k = a.kind
            if k in (ActionKind.LAUNCH_DRAFT, ActionKind.LAUNCH_VERIFY, ActionKind.LAUNCH_TARGET) and (
                    self.sched.done(a.request)):
                continue  # the request was aborted earlier in this batch (a full context): its FINISH follows
            if k == ActionKind.LAUNCH_DRAFT:
                self._launch_draft(req, a)
            elif k == ActionKind.LAUNCH_VERIFY:
                req.verify_queue.append(a.epoch)
            elif k == ActionKind.LAUNCH_TARGET:
                # an epoch with no draft before it: the target writes this step alone
                if a.epoch in req.epochs or self._open_alone(req, a):
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
            self.events = True
            return
        e.d_writer = StepWriter(self.draft.tokenizer, self.draft.eos_ids, self.cfg.step_delimiter, cap)
        req.draft_epoch = a.epoch

    def _open_alone(self, req: _Req, a) -> bool:
        """Open the epoch of a step the target writes alone (drafting off), at the committed text; the
        drafting policy counts the step off its wait. False where no model has room for it (the request
        ends)."""
        cap = self._room(req, a.tokens)
        req.epochs[a.epoch] = _Epoch(a.request, a.slot, a.step, d_prefix=len(req.d_row.ids), t_prefix=len(req.t_view),
                                     cap=cap, accepted=False, undrafted=True)
        if req.drafting is not None:
            req.drafting.should_draft()
            self._tell_drafting()
        if cap <= 0:  # a model's context is full: the request ends here (as in mode "speculative")
            req.state.finish_reason = "length"
            self.sched.abort(a.request)
            self.events = True
            return False
        return True

    def _tell_drafting(self) -> None:
        """Tell the scheduler, for every running request, whether the next position it opens is drafted.
        Called wherever a policy changes (a step observed, a step opened alone), so always before the next
        event is reported (the scheduler opens positions while it takes events)."""
        for req in self.reqs:
            if not req.done and req.drafting is not None:
                self.sched.set_drafting(req.index, req.drafting.drafts_next())

    def _observe(self, req: _Req, e: _Epoch) -> None:
        """Report a resolved step to adaptive drafting (once): a step alone once written; a drafted step
        once accepted, or once rejected and its fallback step written. A drafted step is charged its
        draft's forwards, its verification and the draft forwards of cancelled epochs since the last one.
        Work that overlaps other work is not charged: a fallback branch thrown away (eager launch, the step
        accepted or cancelled; eager launch is the choice where branches overlap the draft: a GPU, or
        ``overlap``), and draft forwards that ran on their own thread or stream beside target forwards."""
        if req.drafting is None or self.pair is None or e.observed:
            return
        e.observed = True
        if e.undrafted:
            req.drafting.alone(cost=e.t_cost, tokens=len(e.t_writer.ids))
        else:
            if not e.accepted:  # early stopping drops every later open step: charge their draft work here
                for later in req.epochs.values():
                    if later.step > e.step and not later.observed:
                        req.waste, later.d_cost = req.waste + later.d_cost, 0.0
            verify = self.pair.verification(len(e.t_step_ids) + len(self.verifier.suffix_ids(e.d_writer.text)))
            req.drafting.drafted(accepted=bool(e.accepted), draft_cost=e.d_cost + req.waste,
                                  draft_tokens=len(e.d_writer.ids),
                                  verify_cost=verify, fallback_cost=0.0 if e.accepted else e.t_cost,
                                  fallback_tokens=0 if e.accepted else len(e.t_writer.ids))
            req.waste = 0.0
        self._tell_drafting()

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
        if a.epoch == req.overflow_epoch and a.aux & WORK_DRAFT:
            req.overflow_epoch = None  # an earlier step was rejected: the overflowing step is dropped
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
        if not e.observed and self.sched.slot_epoch(req.index, e.slot) != a.epoch:  # dropped: never resolved
            req.waste += e.d_cost
            e.d_cost = 0.0
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
        """Commit the head step of ``req`` (a COMMIT_DRAFT or COMMIT_TARGET action) through
        :meth:`RequestState.commit_verified`; a committed fallback branch becomes the request's chain."""
        e = req.epochs[a.epoch]
        if a.kind == ActionKind.COMMIT_DRAFT:
            assert e.d_done and e.accepted and e.in_chain
            fallback = None
            self._drop_branch(e)  # an eager fallback branch is not needed (its CANCEL finds the epoch gone)
        else:
            fallback = e.t_writer
            assert e.t_done and e.accepted is False
            row = e.branch
            e.branch = None
            # the committed prefix becomes P + t_i in both models
            del req.t_view[e.t_prefix:]
            req.t_view.extend(row.ids[e.t_prefix:])
            assert len(row.ids) == len(req.t_view)
            self._stop_draft(req, req.draft_epoch)
            self.drafts.truncate(req.d_row, min(len(req.d_row.ids), e.d_prefix))
            req.d_row.ids.extend(self.draft.step_ids(fallback, self.same_tokenizer))
            self.chains.release(req.chain)
            req.chain = self.chains.fork(row, len(row.ids))
            req.committed_branch = (a.epoch, row)
        if e.undrafted:  # written by the target alone: nothing was verified
            req.state.metrics.undrafted_steps += 1
            step = req.state.commit_written(fallback, "target")
        else:
            req.request.judged(bool(e.accepted), e.alpha)  # alpha="auto" learns from resolved steps only
            step = req.state.commit_verified(e.d_writer, e.cpn, fallback, alpha=e.alpha)
        req.epochs.pop(a.epoch, None)
        if self.observer is not None:  # debug hook: the target chain and the draft row (Row objects)
            self.observer(req.chain, req.d_row)
        if req.state.finish_reason is None:
            self._end_at_overflow(req)
        return step

    def _end_at_overflow(self, req: _Req) -> None:
        """End the request ("length", as mode "speculative" does) at its overflowing drafted step once no
        earlier step is open: the step would then be the next one verified, and cannot be."""
        e = req.epochs.get(req.overflow_epoch) if req.overflow_epoch is not None else None
        if e is None or any(o.step < e.step for o in req.epochs.values()):
            return
        req.overflow_epoch = None
        req.state.finish_reason = "length"
        self.sched.abort(req.index)
        self.events = True

    def _finish(self, req: _Req, a) -> None:
        state = req.state
        if state.finish_reason is None:
            state.finish_reason = {FinishReason.EOS: "eos", FinishReason.ANSWER_MARKER: "answer"}.get(a.aux, "length")
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
        req.overflow_epoch = None
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
        # calibration: the null step as a private segment right before each step, so it sits at the step's prefix
        null_ids = self.verifier.null_ids() if self.verifier.calibrate else None
        for req in self.reqs:
            if req.done:
                continue
            segs = []
            expect = len(req.chain.ids)
            queue = req.verify_queue
            if req.draft_epoch is not None and len(queue) < int(self.verify_batch):
                queue = []  # wait for more drafted steps: one pass verifies them together
            if len(queue) > 1:
                self.multi_verify += 1
            for epoch in queue:
                e = req.epochs[epoch]
                assert e.t_step_ids is not None and expect == e.t_prefix, (expect, e.t_prefix)
                expect += len(e.t_step_ids)
                w = e.d_writer
                null_seg = None
                if null_ids is not None:
                    segs.append((null_ids, False))
                    null_seg = len(segs) - 1
                segs += [(e.t_step_ids, True), (self.verifier.suffix_ids(w.text), False)]
                jobs.append((req, epoch, len(segs) - 1, null_seg))
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
            hidden = torch.stack([out[req.chain][1][j] for req, _, j, _ in jobs])
            alpha = self.reqs[0].request.alpha()  # fixed, or alpha="auto"'s value (one rule for the batch)
            if null_ids is None:
                cpn, _ = self.verifier.cpn(hidden, alpha)
            else:
                null = torch.stack([out[req.chain][1][n] for req, _, _, n in jobs])
                cpn, _ = self.verifier.cpn(hidden, alpha, null)
            self._resolve_windows(jobs, cpn, alpha)
        return True

    def _resolve_windows(self, jobs: list, cpn: torch.Tensor, alpha: float) -> None:
        """Turn the verdicts of one chain pass into accept / reject per drafted step, window by window.

        ``jobs`` are ``(req, epoch, ...)`` in step order within each request, ``cpn [len(jobs)]`` their
        scores. :func:`dreamr.ops.cpn_window_accept` takes each request's verified steps as one row of a
        ``[R, W]`` window and gives its leading accepted run: the steps before the first rejection are
        accepted, that one rejected; the steps after it are not reported (the rejection cancels them:
        docs/method.md, FPSR: early stopping).
        """
        cpn = cpn.detach().float().cpu()  # one device read for the whole pass
        rows: dict[int, list[int]] = {}
        for j, (req, _, _, _) in enumerate(jobs):
            rows.setdefault(req.index, []).append(j)
        width = max(len(v) for v in rows.values())
        window = torch.zeros(len(rows), width, dtype=torch.float32)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, js in enumerate(rows.values()):
            window[r, :len(js)] = cpn[js]
            valid[r, :len(js)] = True
        num_accepted, _ = ops.cpn_window_accept(window, valid, alpha)
        for js, n in zip(rows.values(), num_accepted.tolist()):
            for w, j in enumerate(js[:n + 1]):  # the accepted run, then its first rejection (if any)
                req, epoch, _, _ = jobs[j]
                e = req.epochs[epoch]
                e.cpn, e.accepted, e.alpha = float(cpn[j]), w < n, alpha
                if e.accepted or e.t_done:  # (rejected: reported once its fallback step is written)
                    self._observe(req, e)
                self.events = True
                self.sched.on_verdict(req.index, e.slot, epoch, w < n)

    def _branch_forward(self) -> bool:
        """One target forward of every live fallback branch: each feeds its pending token and, with
        token-level speculation, a proposal (:meth:`_branch_proposer`), checked in the same pass."""
        live = [(req, epoch, e) for req in self.reqs for epoch, e in req.epochs.items()
                if e.branch is not None and not e.t_done]
        if not live:
            return False
        proposals = [propose(self._branch_proposer(req, e), e.branch.ids, e.t_writer, req.k, req.t_gate)
                     for req, _, e in live]
        logits = self.branches.next_token_logits([e.branch for _, _, e in live], proposals)
        decided = decide([req.t_sampler for req, _, _ in live], proposals, logits)
        counted, cuts = set(), []
        for (req, _, e), proposal, (tokens, accepted) in zip(live, proposals, decided):
            if req.index not in counted:
                req.t_forwards += 1
                counted.add(req.index)
            e.t_cost += self._count_row(req, "target", proposal, accepted, req.t_gate)
            taken, cut = take(e.branch, e.t_writer, proposal, tokens)
            req.state.metrics.target_tokens += taken
            if cut is not None:
                cuts.append(cut)
        cut_rows(self.branches, cuts)
        for req, epoch, e in live:  # after the cuts: a finished branch's row moves with its final cache
            w = e.t_writer
            if w.end is not None:
                e.t_done = True
                e.branch = self.branches.move(e.branch, self.parked)
                if e.undrafted or e.accepted is False:  # (a verdict still to come reports it)
                    self._observe(req, e)
                self.events = True
                self.sched.on_target_step(req.index, e.slot, epoch, len(w.ids), self._step_end(w))
        return True

    def _count_row(self, req: _Req, role: str, proposal: list, accepted: int, gate: Optional[ProposalGate]
                   ) -> float:
        """Count one row's forward in the request's metrics and the proposal gate; return what it cost,
        priced for adaptive drafting (0 without it)."""
        count_forward(req.state.metrics, role, proposal, accepted, gate)
        return self.pair.forwards(role, 1, int(bool(proposal)), len(proposal)) if self.pair is not None else 0.0

    def _branch_proposer(self, req: _Req, e: _Epoch):
        """The proposer of ``e``'s fallback branch (None: no token-level speculation), best source first.

        The branch writes the step its slot's drafted step was written for (the same prefix), so that
        drafted step, in the target's tokens, is source "step" (:class:`~dreamr.speculation.RejectedStepProposer`)
        as in mode "speculative": once the draft has finished it (``t_step_ids``), or, while the draft is
        still writing it (eager launch), as far as it is written, re-tokenized each time it grows. Not
        while the draft's forwards run on the worker thread (``overlap``): its writer changes under this
        thread there. Without a drafted step, n-gram lookup alone."""
        if not req.k:
            return None
        if "step" not in req.sources:
            return req.ngram
        if e.t_step_ids is not None:
            key = -1
        elif self.pool is None and e.d_writer is not None and e.d_writer.ids:
            key = len(e.d_writer.ids)
        else:
            return req.ngram
        if e.t_proposer is None or e.t_proposer[0] != key:
            step_ids = e.t_step_ids if key < 0 else self.target.step_ids(e.d_writer, self.same_tokenizer)
            e.t_proposer = (key, proposer_for(req.sources, rejected_step=step_ids))
        return e.t_proposer[1]

    def _draft_job(self, live: list, ticks: int, launched=None) -> tuple[int, list, list]:
        """Up to ``ticks`` draft forwards (each running draft step feeds its pending token and, with
        ``draft_token_speculation``, an n-gram proposal); the first one's logits may come from
        :meth:`_draft_launch` (already running on the draft's stream).

        Touches only draft-side state (the draft batch and rows, the draft writers, sampler and proposal
        gate), so it may run on its own thread while the target's forwards run. Returns the forwards run,
        the finished steps (reported to the scheduler by :meth:`_draft_finish` on the driving thread) and
        ``(epoch, priced cost)`` per row forward, for adaptive drafting.
        """
        finished, passes, spent = [], 0, []
        for tick in range(ticks):
            live = [(req, epoch) for req, epoch in live if (req, epoch) not in finished]
            if not live:
                break
            if self.drafts.stream is None:
                logits, proposals = self._draft_forward(live)
            else:  # the first forward may already be running (queued before the target's work)
                logits, proposals = self._draft_wait(
                    launched if (tick == 0 and launched is not None) else self._draft_launch(live))
            passes += 1
            decided = decide([req.d_sampler for req, _ in live], proposals, logits)
            cuts = []
            for (req, epoch), proposal, (tokens, accepted) in zip(live, proposals, decided):
                req.d_forwards += 1
                spent.append((req.epochs[epoch], self._count_row(req, "draft", proposal, accepted, req.d_gate)))
                w = req.epochs[epoch].d_writer
                taken, cut = take(req.d_row, w, proposal, tokens)
                req.state.metrics.draft_tokens += taken
                if cut is not None:
                    cuts.append(cut)
                if w.end is not None:
                    finished.append((req, epoch))
            cut_rows(self.drafts, cuts)
        return passes, finished, spent

    def _draft_forward(self, live: list) -> tuple[torch.Tensor, list]:
        """One draft forward for the running draft steps, each fed its n-gram proposal (if any, with
        ``draft_token_speculation``):
        ``(logits, proposals)``, the logits packed row by row as
        :meth:`~dreamr.engines.ragged.RaggedBatch.next_token_logits` returns them (``[len(live), V]``
        without proposals)."""
        proposals = [propose(req.d_proposer, req.d_row.ids, req.epochs[epoch].d_writer, req.d_k, req.d_gate)
                     for req, epoch in live]
        return self.drafts.next_token_logits([req.d_row for req, _ in live], proposals), proposals

    def _draft_launch(self, live: list):
        """Queue one draft forward on the draft's stream (after the current stream's earlier work) and
        return without waiting for it: ``(logits, proposals, event)``."""
        stream = self.drafts.stream
        logits, proposals = self._draft_forward(live)  # on_stream: the draft stream first waits for the current one
        event = torch.cuda.Event()
        event.record(stream)
        return logits, proposals, event

    def _draft_wait(self, launched) -> tuple[torch.Tensor, list]:
        """The logits (and proposals) of a launched draft forward, once its event has fired; the current
        stream is ordered after the draft's work and ``logits`` is marked as used there (the allocator
        must not hand its memory back to the draft stream while the current stream still reads it)."""
        logits, proposals, event = launched
        current = torch.cuda.current_stream(self.draft.device)
        current.wait_event(event)
        logits.record_stream(current)
        return logits, proposals

    def _draft_finish(self, finished: list) -> None:
        for req, epoch in finished:
            e = req.epochs[epoch]
            w = e.d_writer
            e.d_done = True
            req.draft_epoch = None
            e.t_step_ids = self.target.step_ids(w, self.same_tokenizer)
            assert len(req.t_view) == e.t_prefix
            if not verdict_fits(self.target, e.t_prefix, e.t_step_ids, self.verifier.suffix_ids(w.text)):
                req.overflow_epoch = epoch  # never verified: the request ends here (or a rejection drops it)
                self._end_at_overflow(req)
                continue
            req.t_view.extend(e.t_step_ids)
            self.events = True
            self.sched.on_draft_step(req.index, e.slot, epoch, len(w.ids), self._step_end(w))
