"""One trace per request (OpenTelemetry): the gateway's span, the worker's attempt, the call to
the function (which receives `traceparent`) and the callback delivery, continuing the caller's trace."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.servers import eventually

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

    from tests.support.stack import Stack

EXPORTER = InMemorySpanExporter()
_CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
_CALLER_SPAN = "00f067aa0ba902b7"


_installed: list[TracerProvider] = []


def _install_exporter() -> None:
    """Send this process's spans to the in-memory exporter too (the gateway installed the provider)."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "jetspool installs an SDK provider"
    if provider not in _installed:
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        _installed.append(provider)


async def test_gateway_worker_function_call_and_callback_share_one_trace(stack: Stack) -> None:
    _install_exporter()
    EXPORTER.clear()
    await stack.register("echo")
    caller = {"traceparent": f"00-{_CALLER_TRACE}-{_CALLER_SPAN}-01", "X-Callback-Url": stack.callback_url("/hook")}
    request_id = await stack.submit("echo", content=b"traced", headers=caller)
    await stack.receiver.wait_for("/hook")

    def names() -> set[str]:
        return {span.name for span in EXPORTER.get_finished_spans()}

    await eventually(lambda: {"jetspool.submit", "jetspool.attempt", "jetspool.invoke", "jetspool.callback"} <= names())
    spans = {span.name: span for span in EXPORTER.get_finished_spans()}
    EXPORTER.clear()
    [seen] = stack.functions.on("/echo")
    _, trace_id, parent_id, _ = (seen.header("traceparent") or "").split("-")

    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {_CALLER_TRACE}, "one trace, the caller's"
    submit, attempt, invoke = spans["jetspool.submit"], spans["jetspool.attempt"], spans["jetspool.invoke"]
    assert _parent(submit) == _CALLER_SPAN
    assert _parent(attempt) == _id(submit)
    assert _parent(invoke) == _id(attempt)
    assert trace_id == _CALLER_TRACE, "the function received the trace"
    assert parent_id == _id(invoke), "its parent is the call's span"
    assert _parent(spans["jetspool.callback"]) != ""
    # the receiver joins the trace too, under the callback's span (found by an outside audit)
    [hook] = stack.receiver.on("/hook")
    _, hook_trace, hook_parent, _ = (hook.header("traceparent") or "").split("-")
    assert (hook_trace, hook_parent) == (_CALLER_TRACE, _id(spans["jetspool.callback"]))
    assert dict(spans["jetspool.callback"].attributes or {})["jetspool.request_id"] == request_id
    assert dict(submit.attributes or {})["jetspool.request_id"] == request_id


def _id(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


def _parent(span: ReadableSpan) -> str:
    return "" if span.parent is None else format(span.parent.span_id, "016x")


async def test_without_an_exporter_or_a_sampled_caller_spans_are_not_recorded_but_ids_still_flow(
    stack: Stack,
) -> None:
    _install_exporter()
    EXPORTER.clear()
    await stack.register("echo")
    request_id = await stack.submit("echo", content=b"untraced")
    await stack.wait_for_status("echo", request_id)
    [seen] = stack.functions.on("/echo")
    version, trace_id, parent_id, flags = (seen.header("traceparent") or "").split("-")

    assert version == "00"
    assert int(flags, 16) & 1 == 0, "a trace context whose sampled flag is off"
    assert int(trace_id, 16) != 0
    assert int(parent_id, 16) != 0
    assert EXPORTER.get_finished_spans() == (), "nothing recorded for no one"
