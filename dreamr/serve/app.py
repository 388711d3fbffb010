"""The OpenAI-compatible HTTP face of a reasoner: ``create_app(reasoner)`` is a FastAPI app.

    from dreamr.serve import create_app
    app = create_app(reasoner, served_model_name="dreamr")   # then: uvicorn.run(app, port=8000)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (non-streaming, or server-sent events
with one chunk per committed step, as it is committed), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus, :mod:`dreamr.serve.metrics`).

Requests map onto dreamr's settings: ``max_tokens`` / ``max_completion_tokens`` -> ``max_new_tokens``;
``temperature``, ``top_p`` and ``seed`` as they are (absent: the reasoner's defaults, greedy unless it was
built otherwise); every :class:`dreamr.ReasonerConfig` field as an extra body field (with the ``openai``
client: ``extra_body={"mode": "speculative", "alpha": 0.5}``). ``n`` must be 1 and ``stop`` empty (a dreamr
step ends at its ``step_delimiter``, a request at EOS, the ``answer_marker`` or the budget). Every response
adds what dreamr knows: ``dreamr`` (steps, metrics, mode) on a completion, ``dreamr_step`` on each streamed
chunk. Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(``param`` names the field or setting), 404 for another model name, 502 where a remote backend failed,
500 for any other failure while running; in a stream, an error event and then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator, Optional, Sequence, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from dreamr.config import ReasonerConfig
from dreamr.result import Result
from dreamr.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from dreamr.streaming import AsyncStepStream

__all__ = ["create_app", "ChatCompletionRequest", "CompletionRequest"]

log = logging.getLogger("dreamr.serve")

# The dreamr settings a request may give; verdict_head is the server's own choice (it names a folder on the
# server's disk, which a client must not probe), set when the server starts.
SETTINGS = tuple(f.name for f in dataclasses.fields(ReasonerConfig) if f.name != "verdict_head")
# OpenAI fields dreamr does not implement, accepted only at their no-op value (absent or null too);
# anything else is refused rather than silently ignored.
NOOP_FIELDS = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": 0,
               "echo": False, "best_of": 1, "logit_bias": {}, "suffix": "", "tools": [], "tool_choice": "none",
               "response_format": {"type": "text"}, "parallel_tool_calls": False}
# Informational OpenAI fields, accepted and ignored.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")
# dreamr's finish reasons in OpenAI's words (the answer marker ends a request as a stop sequence would).
FINISH_REASONS = {"eos": "stop", "answer": "stop", "length": "length"}


# -- requests ------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """The OpenAI fields both endpoints take; extra fields are dreamr settings (checked in ``_settings``)."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    stop: Union[str, list[str], None] = None


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, ...: not read by a chat template here
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def _param(message: str, names: Sequence[str]) -> Optional[str]:
    """The first of ``names`` that ``message`` starts with, else the first it mentions (None: neither)."""
    for pattern in (r"^\W*{}\b", r"\b{}\b"):
        for name in names:
            if re.search(pattern.format(re.escape(name)), message):
                return name
    return None


def _settings(body: _GenerationRequest) -> tuple[dict, dict]:
    """The request's dreamr settings and, for each, the request field that gave it (for ``param``).

    Raises ApiError (400) for ``n`` other than 1, a ``stop`` sequence, an unknown extra field, an OpenAI
    feature dreamr does not implement, or token budgets that disagree."""
    if body.n != 1:
        raise ApiError(400, f"n must be 1, got {body.n}: dreamr runs one reasoning per request (send several "
                            "requests, with different seeds when sampling)", "n")
    if body.stop:
        raise ApiError(400, f"stop is not supported (got {body.stop!r}): dreamr ends a step at its step_delimiter "
                            "and a request at EOS, the answer_marker or the token budget; set those instead",
                       "stop")
    extra = dict(body.model_extra or {})
    unknown = [k for k in extra if k not in SETTINGS and k not in NOOP_FIELDS and k not in IGNORED_FIELDS]
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}: neither an OpenAI field this server takes nor a dreamr "
                            f"setting; the dreamr settings are {list(SETTINGS)}", unknown[0])
    for name, noop in NOOP_FIELDS.items():
        if extra.get(name) not in (None, noop):
            raise ApiError(400, f"{name} is not supported by dreamr (got {extra[name]!r}); leave it out", name)
    settings = {k: v for k, v in extra.items() if k in SETTINGS}
    given = {k: k for k in settings}
    budgets = {name: value for name, value in (("max_new_tokens", settings.get("max_new_tokens")),
                                               ("max_tokens", body.max_tokens),
                                               ("max_completion_tokens", body.max_completion_tokens))
               if value is not None}
    if len(set(map(repr, budgets.values()))) > 1:
        raise ApiError(400, f"the token budgets disagree: {budgets}; give one", list(budgets)[-1])
    if budgets:
        field, settings["max_new_tokens"] = next(iter(budgets.items()))
        given["max_new_tokens"] = field  # an error about max_new_tokens names the field the client sent
    for name in ("temperature", "top_p", "seed"):  # OpenAI fields that are also dreamr settings
        if getattr(body, name) is not None:
            settings[name], given[name] = getattr(body, name), name
    return settings, given


