"""Mode "fpsr" over servers commits exactly the steps of "speculative": its orchestration (drafting ahead,
verdicts in flight, the target's step in flight or on rejection, aborts) under random answer delays.

The servers here are deterministic stand-ins (a step and a verdict are functions of the prompt's ids, each
answered after a random delay), so any difference between the modes is the orchestration's. The real vLLM
servers are in test_remote_vllm.py, where batching rounding makes exact comparisons less sharp.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from dreamr.backends.vllm.client import Completion
from dreamr.backends.vllm.fpsr import stream_fpsr
from dreamr.backends.vllm.model import RemoteModel
from dreamr.backends.vllm.speculative import stream_speculative
from dreamr.config import ReasonerConfig
from dreamr.request import Request
from dreamr.result import Result
from dreamr.streaming import AsyncStepStream

CHARS = "abcde .\n"  # token i >= 1 is CHARS[i - 1]; 0 is EOS


class CharTokenizer:
    eos_token_id = 0

    def __init__(self, spread: bool = False):
        self.spread = spread  # the target's tokenizer: every character takes two tokens (re-tokenized steps grow)

    def encode(self, text, add_special_tokens=False):
        ids = [CHARS.index(c) + 1 for c in text]
        return [t for i in ids for t in (i, 20)] if self.spread else ids

    def decode(self, ids, skip_special_tokens=True):
        return "".join(CHARS[i - 1] for i in ids if 0 < i <= len(CHARS))

    def __len__(self):
        return 21


def _hash(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


class StandIn:
    """A server's answers as functions of the prompt, after a random delay; counts what it was sent."""

    def __init__(self, salt: int, delay_s: float, rng: random.Random, eos_p: float = 0.01):
        self.salt, self.delay_s, self.rng, self.eos_p = salt, delay_s, rng, eos_p
        self.sent = self.aborted = self.in_flight = 0

    def error(self, what, status=None):
        return RuntimeError(what)

    async def complete(self, prompt_ids, *, max_tokens, stop=None, temperature=0.0, top_p=1.0, seed=None,
                       logprob_token_ids=None):
        prompt = tuple(prompt_ids)
        self.sent += 1
        self.in_flight += 1
        try:
            await asyncio.sleep(self.rng.random() * self.delay_s)
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        finally:
            self.in_flight -= 1
        r = random.Random(_hash(self.salt, prompt, logprob_token_ids is not None))
        if logprob_token_ids is not None:
            return Completion([1], "length", None, {t: -r.random() * 3 for t in logprob_token_ids})
        out, text = [], ""
        for _ in range(max_tokens):
            token = 0 if r.random() < self.eos_p else r.randrange(1, len(CHARS) + 1)
            out.append(token)
            if token == 0:
                return Completion(out, "stop", None, None)
            text += CHARS[token - 1]
            if stop and stop[0] in text:
                return Completion(out, "stop", stop[0], None)
        return Completion(out, "length", None, None)


class StandInVerifier:
    """The RemoteVerifier's face: cpn from the stand-in's two "verdict token" log-probabilities."""

    reserve = 3

    def __init__(self, target):
        self.target = target

    def suffix_ids(self, text):
        return [1, 2] if text.endswith("\n\n") else [1, 2, 3]

    async def score(self, prefix, step_ids, text, alpha, metrics=None):
        out = await self.target.client.complete(list(prefix) + list(step_ids) + self.suffix_ids(text), max_tokens=1,
                                                logprob_token_ids=[1, 2])
        cpn = 1.0 / (1.0 + pow(2.718281828459045, out.logprobs[2] - out.logprobs[1]))
        return cpn, cpn > alpha


def stand_in_model(name: str, salt: int, context: int, delay_s: float, rng, spread: bool = False) -> RemoteModel:
    m = RemoteModel.__new__(RemoteModel)  # the facts by hand: no server to read them from
    m.client, m.name, m.tokenizer, m.eos_ids = StandIn(salt, delay_s, rng), name, CharTokenizer(spread), {0}
    m.context_length, m.served_name = context, name
    return m


