"""Mode "speculative" on vLLM servers: sequential step-level speculation, the way SpecReason and RSD run it.

    loop until EOS, the answer marker or the budget:
        d = the draft's server writes a step on the committed prefix        # /v1/completions, stop = delimiter
        cpn = the target's server's verdict on prefix + d + verdict prompt   # max_tokens=1, logprob_token_ids
        if cpn > alpha:  commit d
        else:            t = the target's server writes the step on the committed prefix; commit t

Every request sends its prefix as token ids, so each server's prefix cache serves the committed context:
the verification prefills only the step and the verdict prompt, the fallback only what follows. At alpha
= 1 the text is the target server's own greedy text, at alpha = 0 the draft server's (every finite
verdict accepts), step for step. A drafted step that, re-tokenized for the target, no longer fits in the
target's context with the verdict prompt ends the request ("length"; the step is not committed).
"""

from __future__ import annotations

from typing import AsyncIterator, Optional, Union

from dreamr.backends.vllm.model import Observer, RemoteModel, RemoteSequence
from dreamr.backends.vllm.writer import Sampling, write_step
from dreamr.engines.base import RequestState, step_cap, timed, verdict_fits
from dreamr.request import Request
from dreamr.result import Result, Step


def samplings(request: Request) -> tuple[Sampling, Sampling]:
    """The target's and the draft's :class:`Sampling` for a request (each model its own seed stream)."""
    cfg = request.config
    seed = cfg.seed
    return (Sampling(cfg.temperature, cfg.top_p, seed),
            Sampling(cfg.temperature, cfg.top_p, None if seed is None else seed + 1))


async def stream_speculative(request: Request, target: RemoteModel, draft: RemoteModel, same_tokenizer: bool,
                             observer: Optional[Observer] = None) -> AsyncIterator[Union[Step, Result]]:
    """Run ``request`` (its ``verifier`` a :class:`~dreamr.backends.vllm.verifier.RemoteVerifier`): yields
    each committed Step, then the Result. ``observer(target_ids, draft_ids)`` sees each model's committed ids
    after each step."""
    cfg = request.config
    state = RequestState(cfg)
    m = state.metrics
    verifier, delimiter = request.verifier, cfg.step_delimiter
    t_seq, d_seq = RemoteSequence(request.target_ids), RemoteSequence(request.draft_ids)
    t_sampling, d_sampling = samplings(request)
    while state.finish_reason is None:
        cap = step_cap(state, (t_seq, target), (d_seq, draft), reserve=verifier.reserve)
        if cap <= 0:
            state.finish_reason = "length"
            break
        with timed("draft_time_s", m):
            dw = await write_step(draft, d_seq.ids, delimiter, cap, d_sampling, m)
        m.draft_tokens += len(dw.ids)
        step_ids = target.step_ids(dw, same_tokenizer)
        if not verdict_fits(target, len(t_seq.ids), step_ids, verifier.suffix_ids(dw.text)):
            state.finish_reason = "length"
            break
        alpha = request.alpha()
        with timed("verify_time_s", m):
            cpn, accepted = await verifier.score(t_seq.ids, step_ids, dw.text, alpha, m)
        request.judged(accepted)
        fallback = None
        if accepted:
            t_seq.ids += step_ids
            d_seq.ids += dw.content_ids
        else:
            with timed("target_time_s", m):
                fallback = await write_step(target, t_seq.ids, delimiter, cap, t_sampling, m)
            m.target_tokens += len(fallback.ids)
            t_seq.ids += fallback.content_ids
            d_seq.ids += draft.step_ids(fallback, same_tokenizer)
        step = state.commit_verified(dw, cpn, fallback, alpha=alpha)
        if observer is not None:
            observer(t_seq.ids, d_seq.ids)
        yield step
    yield state.result(cfg.mode)