def _completion_prompt(prompt: Union[str, list[str]]) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request (got a list of {len(prompt)}); send one request "
                                "per prompt", "prompt")
        prompt = prompt[0]
    return prompt


def _chat_prompt(messages: list[ChatMessage]) -> list[dict]:
    """The chat messages as dreamr takes them, ``[{"role", "content": str}]`` (text parts joined)."""
    prompt = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if not all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                    "supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        prompt.append({"role": m.role, "content": content or ""})
    if not prompt:
        raise ApiError(400, "messages is empty", "messages")
    return prompt


def _run_error(exc: Exception, given: dict) -> ApiError:
    """An error raised by a request (at the call or while it ran) as the response it becomes; ``given``
    maps each setting to the request field that gave it, for ``param``."""
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc), given.get(_param(str(exc), list(given))))
    try:  # remote backends (dreamr.backends.vllm) raise ServerError when a vLLM server fails
        from dreamr.backends.vllm import ServerError
    except ImportError:
        ServerError = ()  # noqa: N806 - no remote backend installed: nothing is one
    log.error("request failed: %s", exc, exc_info=exc)
    if isinstance(exc, ServerError):
        return ApiError(502, f"backend error: {exc}", type="server_error", code="upstream_error")
    return ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error")


# -- one request's run ---------------------------------------------------------------------------------

class _Served:
    """One request's run: counted in the metrics when it ends, and its stream closed however it ends
    (a client that left stops the reasoner after the current step)."""

    def __init__(self, stream: AsyncStepStream, mode: str, metrics: ServerMetrics, started: float):
        self.stream, self.mode, self.metrics, self.started = stream, mode, metrics, started
        self.first_step = True
        self.failed = False

    def step(self) -> None:
        if self.first_step:
            self.first_step = False
            self.metrics.time_to_first_step.observe(time.perf_counter() - self.started)

    async def __aenter__(self) -> "_Served":
        self.metrics.requests_running.inc()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        self.metrics.requests_running.dec()
        result = self.stream.result
        if self.failed or isinstance(exc, Exception):
            finish = "error"
        elif exc is not None or result is None:  # cancelled, or the client left mid-stream
            finish = "abort"
        else:
            finish = FINISH_REASONS[result.finish_reason]
        self.metrics.finished(result.mode if result is not None and result.mode else self.mode, finish,
                              result if finish not in ("abort", "error") else None,
                              time.perf_counter() - self.started)
        with anyio.CancelScope(shield=True):  # a cancelled task must still close the run
            await self.stream.aclose()
        return False


