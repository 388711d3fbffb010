"""Mode "fpsr" on vLLM servers: FPSR's parallelism as concurrent requests, with aborts past a rejection.

    pending = []                                   # drafted steps past the committed prefix, oldest first
    loop until EOS, the answer marker or the budget:
        while len(pending) < window and no pending step ends the request:
            draft the next step on prefix + pending       # in flight, one at a time (each needs the last)
            as each drafted step arrives: verify it on prefix + pending before it   # in flight at once
        the target writes its own step on the prefix      # in flight beside them, before any verdict
                                                          # (target_launch "eager"; "on_reject": after one)
        wait for the oldest step's verdict:
            accepted:  commit it; abort the target's step (it was for this prefix); the next is the oldest
            rejected:  abort every later drafted step, its verification and the draft in flight;
                       commit the target's step (already under way); draft again from there

Each step is committed exactly where mode "speculative" commits it: a drafted step is verified on the
same prefix with the same verdict prompt, and the target's step is written on the same prefix with the same
cap, so (greedy, or sampled with a seed: a step's seed follows from its prefix) the two modes commit the same
steps (with a fixed alpha; with alpha="auto" a step takes the threshold of when it was drafted, before
the verdicts pending ahead of it moved it; and on a real server only up to its batch's rounding, since vLLM
is not batch-invariant and fpsr batches its requests differently); fpsr spends more requests (work past a
rejection is aborted) to wait less. Cancelling a request's task closes its connection, and vLLM aborts it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Union

from dreamr.backends.vllm.model import Observer, RemoteModel, RemoteSequence
from dreamr.backends.vllm.speculative import samplings
from dreamr.backends.vllm.writer import write_step
from dreamr.engines.base import RequestState, verdict_fits
from dreamr.request import Request
from dreamr.result import Result, Step
from dreamr.steps import StepWriter, has_answer


@dataclass
class Drafted:
    """A drafted step past the committed prefix, waiting for its verdict."""

    writer: StepWriter                    # the draft's step (ids [S_d], text, end)
    step_ids: list[int]                   # [S_t] the step in the target's tokens
    alpha: float                          # the threshold it is judged at
    verdict: Optional[asyncio.Task]       # -> (cpn, accepted); None: it does not fit the target's context


def _cancel(task: Optional[asyncio.Task], state: RequestState) -> None:
    """Abort work no longer wanted: a task still in flight is cancelled (its connection closes: the server
    aborts the request) and counted; a finished one's error, if any, is taken (the work is discarded, and the
    server's trouble shows in the requests that matter)."""
    if task is None:
        return
    if not task.done():
        task.cancel()
        state.metrics.cancelled_requests += 1
    elif not task.cancelled():
        task.exception()


TARGET_LAUNCHES = ("eager", "on_reject")


