"""One model writes every step, unverified: the baselines (modes "target" and "draft")."""

from __future__ import annotations

from typing import Generator

from dreamr.engines.base import Engine, RequestState, open_sequence, step_cap, timed, write_step
from dreamr.request import Request
from dreamr.result import Result, Step


class SingleModelEngine(Engine):
    """The ``source`` model ("target" or "draft") writes each step on its own sequence until EOS, the
    answer marker or the budget."""

    source = "target"

    def stream(self, request: Request) -> Generator[Step, None, Result]:
        cfg = request.config
        state = RequestState(cfg)
        is_target = self.source == "target"
        lm = self.target if is_target else self.draft
        seq = open_sequence(lm, request.target_ids if is_target else request.draft_ids,
                            request.target_inputs if is_target else request.draft_inputs, state.metrics)
        sampler = self.sampler(cfg, 0 if is_target else 1)
        while state.finish_reason is None:
            cap = step_cap(state, (seq, lm))
            if cap <= 0:
                state.finish_reason = "length"
                break
            with timed("target_time_s" if is_target else "draft_time_s", state.metrics):
                w = write_step(seq, lm, sampler, cfg.step_delimiter, cap)
            if is_target:
                state.metrics.target_tokens += len(w.ids)
            else:
                state.metrics.draft_tokens += len(w.ids)
            state.commit_written(w, self.source)
            if self.observer is not None:
                self.observer(seq if is_target else None, None if is_target else seq)
            yield state.steps[-1]
        if is_target:
            state.metrics.target_forward_passes = seq.forward_passes
        else:
            state.metrics.draft_forward_passes = seq.forward_passes
        return state.result(self.mode)
