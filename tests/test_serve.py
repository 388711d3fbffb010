"""The OpenAI-compatible server (dreamr.serve) and SpeculativeReasoner.astream, on the tiny random pair.

The server runs under uvicorn in a background thread and is spoken to with the real ``openai`` client:
its completions equal ``reasoner.generate``'s for the same prompt and settings, a stream hands out one
chunk per committed step as it is committed, errors come back as OpenAI's errors naming the field, and
``/metrics`` counts what was served. A scripted reasoner (the app takes any object with ``.config`` and
``.astream``) drives the timing: steps held back, a client that leaves, a run that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from conftest import PROMPTS
from dreamr.config import ReasonerConfig
from dreamr.result import Metrics, Result, Step
from dreamr.serve import create_app
from dreamr.serve import __main__ as cli

MODEL = "tiny-dreamr"
SPECULATIVE = {"mode": "speculative", "alpha": 0.5}


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free port in a background thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(reasoner):
    app = create_app(reasoner, served_model_name=MODEL)
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=30)


def samples(url: str) -> dict:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def dicts(result: Result) -> list[dict]:
    return [s.to_dict() for s in result.steps]


# -- completions equal generate -------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"mode": "target"}, SPECULATIVE], ids=["target", "speculative"])
def test_completion_equals_generate(client, reasoner, settings):
    want = reasoner.generate(PROMPTS[0], **settings)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body=settings)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == {"length": "length"}.get(want.finish_reason, "stop")
    assert got.usage.completion_tokens == want.metrics.committed_tokens
    assert got.usage.prompt_tokens == len(reasoner.target.tokenizer.encode(PROMPTS[0]))
    extra = got.model_extra["dreamr"]
    assert extra["steps"] == dicts(want) and extra["mode"] == settings["mode"]
    assert extra["metrics"]["num_steps"] == want.metrics.num_steps


def test_chat_completion_equals_generate_and_maps_max_tokens(client, reasoner):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    want = reasoner.generate(messages, max_new_tokens=12, **SPECULATIVE)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, extra_body=SPECULATIVE)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.model_extra["dreamr"]["steps"] == dicts(want)
    # text parts are joined, as the reasoner would read one string
    parts = [{"role": "user", "content": [{"type": "text", "text": PROMPTS[2]}]}]
    again = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=12,
                                           extra_body=SPECULATIVE)
    assert again.choices[0].message.content == want.text


# -- streaming ------------------------------------------------------------------------------------------

def test_stream_yields_each_committed_step_in_order(client, reasoner):
    want = reasoner.generate(PROMPTS[1], **SPECULATIVE)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], stream=True, extra_body=SPECULATIVE,
                                            stream_options={"include_usage": True}))
    steps = [c for c in chunks if (c.model_extra or {}).get("dreamr_step") is not None]
    assert len(steps) == len(want.steps) >= 2
    assert [c.model_extra["dreamr_step"] for c in steps] == dicts(want)
    assert "".join(c.choices[0].text for c in steps) == want.text
    final, usage = chunks[-2], chunks[-1]
    assert final.choices[0].finish_reason in ("stop", "length") and final.model_extra["dreamr"]["mode"] == "speculative"
    assert usage.choices == [] and usage.usage.completion_tokens == want.metrics.committed_tokens


def test_chat_stream_first_chunk_has_the_role(client, reasoner):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    want = reasoner.generate(messages, mode="target")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 extra_body={"mode": "target"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    steps = [c for c in chunks if c.model_extra.get("dreamr_step")]
    assert "".join(c.choices[0].delta.content for c in steps) == want.text
    assert [c.model_extra["dreamr_step"]["text"] for c in steps] == [s.text for s in want.steps]
    assert chunks[-1].choices[0].finish_reason is not None


# -- the other endpoints --------------------------------------------------------------------------------

def test_models_health_and_metrics(client, server, reasoner):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    before = samples(server)
    result = reasoner.generate(PROMPTS[3], **SPECULATIVE)
    client.completions.create(model=MODEL, prompt=PROMPTS[3], extra_body=SPECULATIVE)
    after = samples(server)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    finish = {"length": "length"}.get(result.finish_reason, "stop")
    m = result.metrics
    assert moved("dreamr_requests_total", mode="speculative", finish_reason=finish) == 1
    assert moved("dreamr_committed_tokens_total") == m.committed_tokens
    assert moved("dreamr_verified_steps_total") == m.verified_steps > 0
    assert moved("dreamr_accepted_steps_total") == m.accepted_steps
    assert moved("dreamr_proposals_total") == m.target_proposals
    assert moved("dreamr_proposed_tokens_total") == m.target_proposed_tokens
    assert moved("dreamr_accepted_tokens_total") == m.target_accepted_tokens
    assert moved("dreamr_request_latency_seconds_count") == 1
    assert moved("dreamr_time_to_first_step_seconds_count") == 1
    assert after[("dreamr_requests_running", ())] == 0
    rate = after[("dreamr_step_acceptance_rate", ())]
    assert rate == (after[("dreamr_accepted_steps_total", ())] / after[("dreamr_verified_steps_total", ())])


# -- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"alpha": 2}, "alpha"),
    ({"mode": "nope"}, "mode"),
    ({"alhpa": 0.5}, "alhpa"),
    ({"mode": "fpsr", "draft_policy": "sometimes"}, "draft_policy"),
    ({"proposal_policy": "never"}, "proposal_policy"),
    ({"logprobs": 3}, "logprobs"),
])
def test_bad_settings_are_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body=extra)
    assert err.value.param == param and param in err.value.message
    assert err.value.type == "invalid_request_error"
    if param == "alhpa":  # the valid settings are listed
        assert "step_delimiter" in err.value.message and "window" in err.value.message


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"), ({"stop": ["\n"]}, "stop"), ({"max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
])
def test_openai_fields_dreamr_refuses(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": MODEL, "prompt": PROMPTS[0], **kwargs})
    assert err.value.param is not None and err.value.param.startswith(param)


def test_wrong_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.param == "model" and "gpt-4o" in err.value.message


# -- timing: a scripted reasoner ------------------------------------------------------------------------

class Scripted:
    """A reasoner whose run the test drives: one step, then it waits for ``gate``, then fails or ends."""

    def __init__(self):
        self.config = ReasonerConfig(mode="target")
        self.gate, self.closed = threading.Event(), threading.Event()
        self.fail: Exception | None = None  # raised after the first step once the gate opens

    def astream(self, prompt, **overrides):
        from dreamr.streaming import AsyncStepStream

        ReasonerConfig(**overrides)  # settings checked at the call, as a reasoner does
        steps = [Step("one\n\n", "target", None, None, 2), Step("two", "target", None, None, 1)]

        async def source():
            try:
                yield steps[0]
                while not self.gate.is_set():
                    await asyncio.sleep(0.01)
                if self.fail is not None:
                    raise self.fail
                yield steps[1]
                yield Result("one\n\ntwo", steps, Metrics(num_steps=2, committed_tokens=3).finalize(), "eos", "target")
            finally:
                self.closed.set()

        return AsyncStepStream(source())


@pytest.fixture
def scripted():
    fake = Scripted()
    app = create_app(fake, served_model_name=MODEL)
    with running(app) as url:
        yield fake, url


def _stream_request(url: str):
    return httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True},
                        timeout=10)


def test_a_step_is_sent_as_soon_as_it_is_committed(scripted):
    fake, url = scripted
    with _stream_request(url) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        assert '"one\\n\\n"' in first and not fake.gate.is_set()  # arrived while the run still goes on
        fake.gate.set()
        rest = [line for line in lines if line]
    assert '"two"' in rest[0] and rest[-1] == "data: [DONE]"


def test_a_client_that_leaves_stops_the_run(scripted):
    fake, url = scripted
    with _stream_request(url) as response:
        next(line for line in response.iter_lines() if line)
    assert fake.closed.wait(5) and not fake.gate.is_set()  # the run was closed while held at its second step
    deadline = time.monotonic() + 5
    while samples(url).get(("dreamr_requests_total", (("finish_reason", "abort"), ("mode", "target")))) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert samples(url)[("dreamr_requests_running", ())] == 0


def test_a_client_that_leaves_a_non_streaming_request_stops_the_run(scripted):
    fake, url = scripted
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=0.5)
    assert fake.closed.wait(5) and not fake.gate.is_set()  # closed while held at its second step
    deadline = time.monotonic() + 5
    while samples(url).get(("dreamr_requests_total", (("finish_reason", "abort"), ("mode", "target")))) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_failing_run_is_an_error_event_or_a_500(scripted):
    fake, url = scripted
    fake.fail = RuntimeError("the backend fell over")
    fake.gate.set()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)
    with pytest.raises(openai.APIError, match="the backend fell over"):
        list(client.completions.create(model=MODEL, prompt="x", stream=True))
    with _stream_request(url) as response:
        assert [line for line in response.iter_lines() if line][-1] == "data: [DONE]"
    with pytest.raises(openai.InternalServerError, match="the backend fell over"):
        client.completions.create(model=MODEL, prompt="x")
    assert samples(url)[("dreamr_requests_total", (("finish_reason", "error"), ("mode", "target")))] == 3


# -- SpeculativeReasoner.astream ------------------------------------------------------------------------

def _collect(stream):
    async def run():
        return [step async for step in stream], stream.result
    return asyncio.run(run())


@pytest.mark.parametrize("settings", [{"mode": "target"}, SPECULATIVE, {"mode": "fpsr", "alpha": 0.5}],
                         ids=["target", "speculative", "fpsr"])
def test_astream_steps_equal_generate(reasoner, settings):
    want = reasoner.generate(PROMPTS[0], **settings)
    steps, result = _collect(reasoner.astream(PROMPTS[0], **settings))
    assert [s.to_dict() for s in steps] == dicts(want) == dicts(result)
    assert result.text == want.text and result.finish_reason == want.finish_reason


def test_astream_checks_settings_at_the_call(reasoner):
    with pytest.raises(ValueError, match="alpha"):
        reasoner.astream(PROMPTS[0], alpha=2)  # no event loop needed: nothing has run


def test_concurrent_astreams_take_turns(reasoner):
    want = [reasoner.generate(p, **SPECULATIVE) for p in PROMPTS[:2]]

    async def run():
        streams = [reasoner.astream(p, **SPECULATIVE) for p in PROMPTS[:2]]
        return await asyncio.gather(*(s.collect() for s in streams))

    assert [dicts(r) for r in asyncio.run(run())] == [dicts(w) for w in want]


@pytest.fixture
def slow_engine(reasoner, monkeypatch):
    """Mode "target"'s engine with each step slowed down and its runs recorded (steps written, closed)."""
    engine = reasoner.engine("target")
    original = type(engine).stream
    runs = []

    def stream(request):
        run = {"steps": 0, "closed": False}
        runs.append(run)
        try:
            gen = original(engine, request)
            while True:
                try:
                    step = next(gen)
                except StopIteration as end:
                    return end.value
                time.sleep(0.1)  # long enough for the consumer to stop the run mid-way
                run["steps"] += 1
                yield step
        finally:
            run["closed"] = True

    monkeypatch.setattr(engine, "stream", stream)
    return runs


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_astream_stopped_early_stops_the_run_and_frees_the_reasoner(reasoner, slow_engine, how):
    total = len(reasoner.generate(PROMPTS[0], mode="target").steps)  # run 0 (generate streams too)
    assert total >= 4

    async def first_step_then_stop():
        stream = reasoner.astream(PROMPTS[0], mode="target")
        got = asyncio.Event()

        async def consume():
            async for _ in stream:
                got.set()
                if how == "aclose":
                    await asyncio.sleep(10)  # a slow client, closed from outside while it sits here
                # else: cancelled while waiting for the next step (inside the stream)

        task = asyncio.create_task(consume())
        await got.wait()
        if how == "aclose":
            await stream.aclose()  # while the consumer sits inside its async for
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return stream.result

    assert asyncio.run(first_step_then_stop()) is None
    assert slow_engine[1]["closed"] and slow_engine[1]["steps"] < total
    assert not reasoner._astream_lock.locked()
    steps, result = _collect(reasoner.astream(PROMPTS[0], mode="target"))  # the next request runs
    assert len(steps) == total and result is not None


