"""The remote backend's own logic, without a vLLM server: CPN from log-probabilities against the fused op's
reference, the client's argument checks, retries, errors and cancellation against a scripted HTTP server on
loopback, and where a step ends when the server stops early. The real servers are in test_remote_vllm.py."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dreamr import reference
from dreamr.backends.vllm import RemoteModel, ServerClient, ServerError, write_step
from dreamr.verify import cpn_from_logprobs


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_cpn_from_logprobs_is_the_fused_ops_cpn(softcap):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(50, 16, generator=g,
                                                                                     dtype=torch.float64) * 3
    pos, neg = [3, 7, 11], [5, 40]
    expected, _ = reference.cpn_verify(hidden, weight, None, pos, neg, 0.5, logit_softcap=softcap)
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logprobs = torch.log_softmax(logits, dim=-1)  # what a server returns: logits less one constant per row
    got = cpn_from_logprobs(logprobs[:, pos].tolist(), logprobs[:, neg].tolist())
    assert got.dtype == torch.float32 and got.shape == (6,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_cpn_from_logprobs_rejects_what_is_not_finite():
    got = cpn_from_logprobs([[-1.0, float("nan")], [-1.0], [None], [-1.0], [-0.5]],
                            [[-2.0], [float("-inf")], [-1.0], [float("inf")], [-0.5]])
    assert torch.isnan(got[:4]).all() and got[4] == pytest.approx(0.5)
    assert not reference.accepts_value(float(got[0]), 0.0)
    with pytest.raises(ValueError, match="one row per step"):
        cpn_from_logprobs([[-1.0]], [])
    with pytest.raises(ValueError, match="at least one"):
        cpn_from_logprobs([[]], [[-1.0]])


@pytest.mark.parametrize("kwargs, name", [(dict(url="127.0.0.1:8001"), "target_url"), (dict(retries=-1), "retries"),
                                          (dict(timeout_s=0), "timeout_s"), (dict(max_concurrency=0), "max_concurrency")])
def test_client_arguments_are_checked(kwargs, name):
    kwargs = {"url": "http://127.0.0.1:8001", **kwargs}
    with pytest.raises(ValueError, match=name):
        ServerClient(kwargs.pop("url"), role="target", **kwargs)


def test_no_server_there_names_the_url():
    with pytest.raises(ValueError, match=r"draft_url='http://127.0.0.1:9'.*no server answers"):
        ServerClient("http://127.0.0.1:9", role="draft").check()


class Scripted:
    """An HTTP server on loopback answering POSTs from a script: each entry ``(status, body, delay_s)``."""

    def __init__(self, script):
        self.script, self.bodies = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body, delay = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                threading.Event().wait(delay)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def completion(token_ids, finish="stop", stop_reason=None):
    return {"choices": [{"index": 0, "text": "", "token_ids": token_ids, "finish_reason": finish,
                         "stop_reason": stop_reason}]}


@pytest.fixture
def scripted():
    made = []

    def make(*script):
        s = Scripted(script)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_5xx_is_retried_with_backoff_then_answered(scripted):
    server = scripted((503, {"error": "busy"}, 0), (502, {}, 0), (200, completion([5, 6]), 0))
    client = ServerClient(server.url, role="target", model="m", backoff_s=0.01, retries=2)
    out = asyncio.run(client.complete([1, 2], max_tokens=4, stop=["\n\n"]))
    assert out.token_ids == [5, 6] and len(server.bodies) == 3 and client.requests == 1
    assert server.bodies[0]["prompt"] == [1, 2] and server.bodies[0]["stop"] == ["\n\n"]


def test_a_server_that_keeps_failing_gives_a_server_error_naming_url_and_model(scripted):
    server = scripted((500, {"error": "boom"}, 0))
    client = ServerClient(server.url, role="draft", model="smollm2", backoff_s=0.01, retries=2)
    with pytest.raises(ServerError, match=rf"draft server {server.url} \(model 'smollm2'\).*3 attempts") as caught:
        asyncio.run(client.complete([1], max_tokens=1))
    assert caught.value.status == 500 and len(server.bodies) == 3


def test_a_refused_request_is_not_retried(scripted):
    server = scripted((400, {"error": {"message": "prompt too long"}}, 0))
    client = ServerClient(server.url, role="target", model="m", backoff_s=0.01)
    with pytest.raises(ServerError, match="400.*prompt too long") as caught:
        asyncio.run(client.complete([1], max_tokens=1))
    assert caught.value.status == 400 and len(server.bodies) == 1


def test_a_slow_server_times_out_with_a_clear_error(scripted):
    server = scripted((200, completion([5]), 2.0))
    client = ServerClient(server.url, role="target", model="m", timeout_s=0.3, retries=0)
    with pytest.raises(ServerError, match="1 attempts.*Timeout"):
        asyncio.run(client.complete([1], max_tokens=1))


def test_cancelling_a_request_counts_it_and_leaves_the_client_usable(scripted):
    server = scripted((200, completion([5]), 1.0), (200, completion([7]), 0))
    client = ServerClient(server.url, role="target", model="m")

    async def run():
        task = asyncio.create_task(client.complete([1], max_tokens=1))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await client.complete([1], max_tokens=1)

    assert asyncio.run(run()).token_ids == [7] and client.cancelled == 1 and client.requests == 1


def _model(client, tokenizer):
    m = RemoteModel.__new__(RemoteModel)  # the facts by hand: no /v1/models or /tokenize to read them from
    m.client, m.name, m.tokenizer, m.eos_ids, m.context_length = client, "draft", tokenizer, {0}, 512
    return m


def test_a_step_goes_on_past_a_delimiter_that_only_opens_it(scripted, tok_a):
    """vLLM stops at the first delimiter; a dreamr step needs content before it, so the writer asks again."""
    delim = tok_a.encode("\n\n", add_special_tokens=False)
    body = tok_a.encode("The sum is 4.", add_special_tokens=False)
    server = scripted((200, completion(delim, "stop", "\n\n"), 0), (200, completion(body + delim, "stop", "\n\n"), 0))
    client = ServerClient(server.url, role="draft", model="m")
    w = asyncio.run(write_step(_model(client, tok_a), [9, 9], "\n\n", 40))
    assert w.end == "delimiter" and w.ids == delim + body + delim and w.text.strip() == "The sum is 4."
    assert server.bodies[1]["prompt"] == [9, 9] + delim and server.bodies[1]["max_tokens"] == 40 - len(delim)


def test_a_step_ends_where_the_in_process_writer_ends_it(scripted, tok_a):
    """Tokens past the step's end (an EOS the tokenizer knows, the cap) are not part of the step."""
    body = tok_a.encode("one two three four", add_special_tokens=False)
    server = scripted((200, completion(body + [0, 5], "stop"), 0), (200, completion(body, "length"), 0))
    client = ServerClient(server.url, role="draft", model="m")
    w = asyncio.run(write_step(_model(client, tok_a), [9], "\n\n", 40))
    assert w.end == "eos" and w.ids == body + [0] and w.content_ids == body
    w = asyncio.run(write_step(_model(client, tok_a), [9], "\n\n", 2))
    assert w.end == "cap" and w.ids == body[:2]
