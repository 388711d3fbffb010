"""One vLLM server behind its OpenAI-compatible API: the requests dreamr sends it, with retries and clear errors.

    client = ServerClient("http://127.0.0.1:8001", role="target")
    info = client.check()                                   # /v1/models: the served name, max_model_len
    client.check_tokenizer(tokenizer, "target_tokenizer")   # /tokenize agrees with the local tokenizer
    out = await client.complete(ids, max_tokens=64, stop=["\\n\\n"])   # a step: out.token_ids [T]
    out = await client.complete(ids, max_tokens=1, logprob_token_ids=[yes, no])  # a verdict: out.logprobs

Prompts go as token ids (``prompt: [int, ...]``): the server's prefix cache then serves every request on a
prefix it has seen (the verification after the step, the fallback on the same prefix), and nothing is
re-tokenized on the server. Cancelling a :meth:`ServerClient.complete` (an ``asyncio`` task cancelled)
closes its connection, and vLLM aborts a request whose client went away, so work past a rejection stops.

Failures: a connection error, a timeout or a 5xx answer is retried with exponential backoff
(``retries`` times); after that, or at once for a 4xx answer, :class:`ServerError` names the server's URL
and model. A completion is used only once it has arrived whole, so a failed request commits nothing, and a
retried one (greedy, or sampled with its seed) gives the same tokens.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import httpx

__all__ = ["Completion", "ServerClient", "ServerError", "ServerInfo"]

# Text whose tokens a local tokenizer must give exactly as the server's does: the verdict prompt, digits,
# the step delimiter, spaces, accents and other scripts (byte-level pieces).
TOKENIZER_PROBE = ("Is the last step correct? Answer Yes or No.\nAnswer: Yes\n\n 12 + 345 = 357.  "
                   "Natalia sold 48/2 = 24 clips. caf\u00e9 \u03c0 \u2211 \u4f60\u597d \U0001F600\t-\n")


class ServerError(RuntimeError):
    """A vLLM server failed a request (down, too slow, or answering with an error) after the retries.

    Attributes
    ----------
    url : str, the server's base URL
    model : str, the model it was asked for
    status : int or None, the HTTP status of the last answer (None: no answer at all)
    """

    def __init__(self, message: str, *, url: str, model: str, status: Optional[int] = None):
        super().__init__(message)
        self.url, self.model, self.status = url, model, status


@dataclass(frozen=True)
class ServerInfo:
    """What ``/v1/models`` says of the served model."""

    served_name: str          # the name requests must give as "model"
    max_model_len: int        # the server's context length (prompt + generated tokens)
    root: Optional[str]       # the model's folder or id on the server's side (a local tokenizer's source)


@dataclass(frozen=True)
class Completion:
    """One completion's answer.

    token_ids : [T] the generated tokens (an EOS the server stopped on included)
    finish_reason : "stop" (EOS, a stop token or a stop string), "length" (max_tokens) or "abort"
    stop_reason : the stop string that ended it (a str), the stop token (an int: an EOS the served model's
        generation config names), or None (the tokenizer's EOS, or max_tokens)
    logprobs : token id -> log-probability at the first generated position (the sampled token and the
        ``logprob_token_ids`` asked for); None where none were asked for
    """

    token_ids: list[int]
    finish_reason: str
    stop_reason: Any
    logprobs: Optional[dict[int, float]]


# Sent with every completion: vLLM fills a field a request leaves out from the served model's
# generation_config.json (a repetition penalty, top_k, min_p), which would make the server's steps differ
# from the in-process engines' (plain greedy, or temperature / top-p sampling only).
NEUTRAL_SAMPLING = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_k": 0,
                    "min_p": 0.0}
# Answers worth another attempt: the server is overloaded (429) or failed (5xx).
RETRY_STATUS = (429,)


class ServerClient:
    """Requests to one vLLM server's OpenAI-compatible API.

    Parameters
    ----------
    url : str
        The server's base URL ("http://host:port", with or without a trailing "/v1").
    role : str
        "target" or "draft", for the messages (``<role>_url``, ``<role>_model``, ``<role>_tokenizer``).
    model : str, optional
        The served model name to ask for; None takes the one model the server serves.
    api_key : str, optional
        Sent as a bearer token (vLLM's ``--api-key``).
    timeout_s : float
        Seconds one request may take (a step of ``max_step_tokens`` tokens on a slow server included).
    retries : int
        Further attempts after a connection error, a timeout or a 5xx answer.
    backoff_s : float
        The first wait before a retry; it doubles with each attempt.
    max_concurrency : int
        Requests in flight at once to this server, from this client (the rest wait their turn).
    """

    def __init__(self, url: str, *, role: str, model: Optional[str] = None, api_key: Optional[str] = None,
                 timeout_s: float = 300.0, retries: int = 3, backoff_s: float = 0.5, max_concurrency: int = 16):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{role}_url must be an http(s) URL of a vLLM server, e.g. 'http://127.0.0.1:8001', "
                             f"got {url!r}")
        for name, value, low in (("timeout_s", timeout_s, 0), ("backoff_s", backoff_s, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
                raise ValueError(f"{name} must be a number > {low}, got {value!r}")
        for name, value, low in (("retries", retries, 0), ("max_concurrency", max_concurrency, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        base = url.rstrip("/")
        self.url = base[:-3] if base.endswith("/v1") else base
        self.role, self.model = role, model
        self.timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        self.retries, self.backoff_s, self.max_concurrency = retries, backoff_s, max_concurrency
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One httpx client and one concurrency gate per event loop (each asyncio.run of the sync API is a new loop).
        self._per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple]" = weakref.WeakKeyDictionary()
        self.requests = 0      # requests answered (a retried one counts once)
        self.cancelled = 0     # requests abandoned in flight (their task cancelled: the server aborts them)

    def _name(self) -> str:
        return self.model if self.model is not None else "?"

    def error(self, what: str, status: Optional[int] = None) -> ServerError:
        return ServerError(f"{self.role} server {self.url} (model {self._name()!r}): {what}", url=self.url,
                           model=self._name(), status=status)

    # -- checks at start-up (synchronous: they run when a reasoner is built) ------------------------------

    def check(self) -> ServerInfo:
        """Ask ``/v1/models`` what the server serves; pick or check the model name.

        Raises ValueError naming ``<role>_url`` where nothing answers there (or not as a vLLM server), and
        ``<role>_model`` where the server serves another model than the one named."""
        try:
            with httpx.Client(timeout=self.timeout, headers=self._headers) as http:
                answer = http.get(f"{self.url}/v1/models")
        except httpx.TransportError as exc:
            raise ValueError(f"{self.role}_url={self.url!r}: no server answers there ({type(exc).__name__}: {exc}); "
                             "start one (python -m dreamr.backends.vllm.launch, or vllm serve) or fix the URL") from None
        if answer.status_code != 200:
            raise ValueError(f"{self.role}_url={self.url!r}: GET /v1/models answered {answer.status_code} "
                             f"({answer.text[:200]!r}); is this a vLLM OpenAI-compatible server?")
        try:
            models = answer.json()["data"]
            served = {m["id"]: m for m in models}
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.role}_url={self.url!r}: GET /v1/models did not return an OpenAI model list "
                             f"({answer.text[:200]!r}); is this a vLLM OpenAI-compatible server?") from None
        if self.model is None:
            if len(served) != 1:
                raise ValueError(f"{self.role}_model: the server at {self.url} serves {sorted(served)}; name the one "
                                 f"to use with {self.role}_model=...")
            self.model = next(iter(served))
        elif self.model not in served:
            raise ValueError(f"{self.role}_model={self.model!r}: the server at {self.url} serves {sorted(served)}, "
                             f"not {self.model!r}; name one of those or point {self.role}_url at the right server")
        entry = served[self.model]
        max_len = entry.get("max_model_len")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"{self.role}_url={self.url!r}: /v1/models gives no max_model_len for {self.model!r}; "
                             "dreamr needs a vLLM server (it reports each model's context length)")
        return ServerInfo(served_name=self.model, max_model_len=max_len, root=entry.get("root"))

    def check_tokenizer(self, tokenizer, arg: str) -> None:
        """Raise ValueError naming ``arg`` unless the server's ``/tokenize`` gives the local tokenizer's ids.

        dreamr sends token ids and reads token ids back, so a tokenizer that differs from the server's in
        any id would verify and commit other text than it shows."""
        local = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        try:
            with httpx.Client(timeout=self.timeout, headers=self._headers) as http:
                answer = http.post(f"{self.url}/tokenize", json={"model": self.model, "prompt": TOKENIZER_PROBE,
                                                                "add_special_tokens": False})
            answer.raise_for_status()
            remote = [int(t) for t in answer.json()["tokens"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.role}_url={self.url!r}: the server's /tokenize failed ({exc}); dreamr checks the "
                             "local tokenizer against it (a vLLM server has it)") from None
        if remote != local:
            first = next((i for i, (a, b) in enumerate(zip(local, remote)) if a != b), min(len(local), len(remote)))
            raise ValueError(f"{arg}: the local tokenizer does not tokenize like the {self.role} server {self.url} "
                             f"(model {self.model!r}): they differ from token {first} on (local "
                             f"{local[first:first + 5]}, server {remote[first:first + 5]}); pass {arg}= the served "
                             "model's own tokenizer (its folder or Hugging Face id)")

    # -- requests -------------------------------------------------------------------------------------------

    def _loop_state(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            state = (httpx.AsyncClient(timeout=self.timeout, headers=self._headers, limits=limits),
                     asyncio.Semaphore(self.max_concurrency))
            self._per_loop[loop] = state
        return state

    async def aclose(self) -> None:
        """Close this event loop's connections."""
        loop = asyncio.get_running_loop()
        state = self._per_loop.pop(loop, None)
        if state is not None:
            await state[0].aclose()

    async def _post(self, path: str, body: dict) -> dict:
        http, gate = self._loop_state()
        last: Optional[BaseException] = None
        status: Optional[int] = None
        async with gate:
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    answer = await http.post(f"{self.url}{path}", json=body)
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
                except httpx.TransportError as exc:
                    last, status = exc, None
                    continue
                if answer.status_code >= 500 or answer.status_code in RETRY_STATUS:
                    last, status = RuntimeError(f"HTTP {answer.status_code}: {answer.text[:300]}"), answer.status_code
                    continue
                if answer.status_code != 200:
                    raise self.error(f"POST {path} was refused with HTTP {answer.status_code}: {answer.text[:500]}",
                                      answer.status_code)
                try:
                    body = answer.json()
                except ValueError:
                    raise self.error(f"POST {path} answered 200 with a body that is not JSON "
                                     f"({answer.text[:200]!r})", answer.status_code) from None
                self.requests += 1
                return body
        what = f"{type(last).__name__}: {last}" if isinstance(last, httpx.TransportError) else str(last)
        raise self.error(f"POST {path} failed after {self.retries + 1} attempts ({what}); is the server still "
                          "running and not overloaded?", status)

    async def complete(self, prompt_ids: Sequence[int], *, max_tokens: int, stop: Optional[list[str]] = None,
                       temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
                       logprob_token_ids: Optional[Sequence[int]] = None) -> Completion:
        """One ``/v1/completions`` request on the token ids ``prompt_ids [P]``.

        ``stop``: stop strings (kept in the output); ``logprob_token_ids``: the tokens whose
        log-probabilities to return at the first generated position (``Completion.logprobs``)."""
        body: dict[str, Any] = {"model": self.model, "prompt": [int(t) for t in prompt_ids], "max_tokens": int(max_tokens),
                                "temperature": float(temperature), "top_p": float(top_p), "return_token_ids": True,
                                **NEUTRAL_SAMPLING}
        if stop:
            body.update(stop=list(stop), include_stop_str_in_output=True)
        if seed is not None:
            body["seed"] = int(seed)
        if logprob_token_ids is not None:
            body.update(logprobs=1, logprob_token_ids=[int(t) for t in logprob_token_ids], return_tokens_as_token_ids=True)
        answer = await self._post("/v1/completions", body)
        try:
            choice = answer["choices"][0]
            token_ids = [int(t) for t in choice["token_ids"]]
            logprobs = None
            if logprob_token_ids is not None:
                top = choice["logprobs"]["top_logprobs"][0]
                logprobs = {int(k.split(":", 1)[1]): float(v) for k, v in top.items()}
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise self.error(f"/v1/completions answered without token ids or log-probabilities ({exc!r}: "
                              f"{str(answer)[:300]}); dreamr needs a vLLM server (return_token_ids, "
                              "logprob_token_ids)") from None
        return Completion(token_ids, str(choice.get("finish_reason") or ""), choice.get("stop_reason"), logprobs)

    async def metrics(self) -> dict[str, float]:
        """The server's own Prometheus figures (``/metrics``), each sample summed over its labels:
        ``vllm:prefix_cache_hits_total``, ``vllm:prefix_cache_queries_total``, ``vllm:prompt_tokens_total``,
        ``vllm:generation_tokens_total``, ``vllm:num_requests_running``, ... (an empty dict where the
        server has no /metrics)."""
        from prometheus_client.parser import text_string_to_metric_families

        http, _ = self._loop_state()
        try:
            answer = await http.get(f"{self.url}/metrics")
        except httpx.TransportError as exc:
            raise self.error(f"GET /metrics failed ({type(exc).__name__}: {exc})") from None
        if answer.status_code != 200:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
        return out