def test_astream_aclose_mid_iteration(reasoner, slow_engine):
    async def run():
        stream = reasoner.astream(PROMPTS[0], mode="target")
        async for _ in stream:
            break  # leave the loop: the stream stays open until aclose
        await stream.aclose()

    asyncio.run(run())
    assert slow_engine[0]["closed"] and slow_engine[0]["steps"] < 4
    assert not reasoner._astream_lock.locked()


def test_astream_engine_error_reaches_the_consumer(reasoner, monkeypatch):
    engine = reasoner.engine("draft")

    def broken(request):
        yield Step("fine\n\n", "draft", None, None, 1)
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(engine, "stream", broken)
    with pytest.raises(RuntimeError, match="engine exploded"):
        _collect(reasoner.astream(PROMPTS[0], mode="draft"))
    assert not reasoner._astream_lock.locked()


def test_astream_docstring_example_runs():
    from dreamr.reasoner import SpeculativeReasoner

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(SpeculativeReasoner.astream, "astream", globs={}):
        runner.run(test)
    summary = runner.summarize(verbose=False)
    assert summary.attempted > 0 and summary.failed == 0


# -- the command line -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    ([], "choose a backend"),
    (["--target", "a", "--target-url", "http://x"], "not both"),
    (["--target", "a", "--max-concurrency", "3"], "--max-concurrency"),
    (["--target-url", "http://x", "--dtype", "float32"], "--dtype"),
    (["--draft-url", "http://x"], "--target-url"),
    (["--target", "a", "--alpha", "high"], "alpha"),
])
def test_cli_backend_choice_is_a_usage_error(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and match in capsys.readouterr().err


def test_cli_serves_in_process_models(monkeypatch, reasoner):
    from dreamr.reasoner import SpeculativeReasoner

    calls = {}
    monkeypatch.setattr(SpeculativeReasoner, "from_pretrained",
                        classmethod(lambda cls, **kw: calls.setdefault("load", kw) and reasoner))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.setdefault("run", (app, kw)))
    assert cli.main(["--target", "t", "--draft", "d", "--mode", "target", "--alpha", "auto", "--port", "8123",
                     "--served-model-name", "mine"]) == 0
    assert calls["load"] == {"target": "t", "draft": "d", "dtype": None, "device": "cpu", "mode": "target",
                             "alpha": "auto"}
    app, kw = calls["run"]
    assert app.state.served_model_name == "mine" and app.state.reasoner is reasoner
    assert kw == {"host": "127.0.0.1", "port": 8123, "log_level": "info"}


def test_a_failing_vllm_server_is_a_502(scripted):
    from dreamr.backends.vllm import ServerError

    fake, url = scripted
    fake.fail = ServerError("http://127.0.0.1:1: connection refused", url="http://127.0.0.1:1", model="m")
    fake.gate.set()
    response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
    assert response.status_code == 502
    error = response.json()["error"]
    assert "connection refused" in error["message"] and error["type"] == "server_error"


def test_malformed_bodies_are_400_naming_the_field(server):
    url = f"{server}/v1/chat/completions"
    bad_content = {"model": MODEL, "messages": [{"role": "user", "content": 5}]}
    assert httpx.post(url, json=bad_content).json()["error"]["param"].startswith("messages[0].content")
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] is None
    bad_budget = {"model": MODEL, "messages": [], "max_tokens": "many"}
    assert httpx.post(url, json=bad_budget).json()["error"]["param"] == "max_tokens"
