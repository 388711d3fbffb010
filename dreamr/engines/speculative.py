"""Mode "speculative": sequential step-level speculative reasoning with CPN verification.

    loop until EOS, the answer marker or the budget:
        d = draft writes a step on the committed prefix
        cpn = CPN(target, prefix + d)              # one target forward pass, verdict entries rolled back
        if cpn > alpha:  commit d                  # the target's cache keeps d's entries
        else:            roll d back in the draft's cache
                         t = target writes the step on the committed prefix; commit t
                         the draft catches up on t (re-tokenized unless the tokenizers are the same)

A drafted step that, re-tokenized for the target, no longer fits in the target's context with the verdict
prompt ends the request ("length"; the step is not committed).

At alpha = 1 nothing is accepted and the committed text is exactly the target-only text; at alpha = 0
every finite verdict accepts and it is exactly the draft-only text.
"""

from __future__ import annotations

from typing import Generator

from dreamr.engines.base import Engine, RequestState, open_sequence, step_cap, timed, verdict_fits, write_step
from dreamr.request import Request
from dreamr.result import Result, Step


class SpeculativeEngine(Engine):
    mode = "speculative"

    def stream(self, request: Request) -> Generator[Step, None, Result]:
        cfg = request.config
        state = RequestState(cfg)
        m = state.metrics
        target, draft = self.target, self.draft
        verifier = request.verifier
        t_seq = open_sequence(target, request.target_ids, request.target_inputs, m)
        d_seq = open_sequence(draft, request.draft_ids, request.draft_inputs, m)
        t_sampler, d_sampler = self.sampler(cfg, 0), self.sampler(cfg, 1)
        try:
            while state.finish_reason is None:
                cap = step_cap(state, (t_seq, target), (d_seq, draft), reserve=verifier.reserve)
                if cap <= 0:
                    state.finish_reason = "length"
                    break
                d_committed = len(d_seq.ids)
                with timed("draft_time_s", m):
                    dw = write_step(d_seq, draft, d_sampler, cfg.step_delimiter, cap)
                m.draft_tokens += len(dw.ids)
                step_ids = target.step_ids(dw, self.same_tokenizer)
                if not verdict_fits(target, len(t_seq.ids), step_ids, verifier.suffix_ids(dw.text)):
                    # re-tokenized, the step and the verdict prompt overrun the target's context
                    d_seq.truncate(d_committed)
                    state.finish_reason = "length"
                    break
                alpha = request.alpha()  # fixed, or alpha="auto"'s current value
                with timed("verify_time_s", m):
                    cpn, accepted = verifier.verify(t_seq, step_ids, dw.text, alpha=alpha)
                request.judged(accepted)
                if accepted:
                    step = state.commit_verified(dw, cpn, alpha=alpha)
                else:
                    with timed("rollback_time_s", m):
                        d_seq.truncate(d_committed)
                    with timed("target_time_s", m):
                        tw = write_step(t_seq, target, t_sampler, cfg.step_delimiter, cap)
                    m.target_tokens += len(tw.ids)
                    d_seq.extend(draft.step_ids(tw, self.same_tokenizer))
                    step = state.commit_verified(dw, cpn, tw, alpha=alpha)
                if self.observer is not None:
                    self.observer(t_seq, d_seq)
                yield step
        finally:
            m.target_forward_passes = t_seq.forward_passes
            m.draft_forward_passes = d_seq.forward_passes
        return state.result(self.mode)