async def _run(fpsr: bool, seed: int, launch: str = "eager", spread: bool = False):
    rng = random.Random(seed * 7 + fpsr)  # the delays differ between the modes; the answers do not
    window, context, budget = 1 + seed % 5, 40 + seed % 60, 20 + (seed * 13) % 80
    target = stand_in_model("target", 1, context, 0.004, rng, spread)
    draft = stand_in_model("draft", 2, context + (seed % 3) * 5, 0.002, rng)
    config = ReasonerConfig(mode="fpsr" if fpsr else "speculative", alpha=(0.3, 0.5, 0.7)[seed % 3],
                            max_new_tokens=budget, max_step_tokens=3 + seed % 12, window=window,
                            answer_marker="e." if seed % 4 == 0 else None, draft_policy="always")
    prompt = [3, 4, 5, 6][: 1 + seed % 4]
    request = Request("p", config, StandInVerifier(target), list(prompt), list(prompt))
    run = stream_fpsr(request, target, draft, False, target_launch=launch) if fpsr else \
        stream_speculative(request, target, draft, False)
    steps, result = [], None
    async for item in run:
        if isinstance(item, Result):
            result = item
        else:
            steps.append((item.source, item.text, item.accepted, item.rejected_text))
    await asyncio.sleep(0.01)
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    return steps, result, left, target.client, draft.client


@pytest.mark.parametrize("launch", ["eager", "on_reject"])
@pytest.mark.parametrize("spread", [False, True], ids=["same-length", "longer-for-the-target"])
def test_fpsr_commits_what_speculative_commits(launch, spread):
    async def main():
        aborted = 0
        for seed in range(40):
            s_steps, s_result, _, _, _ = await _run(False, seed, spread=spread)
            f_steps, f_result, left, t_client, d_client = await _run(True, seed, launch, spread)
            assert f_steps == s_steps, f"seed {seed}"
            assert f_result.finish_reason == s_result.finish_reason, f"seed {seed}"
            assert f_result.metrics.committed_tokens == s_result.metrics.committed_tokens
            assert not left and t_client.in_flight == d_client.in_flight == 0, f"seed {seed}: work left in flight"
            aborted += t_client.aborted + d_client.aborted
        assert aborted > 0  # the cases reached work past a verdict

    asyncio.run(main())


def test_closing_the_stream_aborts_everything_in_flight():
    async def main():
        rng = random.Random(1)
        target = stand_in_model("target", 1, 4000, 0.05, rng)
        draft = stand_in_model("draft", 2, 4000, 0.01, rng)
        config = ReasonerConfig(mode="fpsr", alpha=0.3, max_new_tokens=400, max_step_tokens=10, window=4)
        stream = AsyncStepStream(stream_fpsr(Request("p", config, StandInVerifier(target), [3], [3]), target, draft,
                                             False))
        async for step in stream:
            break
        await stream.aclose()
        await stream.aclose()  # a second close is a no-op
        await asyncio.sleep(0)
        assert target.client.in_flight == draft.client.in_flight == 0 and stream.result is None
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    asyncio.run(main())


def test_a_failing_verdict_reaches_the_consumer_and_nothing_is_left_running():
    class Failing(StandInVerifier):
        async def score(self, *args, **kwargs):
            await asyncio.sleep(0.01)
            raise RuntimeError("the target's server is down")

    async def main():
        rng = random.Random(2)
        target, draft = stand_in_model("target", 1, 4000, 0.02, rng), stand_in_model("draft", 2, 4000, 0.01, rng)
        config = ReasonerConfig(mode="fpsr", alpha=0.3, max_new_tokens=100, max_step_tokens=10, window=3)
        stream = AsyncStepStream(stream_fpsr(Request("p", config, Failing(target), [3], [3]), target, draft, False))
        with pytest.raises(RuntimeError, match="down"):
            async for _ in stream:
                pass
        await asyncio.sleep(0.01)
        assert stream.result is None and target.client.in_flight == draft.client.in_flight == 0

    asyncio.run(main())
