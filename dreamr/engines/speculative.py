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
the draft's steps against n-gram lookup where ``draft_token_speculation`` asks for it (off by default).
It is lossless, so at alpha = 1 the committed text is exactly the target-only text and at alpha = 0
(every finite verdict accepts) exactly the draft-only text, whatever the drafting policy does: token for
token when greedy, in distribution when sampling (draw for draw with token-level speculation off).
Tokens a model verified past a step's end are kept (``carry``) while that model's prefix does not change
under them.

A drafted step that, re-tokenized for the target, no longer fits in the target's context with the verdict
prompt ends the request ("length"; the step is not committed).
"""

from __future__ import annotations

from typing import Generator, Optional

from dreamr.engines.base import Engine, RequestState, open_sequence, step_cap, timed, verdict_fits
from dreamr.request import Request
from dreamr.result import Metrics, Result, Step
from dreamr.speculation import AdaptiveDrafting, proposer_for, step_cost, write_step


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
        sources, k, delimiter = cfg.speculation_sources, cfg.num_speculative_tokens, cfg.step_delimiter
        ngram = proposer_for(sources)  # the target's steps without a rejected draft to propose from
        d_proposer = proposer_for(cfg.draft_speculation_sources)
        policy = None
        if cfg.adaptive_drafting:
            hopeless = not cfg.auto_alpha and float(cfg.alpha) >= 1.0  # every verdict rejects
            policy = AdaptiveDrafting(draft.num_parameters / target.num_parameters, accepts_nothing=hopeless)
        t_carry: list[int] = []  # tokens a model verified past its last step's end, valid on its prefix
        d_carry: list[int] = []
        try:
            while state.finish_reason is None:
                cap = step_cap(state, (t_seq, target), (d_seq, draft), reserve=verifier.reserve)
                if cap <= 0:
                    state.finish_reason = "length"
                    break
                if policy is not None and not policy.should_draft():
                    spent = _spent(m, "target", target)
                    with timed("target_time_s", m):
                        tw = write_step(t_seq, target, t_sampler, delimiter, cap, proposer=ngram,
                                        num_speculative_tokens=k, carry=t_carry, metrics=m)
                    m.target_tokens += len(tw.ids)
                    m.undrafted_steps += 1
                    policy.alone(forwards=_spent(m, "target", target) - spent, tokens=len(tw.ids))
                    d_seq.extend(draft.step_ids(tw, self.same_tokenizer))
                    d_carry.clear()
                    step = state.commit_written(tw, "target")
                else:
                    step = self._drafted_step(request, state, cap, t_seq, d_seq, t_sampler, d_sampler, d_proposer,
                                              policy, t_carry, d_carry)
                    if step is None:
                        break
                if self.observer is not None:
                    self.observer(t_seq, d_seq)
                yield step
        finally:
            m.target_forward_passes = t_seq.forward_passes
            m.draft_forward_passes = d_seq.forward_passes
        return state.result(self.mode)

    def _drafted_step(self, request: Request, state: RequestState, cap: int, t_seq, d_seq, t_sampler, d_sampler,
                      d_proposer, policy: Optional[AdaptiveDrafting], t_carry: list[int], d_carry: list[int]
                      ) -> Optional[Step]:
        """Draft, verify and commit one step (the target writes it where the draft's is rejected); None
        where the drafted step does not fit the target's context (the request ends, "length")."""
        cfg, m, verifier = request.config, state.metrics, request.verifier
        target, draft, k, delimiter = self.target, self.draft, cfg.num_speculative_tokens, cfg.step_delimiter
        d_committed, d_spent = len(d_seq.ids), _spent(m, "draft", draft)
        with timed("draft_time_s", m):
            dw = write_step(d_seq, draft, d_sampler, delimiter, cap, proposer=d_proposer, num_speculative_tokens=k,
                            carry=d_carry, metrics=m, role="draft")
        m.draft_tokens += len(dw.ids)
        step_ids = target.step_ids(dw, self.same_tokenizer)
        if not verdict_fits(target, len(t_seq.ids), step_ids, verifier.suffix_ids(dw.text)):
            # re-tokenized, the step and the verdict prompt overrun the target's context
            d_seq.truncate(d_committed)
            state.finish_reason = "length"
            return None
        alpha = request.alpha()  # fixed, or alpha="auto"'s current value
        with timed("verify_time_s", m):
            cpn, accepted = verifier.verify(t_seq, step_ids, dw.text, alpha=alpha)
        request.judged(accepted)
        fallback, t_spent = None, _spent(m, "target", target)
        if accepted:
            t_carry.clear()  # the target's prefix moved on by the draft's step
        else:
            with timed("rollback_time_s", m):
                d_seq.truncate(d_committed)
            d_carry.clear()
            # the target writes the step on the prefix the draft wrote it for: the draft's step is its
            # best first guess (token_speculation "step"), then n-gram lookup
            proposer = proposer_for(cfg.speculation_sources, rejected_step=step_ids)
            with timed("target_time_s", m):
                fallback = write_step(t_seq, target, t_sampler, delimiter, cap, proposer=proposer,
                                      num_speculative_tokens=k, carry=t_carry, metrics=m)
            m.target_tokens += len(fallback.ids)
            d_seq.extend(draft.step_ids(fallback, self.same_tokenizer))
        if policy is not None:
            policy.drafted(accepted=accepted, draft_forwards=_spent(m, "draft", draft) - d_spent,
                           draft_tokens=len(dw.ids), fallback_forwards=_spent(m, "target", target) - t_spent,
                           fallback_tokens=len(fallback.ids) if fallback is not None else 0)
        return state.commit_verified(dw, cpn, fallback, alpha=alpha)


def _spent(m: Metrics, role: str, lm) -> float:
    """What ``role``'s steps have cost so far in the request, in its single-token forwards (step_cost)."""
    return step_cost(getattr(m, f"{role}_step_forwards"), getattr(m, f"{role}_proposed_tokens"), lm.device.type)