def _usage(stream: AsyncStepStream, result: Result) -> dict:
    prompt = int(getattr(stream, "prompt_tokens", 0) or 0)
    completion = result.metrics.committed_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _unless_disconnected(work, request: Request, poll_s: float = 0.25) -> None:
    """Run ``work``, cancelling it where the client goes away first (a non-streaming request whose client
    timed out must not keep the models, or a vLLM server, busy: vLLM's own server does the same)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ApiError(499, "the client disconnected before the answer", type="client_closed_request")
    finally:
        if not task.done():  # this handler was cancelled itself
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# -- the app -------------------------------------------------------------------------------------------

def create_app(reasoner: Any, *, served_model_name: str = "dreamr") -> FastAPI:
    """The OpenAI-compatible server of ``reasoner``.

    Parameters
    ----------
    reasoner : SpeculativeReasoner, dreamr.remote.RemoteReasoner, or any object with ``.config`` (a
        :class:`dreamr.ReasonerConfig`, its defaults) and ``.astream(prompt, **settings)`` returning a
        :class:`dreamr.streaming.AsyncStepStream` (raising ValueError naming a bad setting at the call).
    served_model_name : str
        The model name clients send (``model``) and ``/v1/models`` lists.

    Returns
    -------
    fastapi.FastAPI
        With the reasoner, the name and the app's :class:`ServerMetrics` (its own Prometheus registry) in
        ``app.state``.
    """
    app = FastAPI(title="dreamr", description="OpenAI-compatible step-level speculative reasoning",
                  version=_version())
    app.state.reasoner = reasoner
    app.state.served_model_name = served_model_name
    app.state.metrics = metrics = ServerMetrics()
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        param = None
        if first.get("type") != "json_invalid":  # there the loc is a character offset, not a field
            param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.get("loc", ())[1:])
            param = param.lstrip(".") or None  # ("body", "messages", 0, "content") -> messages[0].content
        return ApiError(400, f"{param or 'body'}: {first.get('msg')}", param).response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "dreamr"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        check_model(model)
        return model_card()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != served_model_name:
            raise ApiError(404, f"The model `{name}` does not exist: this server serves `{served_model_name}` "
                                "(set model to it)", "model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await serve(body, raw, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await serve(body, raw, chat=True)

    async def serve(body: Union[CompletionRequest, ChatCompletionRequest], raw: Request, *, chat: bool):
        started = time.perf_counter()
        check_model(body.model)
        prompt = _chat_prompt(body.messages) if chat else _completion_prompt(body.prompt)
        settings, given = _settings(body)
        given["prompt"] = "messages" if chat else "prompt"
        try:
            stream = reasoner.astream(prompt, **settings)  # bad settings: ValueError naming one, now
        except ValueError as exc:
            raise _run_error(exc, given) from None
        mode = settings.get("mode", reasoner.config.mode)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": served_model_name}
        served = _Served(stream, mode, metrics, started)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(events(served, head, given, chat=chat, include_usage=include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async def collect() -> None:
            async with served:
                try:
                    async for _ in stream:
                        served.step()
                except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
                    served.failed = True
                    raise _run_error(exc, given) from exc

        await _unless_disconnected(collect(), raw)
        result = stream.result
        choice = ({"message": {"role": "assistant", "content": result.text}} if chat else {"text": result.text})
        return {**head, "choices": [{"index": 0, **choice, "logprobs": None,
                                     "finish_reason": FINISH_REASONS[result.finish_reason]}],
                "usage": _usage(stream, result),
                "dreamr": {"steps": [s.to_dict() for s in result.steps], "metrics": result.metrics.to_dict(),
                           "mode": result.mode, "finish_reason": result.finish_reason}}

    async def events(served: _Served, head: dict, given: dict, *, chat: bool,
                     include_usage: bool) -> AsyncIterator[str]:
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        first = True

        def chunk(text: Optional[str], finish_reason: Optional[str]) -> dict:
            nonlocal first
            if chat:
                delta = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            first = False
            return {**chunk_head, "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}]}

        async with served:
            try:
                async for step in served.stream:
                    served.step()
                    yield _sse({**chunk(step.text, None), "dreamr_step": step.to_dict()})
            except Exception as exc:  # noqa: BLE001 - reported in the stream: the status line is already sent
                served.failed = True
                yield _sse(_run_error(exc, given).body)
                yield "data: [DONE]\n\n"
                return
            result = served.stream.result
            yield _sse({**chunk(None, FINISH_REASONS[result.finish_reason]),
                        "dreamr": {"metrics": result.metrics.to_dict(), "mode": result.mode,
                                   "finish_reason": result.finish_reason}})
            if include_usage:
                yield _sse({**chunk_head, "choices": [], "usage": _usage(served.stream, result)})
            yield "data: [DONE]\n\n"

    return app


def _version() -> str:
    from dreamr import __version__

    return __version__
