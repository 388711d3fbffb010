"""Mode "speculative": sequential step-level speculative reasoning with CPN verification.

    loop until EOS, the answer marker or the budget:
        if the drafting policy says drafting does not pay now:     # draft_policy "adaptive"
            t = target writes the step alone; commit t              # the draft catches up on t later
            continue
        d = draft writes a step on the committed prefix
        cpn = CPN(target, prefix + d)              # one target forward pass, verdict entries rolled back
        if cpn > alpha:  commit d                  # the target's cache keeps d's entries
        else:            roll d back in the draft's cache
                         t = target writes the step on the committed prefix, d as its first proposal
                         commit t; the draft catches up on t (re-tokenized unless the tokenizers are the same)

Every step the target writes runs token-level speculation (``token_speculation``,
:func:`dreamr.speculation.write_step`): a fallback step against the rejected step, then n-gram lookup;
the draft's steps against n-gram lookup (``draft_token_speculation``, on by default).
It is lossless, so at alpha = 1 the committed text is exactly the target-only text, whatever the drafting
policy does, and at alpha = 0 (every finite verdict accepts) exactly the draft-only text with
``draft_policy="always"`` (adaptive drafting has the target write a step alone to price it, and goes on
alone where that is cheaper): token for token when greedy, in distribution when sampling (draw for draw
with token-level speculation off).
Tokens a model verified past a step's end are kept (``carry``) while that model's prefix does not change
under them.

A drafted step that, re-tokenized for the target, no longer fits in the target's context with the verdict
prompt ends the request ("length"; the step is not committed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, Optional

from dreamr.config import ReasonerConfig
from dreamr.engines.base import Engine, ModelSequence, RequestState, step_cap, timed, verdict_fits
from dreamr.lm import LM
from dreamr.request import Request
from dreamr.result import Metrics, Result, Step
from dreamr.sampling import Sampler
from dreamr.speculation import AdaptiveDrafting, PairCost, ProposalGate, proposer_for, write_step
from dreamr.speculation.proposer import Proposer
from dreamr.steps import StepWriter


@dataclass
class _Writer:
    """One model's side of a request: what each of its steps is written with."""

    role: str  # "target" or "draft"
    lm: LM
    seq: ModelSequence  # the model's sequence: the committed prefix (plus the step being written)
    sampler: Sampler
    proposer: Optional[Proposer]  # n-gram lookup where asked; a fallback step puts the rejected step first
    gate: Optional[ProposalGate]  # whether a forward checks a proposal (None: always)
    carry: list[int] = field(default_factory=list)  # verified past the last step's end, valid on its prefix

    def write(self, cap: int, config: ReasonerConfig, metrics: Metrics, proposer: Optional[Proposer] = None
              ) -> StepWriter:
        """Write one step (``proposer`` in place of the writer's own for this step)."""
        return write_step(self.seq, self.lm, self.sampler, config.step_delimiter, cap,
                          proposer=proposer if proposer is not None else self.proposer,
                          num_speculative_tokens=config.num_speculative_tokens, carry=self.carry, metrics=metrics,
                          role=self.role, gate=self.gate)


