"""Plumbing shared by every engine: a request's bookkeeping and commits, each model's sequence and sampler.

Steps are written by :func:`dreamr.speculation.write_step` (token by token, or by verified proposals).

An engine takes requests (:class:`dreamr.request.Request`, built by the front) and returns results;
``stream`` yields each step as it is committed. Engines differ only in orchestration: who writes a step,
who verifies it. The sequential engines run the requests of a batch one after another (so a batch gives
exactly the single-request results); the FPSR engine overrides :meth:`Engine.run` to interleave them.
Model facts come from :mod:`dreamr.lm`, the verifier from the request (see ``docs/architecture.md``).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Optional, Sequence, Union

import torch

from dreamr.cache import CachedSequence, encode_prefix
from dreamr.config import ReasonerConfig
from dreamr.engines.ragged_sequence import RaggedSequence, SequencePool
from dreamr.lm import LM, ragged_masks_fit
from dreamr.request import Request
from dreamr.result import Metrics, Result, Step
from dreamr.sampling import Sampler
from dreamr.speculation import AdaptiveDrafting, ForwardCost, PairCost, ProposalGate, measure_forward_cost
from dreamr.steps import StepWriter, has_answer


@dataclass
class RequestState:
    """Bookkeeping of one request while an engine runs it."""

    config: ReasonerConfig
    steps: list[Step] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    start: float = field(default_factory=time.perf_counter)
    finish_reason: Optional[str] = None

    @property
    def budget_left(self) -> int:
        return self.config.max_new_tokens - self.metrics.committed_tokens

    def commit(self, step: Step, ended_by: str) -> Step:
        """Record a committed step and decide whether the request is done."""
        self.steps.append(step)
        self.metrics.num_steps += 1
        self.metrics.committed_tokens += step.num_tokens
        if ended_by == "eos":
            self.finish_reason = "eos"
        elif has_answer(step.text, self.config.answer_marker):
            self.finish_reason = "answer"
        elif self.budget_left <= 0:
            self.finish_reason = "length"
        return step

    def commit_written(self, writer: StepWriter, source: str) -> Step:
        """Commit a step ``source`` ("target" or "draft") wrote unverified (the single-model modes)."""
        return self.commit(Step(writer.text, source, None, None, len(writer.ids)), writer.end)

    def commit_verified(self, drafted: StepWriter, cpn: float, fallback: Optional[StepWriter] = None,
                        alpha: Optional[float] = None) -> Step:
        """Commit the outcome of one verified drafted step and count it in the metrics.

        Parameters
        ----------
        drafted : the draft's step (its writer), verified with verdict ``cpn`` (NaN: not finite)
        fallback : None where the step was accepted (``drafted`` is committed); else the target's step
            written in its place (committed, with ``drafted`` kept as the rejected text)
        alpha : the threshold the verdict was taken at (default: the config's fixed alpha)
        """
        m = self.metrics
        m.verified_steps += 1
        if alpha is None:
            alpha = float(self.config.alpha) if not self.config.auto_alpha else float("nan")
        m.alpha_sum += alpha
        m.alpha_final = alpha
        if math.isnan(cpn):
            m.nonfinite_verdicts += 1
        if fallback is None:
            m.accepted_steps += 1
            return self.commit(Step(drafted.text, "draft", cpn, True, len(drafted.ids), alpha=alpha), drafted.end)
        step = Step(fallback.text, "target", cpn, False, len(fallback.ids), rejected_text=drafted.text,
                    rejected_num_tokens=len(drafted.ids), alpha=alpha)
        return self.commit(step, fallback.end)

    def result(self, mode: str) -> Result:
        self.metrics.wall_time_s = time.perf_counter() - self.start
        return Result(
            text="".join(s.text for s in self.steps),
            steps=self.steps,
            metrics=self.metrics.finalize(),
            finish_reason=self.finish_reason or "length",
            mode=mode,
        )


def image_prefix(lm: LM, inputs: Optional[dict], metrics: Optional[Metrics] = None):
    """``lm``'s image prefix for a request (a :class:`dreamr.cache.ImagePrefix`), encoded now, once,
    and timed into ``metrics.image_prompt_time_s``; None where ``inputs`` is None (no image for this model)."""
    if inputs is None:
        return None
    prefix = encode_prefix(lm.model, inputs)
    if metrics is not None:
        metrics.image_prompt_time_s += prefix.encode_time_s
    return prefix


def switch(name: str, value, device: torch.device) -> bool:
    """An "auto" / "on" / "off" engine setting (or a bool) resolved for ``device``: "auto" is on CUDA."""
    if value not in ("auto", "on", "off", True, False):
        raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {value!r}")
    return device.type == "cuda" if value == "auto" else value in ("on", True)


ModelSequence = Union[CachedSequence, RaggedSequence]  # a model's sequence in a sequential engine


def step_cap(state: RequestState, *seqs_and_lms: tuple[ModelSequence, LM], reserve: int = 0) -> int:
    """Tokens the next step may take: the step cap, the budget left, and each model's room left."""
    cap = min(state.config.max_step_tokens, state.budget_left)
    for seq, lm in seqs_and_lms:
        cap = min(cap, lm.context_length - len(seq.ids) - reserve)
    return cap


def verdict_fits(target: LM, prefix_len: int, step_ids: Sequence[int], suffix_ids: Sequence[int]) -> bool:
    """Whether the target can verify a drafted step: its prefix, the step in the target's tokens and the
    verdict prompt fit in the target's context.

    :func:`step_cap` reserves the verdict prompt's room in the draft's tokens; re-tokenized for the target
    a step can come out longer. An engine that finds a step that does not fit ends the request there
    ("length": the target's context is used up), without committing the step."""
    return prefix_len + len(step_ids) + len(suffix_ids) <= target.context_length


@contextmanager
def timed(field_name: str, *metrics: Metrics):
    """Add the block's wall-clock seconds to ``metrics.<field_name>`` (a phase time) of each given Metrics."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        for m in metrics:
            setattr(m, field_name, getattr(m, field_name) + elapsed)


def drain(gen: Generator[Any, None, Any]) -> Any:
    """Run a generator to its end and return its return value (the engines' streams return results)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


class Engine:
    """Base of the engines: ``run(requests) -> results`` and ``stream(request)`` over committed steps.

    The engines of :data:`dreamr.config.VERIFIED_MODES` read their verifier from ``request.verifier``."""

    mode = ""

    def __init__(self, target: LM, draft: LM, *, same_tokenizer: bool = False):
        self.target, self.draft = target, draft
        # True when both models tokenize alike: steps then pass between them as token ids, not text.
        self.same_tokenizer = same_tokenizer
        # Debug hook: called as observer(target_seq, draft_seq) after each committed step (either may be
        # None). Tests use it to hold the caches to a fresh prefill of the committed text, that is of the committed
        # token ids (the truth; the text is their decode: steps are re-tokenized one at a time, so the ids need
        # not equal a re-tokenization of the joined text).
        self.observer = None
        # Each model's forward costs on this machine, by (role, longest proposal), with "graphs" appended where
        # the decode replays CUDA graphs (cuda_graphs): measured once, at the first request that weighs them
        # (a few seconds for the default pair on a CPU thread), kept for every later one. Set entries to pin
        # them (decisions then no longer depend on this machine's timings).
        self.forward_costs: dict[tuple, ForwardCost] = {}
        # The adaptive policies (proposal gates, adaptive drafting), carried from request to request: what
        # drafting a step or checking a guess costs here is a property of the models, the judge and the
        # machine, and one request has few steps to learn it from. Keyed by what each depends on; clear()
        # starts afresh (a request's text at alpha < 1 depends on which steps were drafted, so on this).
        self.adaptive_state: dict[tuple, Any] = {}
        # "auto" (default: on CUDA), "on" or "off": one-token decode forwards replayed from CUDA graphs. The
        # sequential engines then hold each model's sequence as a RaggedSequence (preallocated storage,
        # kept with its graphs from request to request in a SequencePool); on a CPU "on" runs the same
        # bucketed forward eagerly (how the tests check it). Mode "fpsr" reads it for its ragged batches.
        self.cuda_graphs = "auto"
        self._sequence_pools: dict[str, SequencePool] = {}  # by role

    def free(self) -> None:
        """Drop the kept KV storage and CUDA graphs; the next request builds them again."""
        self._sequence_pools = {}

    def _lm(self, role: str) -> LM:
        return self.target if role == "target" else self.draft

    def _sequence_pool(self, role: str) -> Optional[SequencePool]:
        """The ``role`` model's pool of graphed sequences, or None where its decode runs without graphs
        (``cuda_graphs``). "auto" leaves eager a vision-language model (its forwards are not checked for
        capture) and a model whose attention the ragged masks do not reproduce (chunked or hybrid layers,
        flash attention: :func:`dreamr.lm.ragged_masks_fit`); "on" runs them graphed or says why not."""
        lm = self._lm(role)
        if not switch("cuda_graphs", self.cuda_graphs, lm.device):
            return None
        if self.cuda_graphs == "auto" and (lm.vision or not ragged_masks_fit(lm.model)):
            return None
        if role not in self._sequence_pools:
            self._sequence_pools[role] = SequencePool(lm, role)
        return self._sequence_pools[role]

    def open_sequence(self, role: str, request: Request, metrics: Metrics, reserve: int = 0) -> ModelSequence:
        """The ``role`` model's sequence for ``request``: its prompt on top of its image prefix, if it has
        one, as a :class:`RaggedSequence` from the model's pool where decode graphs run (its storage
        reserved for the request's longest sequence, ``reserve``: the verdict prompt's room) and a
        :class:`CachedSequence` elsewhere."""
        lm, cfg = self._lm(role), request.config
        ids = request.target_ids if role == "target" else request.draft_ids
        prefix = image_prefix(lm, request.target_inputs if role == "target" else request.draft_inputs, metrics)
        pool = self._sequence_pool(role)
        if pool is None:
            return CachedSequence(lm.model, ids, prefix=prefix)
        longest = len(ids) + cfg.max_new_tokens + cfg.max_step_tokens + reserve + cfg.num_speculative_tokens + 1
        return pool.open(ids, prefix=prefix, longest=min(longest, lm.context_length))

    def decode_graph_stats(self) -> dict:
        """Per model ("target", "draft"), the decode-graph counters of the sequences last opened
        (:attr:`dreamr.engines.decode_graphs.DecodeGraphs.stats`); empty where graphs are off."""
        return {role: pool.stats() for role, pool in self._sequence_pools.items()}

    def forward_cost(self, role: str, num_speculative_tokens: int) -> ForwardCost:
        """The :class:`ForwardCost` of the ``role`` model ("target" or "draft") for proposals of up to
        ``num_speculative_tokens`` tokens, timed on the kind of sequence this engine decodes it with."""
        pool = self._sequence_pool(role)
        # (role, K), and "graphs" last where the forwards replay CUDA graphs: they cost less than eager ones
        key = (role, max(int(num_speculative_tokens), 1)) + (() if pool is None else ("graphs",))
        if key not in self.forward_costs:
            graphed = {} if pool is None else {"open_sequence": lambda ids: pool.open(ids)}
            self.forward_costs[key] = measure_forward_cost(self._lm(role), key[1], **graphed)
        return self.forward_costs[key]

    def proposal_gate(self, role: str, config: ReasonerConfig) -> Optional[ProposalGate]:
        """The :class:`ProposalGate` of the ``role`` model's steps (carried from request to request); None
        where every proposal is checked (``proposal_policy``) or there are none (``token_speculation`` /
        ``draft_token_speculation`` "off")."""
        sources = config.speculation_sources if role == "target" else config.draft_speculation_sources
        if not (sources and config.adaptive_proposals):
            return None
        cost = self.forward_cost(role, config.num_speculative_tokens)
        return self.carried(("proposal_gate", role, config.num_speculative_tokens), cost, lambda: ProposalGate(cost),
                            config)

    def drafting_policy(self, config: ReasonerConfig, *key: Any) -> tuple[Optional[AdaptiveDrafting],
                                                                          Optional[PairCost]]:
        """A request's adaptive drafting (``draft_policy``; None: every step is drafted) and the costs it
        weighs steps in (None where it weighs none: at a fixed alpha >= 1, where no verdict accepts, it
        drafts nothing). Carried from request to request at the same threshold, mode and ``key`` (the
        acceptance it estimates depends on alpha, the costs on how the mode runs the steps)."""
        if not config.adaptive_drafting:
            return None, None
        if not config.auto_alpha and float(config.alpha) >= 1.0:
            return AdaptiveDrafting(accepts_nothing=True), None
        k = config.num_speculative_tokens
        pair = PairCost(self.forward_cost("target", k), self.forward_cost("draft", k))
        return self.carried(("drafting", self.mode, *key, config.alpha, k), pair, AdaptiveDrafting, config), pair

    def carried(self, key: tuple, costs: Any, make: Callable[[], Any], config: ReasonerConfig) -> Any:
        """The adaptive policy kept under ``key`` (:attr:`adaptive_state`), made anew by ``make()`` where
        there is none or it weighed other ``costs`` (pinned since). A seeded sampled request gets a fresh
        one, kept for no other: which forwards check a proposal changes which random numbers are drawn, and
        a seed must fix a request's draws whatever ran before it."""
        if config.temperature > 0 and config.seed is not None:
            return make()
        held = self.adaptive_state.get(key)
        if held is None or held[0] != costs:
            held = self.adaptive_state[key] = (costs, make())
        return held[1]

    def run(self, requests: Sequence[Request], progress: bool = False) -> list[Result]:
        """Results of ``requests`` in order. Sequential engines run them one at a time."""
        items: Iterator[Request] = iter(requests)
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(requests, desc=f"dreamr {self.mode}", unit="req")
        return [self.generate(r) for r in items]

    def generate(self, request: Request) -> Result:
        return drain(self.stream(request))

    def stream(self, request: Request) -> Generator[Step, None, Result]:
        raise NotImplementedError

    @staticmethod
    def sampler(config: ReasonerConfig, offset: int) -> Sampler:
        seed = None if config.seed is None else int(config.seed) + offset
        return Sampler(config.temperature, config.top_p, seed)
