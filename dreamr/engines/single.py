"""One model writes every step, unverified: the baselines (modes "target" and "draft") and mode "token"."""

from __future__ import annotations

from typing import Generator

from dreamr.engines.base import Engine, RequestState, step_cap, timed
from dreamr.request import Request
from dreamr.result import Result, Step
from dreamr.speculation import proposer_for, write_step


class SingleModelEngine(Engine):
    """The ``source`` model ("target" or "draft") writes each step on its own sequence until EOS, the
    answer marker or the budget; with ``speculate`` set, by verified n-gram proposals
    (:func:`dreamr.speculation.write_step`, lossless: the same text), else one forward per token."""

    source = "target"
    speculate = False

    def stream(self, request: Request) -> Generator[Step, None, Result]:
        cfg = request.config
        state = RequestState(cfg)
        m = state.metrics
        is_target = self.source == "target"
        lm = self.target if is_target else self.draft
        sampler = self.sampler(cfg, 0 if is_target else 1)
        # "step" proposals need a drafted step: a model alone has none, so only "ngram" can apply
        proposer = proposer_for(cfg.speculation_sources) if self.speculate else None
        # (the gate first: its forward costs, timed at the first request, run on a sequence of their own)
        gate = self.proposal_gate(self.source, cfg) if proposer is not None else None
        seq = self.open_sequence(self.source, request, m)
        carry: list[int] = []  # tokens emitted past a step's end: the next step's first tokens
        while state.finish_reason is None:
            cap = step_cap(state, (seq, lm))
            if cap <= 0:
                state.finish_reason = "length"
                break
            with timed("target_time_s" if is_target else "draft_time_s", m):
                w = write_step(seq, lm, sampler, cfg.step_delimiter, cap, proposer=proposer,
                               num_speculative_tokens=cfg.num_speculative_tokens, carry=carry, metrics=m,
                               role=self.source, gate=gate)
            if is_target:
                m.target_tokens += len(w.ids)
            else:
                m.draft_tokens += len(w.ids)
            state.commit_written(w, self.source)
            if self.observer is not None:
                self.observer(seq if is_target else None, None if is_target else seq)
            yield state.steps[-1]
        if is_target:
            m.target_forward_passes = seq.forward_passes
        else:
            m.draft_forward_passes = seq.forward_passes
        return state.result(self.mode)
