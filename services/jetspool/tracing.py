"""OpenTelemetry tracing: one trace per request, from the gateway through the queue to the
function and the callback.

- The gateway's span (`jetspool.submit`) continues the caller's `traceparent` if it sent one.
- The W3C trace context travels in the NATS headers of the queue message and of each callback
  job; the worker's span per attempt (`jetspool.attempt`) and the callback delivery's span
  (`jetspool.callback`) continue it, and the call to the function (`jetspool.invoke`) sends
  `traceparent` on to it.
- Export is configured by the standard variables: with `OTEL_TRACES_EXPORTER=otlp` or an
  `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, spans go to an OTLP/HTTP collector (`OTEL_SERVICE_NAME`,
  `OTEL_RESOURCE_ATTRIBUTES` and the other `OTEL_*` settings apply). Without them, spans are not
  recorded unless the caller's `traceparent` asks for sampling (`OTEL_TRACES_SAMPLER` overrides):
  they still carry trace ids, so log lines and functions get them, at a fraction of the cost of
  recording spans no one exports (about a tenth of the gateway's CPU per submit, measured).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

if TYPE_CHECKING:
    from collections.abc import Iterable

    from opentelemetry.context import Context

TRACE_HEADERS: Final = frozenset({"traceparent", "tracestate"})
tracer = trace.get_tracer("jetspool")


def setup(service: str) -> None:
    """Install the tracer provider of this process, once: trace ids always (for logs and for the
    functions' `traceparent`), exported over OTLP when the environment asks for it."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporting = wanted == "otlp" or bool(endpoint and wanted != "none")
    sampler = None if exporting or "OTEL_TRACES_SAMPLER" in os.environ else ParentBased(root=ALWAYS_OFF)
    provider = TracerProvider(resource=resource, sampler=sampler)
    if exporting:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the current trace context added (W3C `traceparent`, `tracestate`)."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Context:
    """The trace context carried by `headers` (NATS message or HTTP headers)."""
    if headers is None:
        return propagate.extract({})
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return propagate.extract({k.lower(): v for k, v in pairs if k.lower() in TRACE_HEADERS})
