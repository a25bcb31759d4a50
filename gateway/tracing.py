"""OpenTelemetry traces of the gateway: off unless asked for.

`Tracing.create(mode)` reads the standard `OTEL_*` variables: `OTEL_TRACES_EXPORTER`
(`otlp`, `console`, both comma-separated, or `none`), `OTEL_EXPORTER_OTLP_*` (endpoint,
headers, protocol `http/protobuf` or `grpc`), `OTEL_TRACES_SAMPLER(_ARG)`,
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_PROPAGATORS` and `OTEL_BSP_*`.
Nothing is exported unless `OTEL_TRACES_EXPORTER` (or the gateway's `tracing` setting)
names an exporter.

A request's spans are written once it is over, from the times it noted on the way
(`gateway.observe`): the request path pays for a sampling decision and a few
timestamps, not for live SDK spans. The spans are the SDK's own `ReadableSpan`s, handed
to its batch processor and exporters, so any OTLP collector reads them as usual.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context

SCOPE_NAME = "raygate.gateway"
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)


_TRACE_ID_MASK = (1 << 64) - 1  # TraceIdRatioBased decides on the trace id's lower 64 bits


def root_bound(sampler: Any) -> int | None:
    """For samplers that decide a new trace by its id alone, the bound below which it is sampled; else None."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

    root = getattr(sampler, "_root", None) if isinstance(sampler, ParentBased) else sampler
    if isinstance(root, TraceIdRatioBased):
        return root.bound
    if root is ALWAYS_ON:
        return _TRACE_ID_MASK + 1
    if root is ALWAYS_OFF:
        return 0
    return None


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"unknown trace exporter {name!r} (OTEL_TRACES_EXPORTER takes otlp, console or none)")


class Tracing:
    """Sampler, resource and span processors of the app (no processors: tracing is off)."""

    def __init__(self, processors: Sequence[Any] = ()) -> None:
        from opentelemetry.propagate import get_global_textmap

        self.processors = list(processors)
        self.enabled = bool(self.processors)
        self.propagator: TextMapPropagator = get_global_textmap()  # OTEL_PROPAGATORS (default W3C tracecontext)
        self.sampler: Any = None
        self._root_bound: int | None = None
        self.resource: Any = None
        self.scope: Any = None
        if self.enabled:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace.sampling import _get_from_env_or_default
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope

            self.sampler = _get_from_env_or_default()  # OTEL_TRACES_SAMPLER, default parentbased_always_on
            self._root_bound = root_bound(self.sampler)
            service = os.environ.get("OTEL_SERVICE_NAME") or "raygate-gateway"
            self.resource = Resource.create({"service.name": service})
            self.scope = InstrumentationScope(SCOPE_NAME)

    @classmethod
    def create(cls, mode: str | None = None) -> Tracing:
        """`mode`: exporters by name, or None to take `OTEL_TRACES_EXPORTER` (unset: off)."""
        names = [n.strip() for n in (mode or os.environ.get("OTEL_TRACES_EXPORTER") or "none").split(",")]
        names = [n for n in names if n and n not in ("none", "off")]
        if not names:
            return cls()
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        return cls([BatchSpanProcessor(_exporter(name)) for name in names])

    @classmethod
    def with_exporter(cls, exporter: Any) -> Tracing:
        """Spans handed to `exporter` as each request ends (tests: InMemorySpanExporter)."""
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        return cls([SimpleSpanProcessor(exporter)])

    def start(self, headers: Any, name: str) -> tuple[SpanContext, SpanContext | None]:
        """The context of a new request span (child of the caller's `traceparent`, sampled or not) and its parent."""
        parent: SpanContext | None = None
        ctx = None
        if "traceparent" in headers:
            from opentelemetry.trace import get_current_span

            ctx = self.propagator.extract(headers)
            parent = get_current_span(ctx).get_span_context()
            if not parent.is_valid:
                parent, ctx = None, None
        trace_id = parent.trace_id if parent is not None else random.getrandbits(128)
        if parent is None and self._root_bound is not None:
            # A new trace under a trace-id ratio (or always on/off) sampler: the SDK's own rule, without
            # building its SamplingResult for every request.
            sampled = trace_id & _TRACE_ID_MASK < self._root_bound
        else:
            sampled = self.sampler.should_sample(ctx, trace_id, name, SpanKind.SERVER).decision.is_sampled()
        return SpanContext(trace_id, random.getrandbits(64), False, SAMPLED if sampled else UNSAMPLED), parent

    def emit(self, spans: list[Any]) -> None:
        for processor in self.processors:
            for span in spans:
                processor.on_end(span)

    def shutdown(self) -> None:
        """Export what is buffered."""
        for processor in self.processors:
            processor.shutdown()


def attach_trace(ctx: SpanContext | None) -> object | None:
    """Make `ctx` the current span (engines that forward requests inject its `traceparent`); None: nothing to do."""
    if ctx is None:
        return None
    return otel_context.attach(set_span_in_context(NonRecordingSpan(ctx)))


def detach_trace(token: object | None) -> None:
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]
