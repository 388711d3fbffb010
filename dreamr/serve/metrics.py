"""The server's Prometheus metrics, each defined once, in one registry per app (``GET /metrics``).

Token-level speculation is counted in vLLM's terms (``vllm:spec_decode_*``): a *proposal* is one
checked draft of tokens, its *proposed tokens* are the draft tokens, its *accepted tokens* those the
target kept; the mean accepted length is ``1 + accepted tokens / proposals`` (tokens per checking
forward, the bonus or corrected token included). Step-level figures count drafted reasoning steps the
target judged (:class:`dreamr.result.Metrics` defines each counter).
"""

from __future__ import annotations

import math
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dreamr.result import Metrics, Result

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

# Seconds: a reasoning request takes from a fraction of a second (tiny models) to minutes (CPU, long
# reasoning); the first step arrives within a few seconds.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
FIRST_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)


class ServerMetrics:
    """The metrics of one server, in their own :class:`prometheus_client.CollectorRegistry` (so that two
    apps in one process, e.g. in tests, never share or collide over counters).

    ``dreamr_step_acceptance_rate`` and ``dreamr_mean_accepted_length`` are taken over every request
    served so far (from the summed counters, :meth:`dreamr.result.Metrics.merge`), NaN until there is
    something to divide.
    """

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "dreamr_requests", "Requests finished, by mode and finish reason (stop: EOS or the answer marker; "
            "length: the token budget or the context; abort: the client left; error: the run failed).",
            ["mode", "finish_reason"], registry=r)
        self.committed_tokens = Counter(
            "dreamr_committed_tokens", "Generation tokens: tokens of the committed steps, each step counted in "
            "the tokenizer of the model that wrote it.", registry=r)
        self.verified_steps = Counter(
            "dreamr_verified_steps", "Drafted reasoning steps the target judged (CPN verification).", registry=r)
        self.accepted_steps = Counter(
            "dreamr_accepted_steps", "Drafted reasoning steps the target accepted (cpn > alpha).", registry=r)
        self.proposed_tokens = Counter(
            "dreamr_proposed_tokens", "Token-level speculation in the target's steps: draft tokens proposed "
            "(vLLM spec_decode_num_draft_tokens).", registry=r)
        self.accepted_tokens = Counter(
            "dreamr_accepted_tokens", "Token-level speculation in the target's steps: proposed tokens accepted "
            "(vLLM spec_decode_num_accepted_tokens).", registry=r)
        self.proposals = Counter(
            "dreamr_proposals", "Token-level speculation in the target's steps: proposals checked, one forward "
            "each (vLLM spec_decode_num_drafts).", registry=r)
        self.step_acceptance_rate = Gauge(
            "dreamr_step_acceptance_rate", "Accepted / verified drafted steps over all requests served.",
            registry=r)
        self.mean_accepted_length = Gauge(
            "dreamr_mean_accepted_length", "Token-level speculation: 1 + accepted tokens / proposals over all "
            "requests served (tokens per checking forward, vLLM's mean acceptance length).", registry=r)
        self.request_latency = Histogram(
            "dreamr_request_latency_seconds", "End-to-end request latency: from the request's arrival to its "
            "last step.", buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_step = Histogram(
            "dreamr_time_to_first_step_seconds", "Time to the first committed step (dreamr's time to first "
            "token: a step is the unit it streams).", buckets=FIRST_STEP_BUCKETS, registry=r)
        self.requests_running = Gauge(
            "dreamr_requests_running", "Requests in progress (running or waiting for the reasoner).", registry=r)
        self.step_acceptance_rate.set(math.nan)
        self.mean_accepted_length.set(math.nan)
        self._total = Metrics()  # counters summed over the requests served, for the two gauges

    def finished(self, mode: str, finish_reason: str, result: Optional[Result], latency_s: float) -> None:
        """Count one request that ended (``result`` None where it was aborted or failed)."""
        self.requests.labels(mode=mode, finish_reason=finish_reason).inc()
        self.request_latency.observe(latency_s)
        if result is None:
            return
        m = result.metrics
        self.committed_tokens.inc(m.committed_tokens)
        self.verified_steps.inc(m.verified_steps)
        self.accepted_steps.inc(m.accepted_steps)
        self.proposed_tokens.inc(m.target_proposed_tokens)
        self.accepted_tokens.inc(m.target_accepted_tokens)
        self.proposals.inc(m.target_proposals)
        self._total = Metrics.merge([self._total, m])  # the rates from the summed counters, as Metrics defines
        for gauge, value in ((self.step_acceptance_rate, self._total.step_acceptance_rate),
                             (self.mean_accepted_length, self._total.mean_accepted_length)):
            if value is not None:
                gauge.set(value)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