async def stream_fpsr(request: Request, target: RemoteModel, draft: RemoteModel, same_tokenizer: bool,
                      observer: Optional[Observer] = None, target_launch: str = "eager"
                      ) -> AsyncIterator[Union[Step, Result]]:
    """Run ``request`` (its ``verifier`` a RemoteVerifier) with up to ``config.window`` drafted steps in flight:
    yields each committed Step, then the Result. ``observer(target_ids, draft_ids)`` sees each model's
    committed ids after each step.

    ``target_launch``: "eager" (the paper's: the target's own step on the committed prefix is in flight
    with the verdict, so a rejection costs no wait for it) or "on_reject" (it starts once the verdict
    rejects: nothing is spent on target steps that an acceptance throws away, which pays where the
    target's server has no spare capacity; the drafts and verdicts still run ahead)."""
    if target_launch not in TARGET_LAUNCHES:
        raise ValueError(f"target_launch must be one of {list(TARGET_LAUNCHES)}, got {target_launch!r}")
    cfg = request.config
    state = RequestState(cfg)
    m = state.metrics
    verifier, delimiter, window = request.verifier, cfg.step_delimiter, cfg.window
    t_seq, d_seq = RemoteSequence(request.target_ids), RemoteSequence(request.draft_ids)
    t_sampling, d_sampling = samplings(request)
    pending: list[Drafted] = []
    drafting: Optional[asyncio.Task] = None      # -> StepWriter: the draft's step after the last pending one
    fallback: Optional[asyncio.Task] = None      # -> StepWriter: the target's own step on the committed prefix

    def ahead() -> tuple[list[int], list[int], int]:
        """The draft's and the target's ids past the last pending step, and the tokens the pending steps take."""
        d_ids, t_ids = list(d_seq.ids), list(t_seq.ids)
        for p in pending:
            d_ids += p.writer.content_ids
            t_ids += p.step_ids
        return d_ids, t_ids, sum(len(p.writer.ids) for p in pending)

    def cap_at(d_len: int, t_len: int, spent: int) -> int:
        """The step cap where the draft's context is ``d_len`` long and the target's ``t_len`` (as
        :func:`dreamr.engines.base.step_cap` after the pending steps were committed)."""
        return min(cfg.max_step_tokens, state.budget_left - spent, draft.context_length - d_len - verifier.reserve,
                   target.context_length - t_len - verifier.reserve)

    def ends_request(w: StepWriter, spent: int) -> bool:
        return w.end == "eos" or has_answer(w.text, cfg.answer_marker) or state.budget_left - spent <= 0

    try:
        while state.finish_reason is None:
            d_ids, t_ids, spent = ahead()
            last_ends = bool(pending) and (pending[-1].verdict is None or ends_request(pending[-1].writer, spent))
            if drafting is None and len(pending) < window and not last_ends:
                cap = cap_at(len(d_ids), len(t_ids), spent)
                if cap > 0:
                    drafting = asyncio.create_task(write_step(draft, d_ids, delimiter, cap, d_sampling, m))
                elif not pending:
                    state.finish_reason = "length"
                    break
            head = pending[0] if pending else None
            if head is not None and head.verdict is None:
                state.finish_reason = "length"  # re-tokenized, the step and its verdict prompt overrun the target
                break
            # eager: the target's own step goes in flight beside the verdict it may replace (not where that
            # verdict is already in)
            if target_launch == "eager" and fallback is None and (pending or drafting is not None) and \
                    not (head is not None and head.verdict.done()):
                cap = cap_at(len(d_seq.ids), len(t_seq.ids), 0)
                fallback = asyncio.create_task(write_step(target, list(t_seq.ids), delimiter, cap, t_sampling, m))
            waiting = [t for t in (drafting, head.verdict if head else None) if t is not None]
            if not any(t.done() for t in waiting):
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if drafting is not None and drafting.done():
                dw = drafting.result()
                drafting = None
                m.draft_tokens += len(dw.ids)
                step_ids = target.step_ids(dw, same_tokenizer)
                fits = verdict_fits(target, len(t_ids), step_ids, verifier.suffix_ids(dw.text))
                alpha = request.alpha()
                verdict = asyncio.create_task(verifier.score(t_ids, step_ids, dw.text, alpha, m)) if fits else None
                pending.append(Drafted(dw, step_ids, alpha, verdict))
            head = pending[0] if pending else None
            if head is None or head.verdict is None or not head.verdict.done():
                continue
            cpn, accepted = head.verdict.result()
            request.judged(accepted, head.alpha)
            pending.pop(0)
            if accepted:
                _cancel(fallback, state)
                fallback = None
                t_seq.ids += head.step_ids
                d_seq.ids += head.writer.content_ids
                step = state.commit_verified(head.writer, cpn, None, alpha=head.alpha)
                if observer is not None:
                    observer(t_seq.ids, d_seq.ids)
                yield step
                continue
            for p in pending:
                _cancel(p.verdict, state)
            pending.clear()
            _cancel(drafting, state)
            drafting = None
            if fallback is None:  # on_reject: the target's step starts now
                cap = cap_at(len(d_seq.ids), len(t_seq.ids), 0)
                fallback = asyncio.create_task(write_step(target, list(t_seq.ids), delimiter, cap, t_sampling, m))
            tw = await fallback
            fallback = None
            m.target_tokens += len(tw.ids)
            t_seq.ids += tw.content_ids
            d_seq.ids += draft.step_ids(tw, same_tokenizer)
            step = state.commit_verified(head.writer, cpn, tw, alpha=head.alpha)
            if observer is not None:
                observer(t_seq.ids, d_seq.ids)
            yield step
    finally:
        for task in (drafting, fallback, *(p.verdict for p in pending)):
            _cancel(task, state)
    yield state.result(cfg.mode)
