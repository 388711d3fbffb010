"""Modes "target" and "draft" on a vLLM server: one model writes every step, unverified (the baselines).

    loop until EOS, the answer marker or the budget:
        s = the model's server writes a step on the committed prefix    # one /v1/completions request
        commit s
"""

from __future__ import annotations

from typing import AsyncIterator, Optional, Union

from dreamr.backends.vllm.model import Observer, RemoteModel, RemoteSequence
from dreamr.backends.vllm.writer import Sampling, write_step
from dreamr.engines.base import RequestState, step_cap, timed
from dreamr.request import Request
from dreamr.result import Result, Step


async def stream_single(request: Request, model: RemoteModel, observer: Optional[Observer] = None
                        ) -> AsyncIterator[Union[Step, Result]]:
    """Run ``request`` with ``model`` ("target" or "draft", by ``model.name``) alone: yields each committed
    Step, then the Result. ``observer(target_ids, draft_ids)`` sees the committed ids after each step (the
    other model's None)."""
    cfg = request.config
    state = RequestState(cfg)
    m = state.metrics
    is_target = model.name == "target"
    seq = RemoteSequence(request.target_ids if is_target else request.draft_ids)
    sampling = Sampling(cfg.temperature, cfg.top_p, None if cfg.seed is None else cfg.seed + (0 if is_target else 1))
    while state.finish_reason is None:
        cap = step_cap(state, (seq, model))
        if cap <= 0:
            state.finish_reason = "length"
            break
        with timed("target_time_s" if is_target else "draft_time_s", m):
            w = await write_step(model, seq.ids, cfg.step_delimiter, cap, sampling, m)
        if is_target:
            m.target_tokens += len(w.ids)
        else:
            m.draft_tokens += len(w.ids)
        seq.ids += w.content_ids
        step = state.commit_written(w, model.name)
        if observer is not None:
            observer(seq.ids if is_target else None, None if is_target else seq.ids)
        yield step
    yield state.result(cfg.mode)
