"""``RemoteReasoner``: dreamr over vLLM servers, for targets that one process cannot hold.

    from dreamr.remote import RemoteReasoner
    reasoner = RemoteReasoner("http://gpu-node:8001", "http://gpu-node:8002")   # target, draft servers
    result = reasoner.generate("Natalia sold clips to 48 of her friends ...", mode="fpsr", alpha=0.7)
    results = await reasoner.agenerate_batch(prompts)    # many requests at once, up to max_concurrency each server

The same settings (:class:`dreamr.ReasonerConfig`) and the same :class:`dreamr.result.Result`, ``Step`` and
``Metrics`` as :class:`dreamr.SpeculativeReasoner`; the modes "target", "draft", "speculative" and "fpsr"
run here (see :mod:`dreamr.backends.vllm`). The servers are any vLLM OpenAI-compatible servers (tensor and
pipeline parallel, on other machines); each is checked when the reasoner is built: that it answers, that
it serves the model named, and that the local tokenizer tokenizes as it does.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Optional, Sequence, Union

from dreamr.backends.vllm import (RemoteModel, RemoteVerifier, ServerClient, stream_fpsr, stream_single,
                                  stream_speculative)
from dreamr.backends.vllm.fpsr import TARGET_LAUNCHES
from dreamr.config import VERIFIED_MODES, ReasonerConfig
from dreamr.lm import Prompt
from dreamr.reasoner import _same_tokenizer, _settings
from dreamr.request import Request, build as build_request
from dreamr.result import Result, Step
from dreamr.streaming import AsyncStepStream
from dreamr.verify import AdaptiveAlpha, VerdictPrompt

__all__ = ["REMOTE_MODES", "RemoteReasoner"]

# The modes that run over servers; "token" is in-process token-level speculation (on a server, vLLM's own
# --speculative-config does that: use mode "target").
REMOTE_MODES = ("target", "draft", "speculative", "fpsr")


class RemoteReasoner:
    """Step-level speculative reasoning with the target and the draft behind vLLM servers.

    Parameters
    ----------
    target_url : str
        The target's vLLM server ("http://host:port").
    draft_url : str, optional
        The draft's server; without it only mode "target" runs (pass ``mode="target"``: the default mode is
        "speculative").
    target_model, draft_model : str, optional
        The served model names; None takes the one model each server serves.
    target_tokenizer, draft_tokenizer : tokenizer, folder, model id or dreamr built-in name, optional
        Each model's tokenizer on this side (prompts are sent as its token ids); None reads it from the
        server's model folder where that is on this machine, else from the served name. Checked against
        the server's ``/tokenize`` (ValueError naming the argument where they differ).
    config : ReasonerConfig, optional
        Defaults; ``**overrides`` replace single fields, here and per call.
    max_concurrency : int
        Requests in flight at once to each server.
    timeout_s, retries, api_key :
        Per request: seconds, further attempts after a connection error or a 5xx answer (with backoff),
        the servers' ``--api-key``.

    Raises
    ------
    ValueError
        A URL where no server answers (naming ``target_url`` / ``draft_url``), a server serving another model
        than named (``target_model`` / ``draft_model``), a tokenizer that differs from the server's
        (``target_tokenizer`` / ``draft_tokenizer``), bad settings.

    Differences from the in-process reasoner: ``draft_policy=None`` means "always" here (adaptive drafting
    weighs forward passes a server does not report; "adaptive" is refused), token-level speculation inside a
    server's steps is vLLM's own (``--speculative-config``), and a verdict head (hidden states) is refused.

    Errors while running are :class:`dreamr.backends.vllm.ServerError` (naming the server's URL and model);
    nothing is committed from a request that did not complete.

    Example
    -------
    >>> reasoner = RemoteReasoner("http://127.0.0.1:8001", "http://127.0.0.1:8002")  # doctest: +SKIP
    >>> for step in reasoner.generate("What is 2 + 3?", alpha=0.7).steps:            # doctest: +SKIP
    ...     print(step.source, step.cpn, step.text)
    """

    def __init__(self, target_url: str, draft_url: Optional[str] = None, *, target_model: Optional[str] = None,
                 draft_model: Optional[str] = None, target_tokenizer: Any = None, draft_tokenizer: Any = None,
                 config: Optional[ReasonerConfig] = None, max_concurrency: int = 16, timeout_s: float = 300.0,
                 retries: int = 3, api_key: Optional[str] = None, **overrides):
        self.config = _settings(config, overrides)  # bad settings fail before any server is asked
        common = dict(api_key=api_key, timeout_s=timeout_s, retries=retries, max_concurrency=max_concurrency)
        self.target = RemoteModel(ServerClient(target_url, role="target", model=target_model, **common),
                                  target_tokenizer, "target")
        self.draft = None
        if draft_url is not None:
            self.draft = RemoteModel(ServerClient(draft_url, role="draft", model=draft_model, **common),
                                     draft_tokenizer, "draft")
        self.same_tokenizer = self.draft is not None and _same_tokenizer(self.target.tokenizer, self.draft.tokenizer)
        self._prompts: dict[tuple, VerdictPrompt] = {}
        self._thresholds: dict[tuple, AdaptiveAlpha] = {}
        # Debug hook (dreamr.backends.vllm.model.Observer): sees each model's committed ids after each step.
        self.observer = None
        # Mode "fpsr": when the target's own step starts, "eager" (with the verdict) or "on_reject" (after a
        # rejection; for target servers without spare capacity). See dreamr.backends.vllm.fpsr.
        self.fpsr_target_launch = "eager"
        self._check(self.config)

    # -- plumbing -----------------------------------------------------------------------------------------

    def _check(self, config: ReasonerConfig) -> ReasonerConfig:
        """Raise ValueError naming the setting that the remote backend does not run."""
        if config.mode not in REMOTE_MODES:
            hint = (" (token-level speculation on a server is vLLM's own --speculative-config; use mode 'target')"
                    if config.mode == "token" else "")
            raise ValueError(f"mode must be one of {list(REMOTE_MODES)} on vLLM servers, got {config.mode!r}{hint}")
        if config.mode != "target" and self.draft is None:
            raise ValueError(f"mode={config.mode!r} needs the draft's server: pass draft_url=... (without it only "
                             "mode 'target' runs)")
        if config.verdict_head is not None:
            raise ValueError("verdict_head: a verdict head scores the target's hidden states, which a vLLM server does "
                             "not return; use the target's own verdict (verdict_head=None), optionally calibrate=True")
        if config.draft_policy == "adaptive":
            raise ValueError("draft_policy='adaptive' runs in-process only (it weighs forward passes the servers do "
                             "not report); use draft_policy=None or 'always'")
        if config.proposal_policy == "adaptive":
            raise ValueError("proposal_policy='adaptive' runs in-process only (token-level speculation inside a "
                             "server's steps is vLLM's own --speculative-config); use proposal_policy=None")
        if config.draft_token_speculation is not None and config.draft_speculation_sources:
            raise ValueError(f"draft_token_speculation={config.draft_token_speculation!r}: token-level speculation "
                             "inside a server's steps is vLLM's own --speculative-config; use None or 'off'")
        if config.mode in VERIFIED_MODES:
            self._verifier(config)  # verdict words are checked now
        return config

    def _verifier(self, config: ReasonerConfig) -> RemoteVerifier:
        key = (config.verdict_template, config.positive_words, config.negative_words, config.step_delimiter)
        prompt = self._prompts.get(key)
        if prompt is None:
            prompt = self._prompts[key] = VerdictPrompt.for_config(self.target.tokenizer, config)
        return RemoteVerifier(self.target, prompt, config.calibrate)

    def _threshold(self, config: ReasonerConfig) -> Optional[AdaptiveAlpha]:
        """alpha="auto": the threshold carried across this reasoner's requests (as SpeculativeReasoner's)."""
        if not config.auto_alpha:
            return None
        key = (config.verdict_template, config.positive_words, config.negative_words, config.step_delimiter,
               config.calibrate, config.target_acceptance, config.alpha_gamma)
        if key not in self._thresholds:
            self._thresholds[key] = AdaptiveAlpha(config.target_acceptance, config.alpha_gamma)
        return self._thresholds[key]

    def _request(self, prompt: Prompt, overrides: dict, name: str = "prompt") -> Request:
        if "images" in overrides:
            raise ValueError("images: the vLLM backend sends text prompts only; run a vision-language target "
                             "in-process (SpeculativeReasoner)")
        config = self._check(_settings(self.config, overrides))
        verified = config.mode in VERIFIED_MODES
        return build_request(prompt, None, config, target=self.target, draft=self.draft,
                             verifier=self._verifier(config) if verified else None,
                             threshold=self._threshold(config) if verified else None, name=name)

    def _run(self, request: Request) -> AsyncIterator[Union[Step, Result]]:
        mode = request.config.mode
        if mode in ("target", "draft"):
            return stream_single(request, self.target if mode == "target" else self.draft, self.observer)
        if mode == "fpsr":
            if self.fpsr_target_launch not in TARGET_LAUNCHES:
                raise ValueError(f"fpsr_target_launch must be one of {list(TARGET_LAUNCHES)}, got "
                                 f"{self.fpsr_target_launch!r}")
            return stream_fpsr(request, self.target, self.draft, self.same_tokenizer, self.observer,
                               self.fpsr_target_launch)
        return stream_speculative(request, self.target, self.draft, self.same_tokenizer, self.observer)

    # -- public API ---------------------------------------------------------------------------------------

    def astream(self, prompt: Prompt, **overrides) -> AsyncStepStream:
        """Each step as it is committed (``async for``); the stream's ``result`` holds the Result at the end.
        Bad settings raise ValueError here, before any request is sent."""
        request = self._request(prompt, overrides)
        return AsyncStepStream(self._run(request), len(request.target_ids or request.draft_ids))

    async def agenerate(self, prompt: Prompt, **overrides) -> Result:
        """Run one request (a string or chat messages) and return its Result."""
        return await self.astream(prompt, **overrides).collect()

    async def agenerate_batch(self, prompts: Sequence[Prompt], *, return_exceptions: bool = False,
                              **overrides) -> list[Union[Result, BaseException]]:
        """Run the requests at once (each server sees up to ``max_concurrency`` of their requests in flight);
        the results, in order, equal running each alone (with a fixed alpha: alpha="auto"'s threshold is
        shared and moves in the order the verdicts arrive; and up to the servers' batch rounding).

        ``return_exceptions``: a request that failed gives its exception in its place and the others go on
        (else the first failure is raised and the rest are cancelled)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of prompts (use agenerate() for one prompt)")
        if not prompts:
            raise ValueError("prompts is empty")
        requests = [self._request(p, overrides, name=f"prompts[{i}]") for i, p in enumerate(prompts)]
        streams = [AsyncStepStream(self._run(r)) for r in requests]
        if return_exceptions:
            return list(await asyncio.gather(*(s.collect() for s in streams), return_exceptions=True))
        tasks = [asyncio.ensure_future(s.collect()) for s in streams]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # let them abort their requests before we return

    def generate(self, prompt: Prompt, **overrides) -> Result:
        """:meth:`agenerate` for synchronous callers (not from inside a running event loop)."""
        return self._sync(self.agenerate(prompt, **overrides))

    def generate_batch(self, prompts: Sequence[Prompt], *, return_exceptions: bool = False,
                       **overrides) -> list[Union[Result, BaseException]]:
        """:meth:`agenerate_batch` for synchronous callers."""
        return self._sync(self.agenerate_batch(prompts, return_exceptions=return_exceptions, **overrides))

    async def server_metrics(self) -> dict[str, dict[str, float]]:
        """Each server's own Prometheus figures (``/metrics``): ``{"target": {...}, "draft": {...}}``."""
        models = [m for m in (self.target, self.draft) if m is not None]
        figures = await asyncio.gather(*(m.client.metrics() for m in models))
        return {m.name: f for m, f in zip(models, figures)}

    async def aclose(self) -> None:
        """Close this event loop's connections to the servers."""
        for m in (self.target, self.draft):
            if m is not None:
                await m.client.aclose()

    def _sync(self, coro):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError("RemoteReasoner: generate()/generate_batch() were called inside a running event loop; "
                               "await agenerate()/agenerate_batch() there instead")

        async def run():
            try:
                return await coro
            finally:
                await self.aclose()

        return asyncio.run(run())
