"""Streams of committed steps: the one shape every front (in-process, remote, the HTTP server) hands out.

An engine's run is a generator that yields each :class:`dreamr.result.Step` as it is committed and ends
with the request's :class:`dreamr.result.Result`. :class:`AsyncStepStream` is its asynchronous face:

    stream = reasoner.astream("What is 2 + 3?")
    async for step in stream:          # each committed step, as it is committed
        print(step.source, step.text)
    print(stream.result.metrics.step_acceptance_rate)

The source is an async iterator that yields the steps and then the Result, once, as its last item.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional, Union

from dreamr.result import Result, Step

__all__ = ["AsyncStepStream"]


class AsyncStepStream:
    """Iterate with ``async for`` to receive each :class:`Step` as it is committed; ``result`` holds the
    :class:`Result` once the iteration ends (None before, or where the run failed).

    A stream runs its request once: a second ``async for`` raises RuntimeError. ``aclose()`` stops the
    run early (the source's ``finally`` blocks run: a remote run aborts its requests in flight).

    Parameters
    ----------
    source : async iterator of Step, then one Result
    prompt_tokens : int
        The prompt's length in the tokens of the model that reads it first (the target where it runs), for
        usage figures; 0 where not known.
    """

    def __init__(self, source: AsyncIterator[Union[Step, Result]], prompt_tokens: int = 0):
        self._source = source
        self._started = False
        self.result: Optional[Result] = None
        self.prompt_tokens = prompt_tokens  # the prompt's length in the target's tokens (0: not known)
        self._closing: Optional[asyncio.Future] = None

    def __aiter__(self) -> AsyncIterator[Step]:
        if self._started:
            raise RuntimeError("AsyncStepStream: this stream has already been iterated (a stream runs its request "
                               "once); read stream.result.steps after it ends, or start a new stream")
        self._started = True
        return self._run()

    async def _run(self) -> AsyncIterator[Step]:
        try:
            async for item in self._source:
                if isinstance(item, Result):
                    self.result = item
                    return
                yield item
            if self.result is None:
                raise RuntimeError("AsyncStepStream: the run ended without a Result")
        finally:  # the consumer left early (break, cancellation): stop the run now, not when collected
            await self.aclose()

    async def aclose(self) -> None:
        """Stop the run now (nothing more is committed; ``result`` stays None unless it had ended). Safe to call
        more than once and from the stream's own ``finally``: the source is closed once, and every caller
        waits for that one close (a source's ``finally`` may itself await, e.g. a worker thread's end)."""
        close = getattr(self._source, "aclose", None)
        if close is None:
            return
        if self._closing is None:
            self._closing = asyncio.ensure_future(close())
        await asyncio.shield(self._closing)

    async def collect(self) -> Result:
        """Run to the end and return the Result (the steps are in ``result.steps``)."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result
