"""A request's timeline, turned into metrics, spans and an access-log line when it ends.

The hot path only takes timestamps (`mark`) and adds to plain counters; the request span
and its children (auth, routing, quota, time to first token, completion) are written once
the request is over, with those times. The request's span context is decided when it
starts (the child of the caller's W3C `traceparent`, sampled or not), so engines that
forward requests (`serve.remote_engine`) can pass the trace on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from gateway.errors import QuotaExceeded, QuotaUnavailable, status_of
from gateway.governance.gate import Outcome
from gateway.governance.records import KeyRecord
from gateway.metrics import GatewayMetrics
from gateway.tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

PHASES = ("auth", "routing", "quota", "time_to_first_token", "completion")


def slo_met(ttft_s: float | None, tpot_s: float | None, e2e_s: float, completion_tokens: int,
            ttft_target_s: float, tpot_target_s: float) -> bool:
    """Whether a successful request met its targets (pure).

    A stream meets them when its first token came within `ttft_target_s` and its mean gap
    between tokens within `tpot_target_s`. A full response, whose first token the client
    never sees, meets them when it ended within the time a stream meeting both would take.
    """
    if ttft_s is not None:
        return ttft_s <= ttft_target_s and (tpot_s is None or tpot_s <= tpot_target_s)
    return e2e_s <= ttft_target_s + tpot_target_s * max(completion_tokens - 1, 0)


class Observer:
    """Builds a `Watch` per request; holds what every request reports to."""

    def __init__(self, metrics: GatewayMetrics | None, tracing: Tracing, access_log: logging.Logger | None,
                 slo_ttft_s: float, slo_tpot_s: float, metric_key_ids: frozenset[str] = frozenset()) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.access_log = access_log
        self.slo_ttft_s = slo_ttft_s
        self.slo_tpot_s = slo_tpot_s
        self.metric_key_ids = metric_key_ids  # keys with SLO series of their own; the rest are "other"

    def start(self, scope: MutableMapping[str, Any], headers: Any, request_id: str) -> Watch:
        return Watch(self, scope, headers, request_id)


class Watch:
    """One request: timestamps as it goes, every report at `end`."""

    __slots__ = ("obs", "t0", "t0_ns", "marks", "span", "parent", "model", "caller", "stream", "fallbacks", "first_ns",
                 "in_flight", "request_id", "client_request_id", "path", "ended", "target", "endpoint")

    def __init__(self, obs: Observer, scope: MutableMapping[str, Any], headers: Any, request_id: str) -> None:
        self.obs = obs
        self.t0 = time.perf_counter()
        self.t0_ns = time.time_ns()
        self.marks: dict[str, int] = {}
        self.model = ""
        self.caller: KeyRecord | None = None
        self.stream = False
        self.fallbacks = 0
        self.target = ""
        self.first_ns: int | None = None
        self.in_flight = False
        self.request_id = request_id
        self.client_request_id: str | None = None  # the caller's own id, sanitized (a correlation field)
        self.path = scope["path"]
        self.endpoint = ""  # the generation endpoint (a metric label: one of serve.engine.Endpoint)
        self.ended = False
        self.span: SpanContext | None = None  # this request's span (sampled or not); None: tracing off
        self.parent: SpanContext | None = None
        if obs.tracing.enabled:
            self.span, self.parent = obs.tracing.start(headers, scope["path"])

    def mark(self, phase: str) -> None:
        """`phase` ended now."""
        self.marks[phase] = time.time_ns()

    def admitted(self, stream: bool, unchecked: bool = False) -> None:
        """Past every check (`unchecked`: the quota store was down and the policy let it through)."""
        self.stream = stream
        self.in_flight = True
        m = self.obs.metrics
        if m is not None:
            m.in_flight_add(self.model, 1)
            if unchecked:
                m.count(m.quota_unchecked, ())

    def first_output(self, target: str, fallbacks: int) -> None:
        """The engine `target` answered (a stream's first event, or a whole response)."""
        self.first_ns = time.time_ns()
        self.target = target
        self.fallbacks = fallbacks

    def fail(self, exc: BaseException) -> None:
        """The request was refused with `exc` before admission."""
        status = status_of(exc) if isinstance(exc, Exception) else 499
        m = self.obs.metrics
        if m is not None and isinstance(exc, QuotaExceeded | QuotaUnavailable):
            m.count(m.quota_rejections, (getattr(exc, "kind", "unavailable"),))
        self.end(Outcome(status=status, model=self.model or None), error=exc)

    def end(self, outcome: Outcome, error: BaseException | None = None) -> None:
        """Report the request once, however it ended."""
        if self.ended:
            return
        self.ended = True
        end_ns = time.time_ns()
        e2e = time.perf_counter() - self.t0
        ttft = tpot = None
        if self.stream and self.first_ns is not None and outcome.status == 200:
            ttft = (self.first_ns - self.t0_ns) / 1e9
            if outcome.completion_tokens > 1:
                tpot = (end_ns - self.first_ns) / 1e9 / (outcome.completion_tokens - 1)
        m = self.obs.metrics
        if m is not None:
            self._metrics(m, outcome, e2e, ttft, tpot)
        if self.span is not None and self.span.trace_flags.sampled:
            self._spans(outcome, end_ns, error)
        if self.obs.access_log is not None:
            self.obs.access_log.info(
                "request", extra={"request_id": self.request_id, "client_request_id": self.client_request_id,
                                  "path": self.path, "status": outcome.status, "model": self.model or outcome.model,
                                  "version": outcome.version,
                                  "key_id": self.caller.id if self.caller else None,
                                  "prompt_tokens": outcome.prompt_tokens,
                                  "completion_tokens": outcome.completion_tokens,
                                  "duration_ms": round(e2e * 1000, 2),
                                  "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None},
            )

    def _metrics(self, m: GatewayMetrics, outcome: Outcome, e2e: float, ttft: float | None,
                 tpot: float | None) -> None:
        model = self.model
        tier = self.caller.tier if self.caller else ""
        m.count(m.requests, (model, outcome.version or "", tier, str(outcome.status), self.endpoint))
        if not self.in_flight:
            return  # refused before admission (auth, validation, quota): counted, not timed
        m.in_flight_add(model, -1)
        m.observe(m.duration, model, e2e)
        if outcome.prompt_tokens:
            m.count(m.prompt_tokens, (model,), outcome.prompt_tokens)
        if outcome.completion_tokens:
            m.count(m.completion_tokens, (model,), outcome.completion_tokens)
        if ttft is not None:
            m.observe(m.ttft, model, ttft)
        if tpot is not None:
            m.observe(m.itl, model, tpot)
        if self.fallbacks:
            m.count(m.fallbacks, (model, self.target))
        if outcome.status == 200 and self.caller is not None:
            met = slo_met(ttft, tpot, e2e, outcome.completion_tokens, self.obs.slo_ttft_s, self.obs.slo_tpot_s)
            key = self.caller.id if self.caller.id in self.obs.metric_key_ids else "other"
            m.count(m.slo, (key, "met" if met else "missed"))

    def _spans(self, outcome: Outcome, end_ns: int, error: BaseException | None) -> None:
        """The request span and its phases, as finished SDK spans, to the exporters."""
        import random

        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

        tr = self.obs.tracing
        root = self.span
        assert root is not None
        spans = []
        start = self.t0_ns
        ends = dict(self.marks)
        if self.first_ns is not None:
            ends["time_to_first_token"] = self.first_ns
            ends["completion"] = end_ns
        for phase in PHASES:
            stop = ends.get(phase)
            if stop is None:
                continue
            ctx = SpanContext(root.trace_id, random.getrandbits(64), False, root.trace_flags)
            spans.append(ReadableSpan(name=phase, context=ctx, parent=root, resource=tr.resource,
                                      kind=SpanKind.INTERNAL, start_time=start, end_time=stop,
                                      instrumentation_scope=tr.scope))
            start = stop
        attrs: dict[str, Any] = {"http.request.method": "POST", "url.path": self.path,
                                 "raygate.request_id": self.request_id, "http.response.status_code": outcome.status}
        if self.model:
            attrs["gen_ai.request.model"] = self.model
        if outcome.version:
            attrs["gen_ai.response.model"] = outcome.version
        if outcome.prompt_tokens or outcome.completion_tokens:
            attrs["gen_ai.usage.input_tokens"] = outcome.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = outcome.completion_tokens
        if self.caller is not None:
            attrs["raygate.key_id"] = self.caller.id
        if self.fallbacks:
            attrs["raygate.fallbacks"] = self.fallbacks
        status = Status(StatusCode.UNSET)
        if outcome.status >= 500:
            status = Status(StatusCode.ERROR, type(error).__name__ if error else str(outcome.status))
        spans.append(ReadableSpan(name=f"POST {self.path}", context=root, parent=self.parent, resource=tr.resource,
                                  attributes=attrs, kind=SpanKind.SERVER, status=status, start_time=self.t0_ns,
                                  end_time=end_ns, instrumentation_scope=tr.scope))
        tr.emit(spans)
