"""Writing one step on a vLLM server.

    step = await write_step(model, prefix_ids, delimiter, cap, sampling)       # a StepWriter, ended

A step is one ``/v1/completions`` request with the step delimiter as its stop string and the step's room as
``max_tokens``; its tokens are then replayed through :class:`dreamr.steps.StepWriter`, so a step ends exactly
where the in-process engines end it (at the token that completes the delimiter after some content, at
EOS, at the cap). Where the server stopped at a delimiter that only opens the step (a step never is only
blank lines), the step goes on with one more request from where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from dreamr.backends.vllm.model import RemoteModel
from dreamr.result import Metrics
from dreamr.steps import StepWriter

__all__ = ["Sampling", "write_step"]


@dataclass(frozen=True)
class Sampling:
    """How a model's steps are drawn: greedy (``temperature`` 0) or sampled with a seed.

    The seed of a step is derived from ``seed`` and the prefix's length, so a step drawn again on the same
    prefix (a retry; FPSR's target writing the step speculative would) draws the same tokens."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def seed_for(self, prefix_len: int) -> Optional[int]:
        return None if self.seed is None or self.temperature == 0 else (self.seed * 1_000_003 + prefix_len) % 2**63


async def write_step(model: RemoteModel, prefix_ids: Sequence[int], delimiter: str, cap: int,
                     sampling: Sampling = Sampling(), metrics: Optional[Metrics] = None) -> StepWriter:
    """The model's next step after ``prefix_ids [P]`` (at most ``cap`` tokens), written by its server.

    Returns the ended :class:`StepWriter` (``ids``, ``text``, ``end``); nothing is kept anywhere else, so
    a cancelled call leaves no trace. Each request answered is counted in ``metrics.<role>_requests``."""
    writer = StepWriter(model.tokenizer, model.eos_ids, delimiter, cap)
    prefix = list(prefix_ids)
    while writer.end is None:
        room = cap - len(writer.ids)
        out = await model.client.complete(prefix + writer.ids, max_tokens=room, stop=[delimiter],
                                          temperature=sampling.temperature, top_p=sampling.top_p,
                                          seed=sampling.seed_for(len(prefix) + len(writer.ids)))
        if metrics is not None:
            setattr(metrics, f"{model.name}_requests", getattr(metrics, f"{model.name}_requests") + 1)
        if not out.token_ids:
            raise model.client.error(f"/v1/completions returned no tokens (finish_reason {out.finish_reason!r}) "
                                      f"with room for {room}")
        if out.finish_reason == "stop" and not isinstance(out.stop_reason, str):
            # the server stopped on an end-of-sequence token (its last): one of the served model's, which the
            # local facts may lack (a generation config on the server's side); from now on it is known here
            model.eos_ids.add(out.token_ids[-1])
        for token in out.token_ids:
            if writer.add(token) is not None:
                break
    return writer