class SpeculativeEngine(Engine):
    mode = "speculative"

    def stream(self, request: Request) -> Generator[Step, None, Result]:
        cfg = request.config
        state = RequestState(cfg)
        m = state.metrics
        verifier = request.verifier
        policy, pair = self.drafting_policy(cfg)
        costs = _Prices(pair, m) if pair is not None else None
        hopeless = policy is not None and policy.accepts_nothing  # a fixed alpha >= 1: every verdict rejects
        # the gates before the sequences: their forward costs, timed at the first request, run on sequences
        # of their own (hopeless: the draft writes nothing)
        t_gate, d_gate = self.proposal_gate("target", cfg), None if hopeless else self.proposal_gate("draft", cfg)
        t = _Writer("target", self.target, self.open_sequence("target", request, m, reserve=verifier.reserve),
                    self.sampler(cfg, 0), proposer_for(cfg.speculation_sources), t_gate)
        d = _Writer("draft", self.draft, self.open_sequence("draft", request, m),
                    self.sampler(cfg, 1), proposer_for(cfg.draft_speculation_sources), d_gate)
        try:
            while state.finish_reason is None:
                cap = step_cap(state, (t.seq, t.lm), (d.seq, d.lm), reserve=verifier.reserve)
                if cap <= 0:
                    state.finish_reason = "length"
                    break
                if policy is not None and not policy.should_draft():
                    before = costs.counts("target") if costs is not None else None
                    with timed("target_time_s", m):
                        tw = t.write(cap, cfg, m)
                    m.target_tokens += len(tw.ids)
                    m.undrafted_steps += 1
                    if costs is not None:
                        policy.alone(cost=costs.since("target", before), tokens=len(tw.ids))
                    d.seq.extend(d.lm.step_ids(tw, self.same_tokenizer))
                    d.carry.clear()
                    step = state.commit_written(tw, "target")
                else:
                    step = self._drafted_step(request, state, cap, t, d, policy, costs)
                    if step is None:
                        break
                if self.observer is not None:
                    self.observer(t.seq, d.seq)
                yield step
        finally:
            m.target_forward_passes = t.seq.forward_passes
            m.draft_forward_passes = d.seq.forward_passes
        return state.result(self.mode)

    def _drafted_step(self, request: Request, state: RequestState, cap: int, t: _Writer, d: _Writer,
                      policy: Optional[AdaptiveDrafting], costs: Optional["_Prices"]) -> Optional[Step]:
        """Draft, verify and commit one step (the target writes it where the draft's is rejected); None
        where the drafted step does not fit the target's context (the request ends, "length")."""
        cfg, m, verifier = request.config, state.metrics, request.verifier
        d_committed, d_before = len(d.seq.ids), costs.counts("draft") if costs is not None else None
        with timed("draft_time_s", m):
            dw = d.write(cap, cfg, m)
        m.draft_tokens += len(dw.ids)
        step_ids = t.lm.step_ids(dw, self.same_tokenizer)
        if not verdict_fits(t.lm, len(t.seq.ids), step_ids, verifier.suffix_ids(dw.text)):
            # re-tokenized, the step and the verdict prompt overrun the target's context
            d.seq.truncate(d_committed)
            state.finish_reason = "length"
            return None
        alpha = request.alpha()  # fixed, or alpha="auto"'s current value
        with timed("verify_time_s", m):
            cpn, accepted = verifier.verify(t.seq, step_ids, dw.text, alpha=alpha)
        request.judged(accepted)
        fallback, t_before = None, costs.counts("target") if costs is not None else None
        if accepted:
            t.carry.clear()  # the target's prefix moved on by the draft's step
        else:
            with timed("rollback_time_s", m):
                d.seq.truncate(d_committed)
            d.carry.clear()
            # the target writes the step on the prefix the draft wrote it for: the draft's step is its
            # best first guess (token_speculation "step"), then n-gram lookup
            with timed("target_time_s", m):
                fallback = t.write(cap, cfg, m, proposer_for(cfg.speculation_sources, rejected_step=step_ids))
            m.target_tokens += len(fallback.ids)
            d.seq.extend(d.lm.step_ids(fallback, self.same_tokenizer))
        if policy is not None and costs is not None:
            policy.drafted(accepted=accepted, draft_cost=costs.since("draft", d_before), draft_tokens=len(dw.ids),
                           verify_cost=costs.verification(len(step_ids) + len(verifier.suffix_ids(dw.text))),
                           fallback_cost=costs.since("target", t_before),
                           fallback_tokens=len(fallback.ids) if fallback is not None else 0)
        return state.commit_verified(dw, cpn, fallback, alpha=alpha)


class _Prices:
    """What a request's steps cost, in the target's one-token forwards: each model's counters
    (``<role>_step_forwards``, ``_proposals``, ``_proposed_tokens``) priced at the pair's measured costs."""

    def __init__(self, pair: PairCost, metrics: Metrics):
        self.pair, self.metrics = pair, metrics

    def counts(self, role: str) -> tuple[int, int, int]:
        m = self.metrics
        return (getattr(m, f"{role}_step_forwards"), getattr(m, f"{role}_proposals"),
                getattr(m, f"{role}_proposed_tokens"))

    def since(self, role: str, before: tuple[int, int, int]) -> float:
        """What ``role``'s forwards since ``counts(role)`` returned ``before`` cost."""
        return self.pair.forwards(role, *(now - then for now, then in zip(self.counts(role), before)))

    def verification(self, tokens: int) -> float:
        return self.pair.verification(tokens)
