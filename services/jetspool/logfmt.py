"""Log lines that name their request and trace: plain text, or one JSON object per line.

`request_id` is set (a context variable) wherever a request is being handled: submit in the
gateway, an attempt in the worker, a callback delivery. The trace id comes from the current
OpenTelemetry span. Both are added to every record by a filter on the root handler.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Literal

import orjson
from opentelemetry import trace

if TYPE_CHECKING:
    from collections.abc import Iterator

LogFormat = Literal["text", "json"]
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("jetspool_request_id", default=None)
_TEXT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"


@contextlib.contextmanager
def about(request: str) -> Iterator[None]:
    """Log lines of the block name `request`, in a task that handles many (a NATS subscription's):
    a cancel's and a start deadline's lines named none (found by an outside audit)."""
    token = request_id.set(request)
    try:
        yield
    finally:
        request_id.reset(token)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request = request_id.get()
        span = trace.get_current_span().get_span_context()
        trace_id = format(span.trace_id, "032x") if span.is_valid else None
        parts = [f"request={request}"] if request else []
        parts += [f"trace={trace_id}"] if trace_id else []
        record.__dict__.update(request_id=request, trace_id=trace_id, context=f" [{' '.join(parts)}]" if parts else "")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, None)
            if value:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(level: str, fmt: LogFormat) -> None:
    """Log to stderr at `level`, as text or JSON lines, each with its request and trace ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _SslEofNoise) for f in asyncio_log.filters):
        asyncio_log.addFilter(_SslEofNoise())


class _SslEofNoise(logging.Filter):
    """asyncio's warning that nats-py's protocol answers an end of file over TLS as over TCP: a
    worker on a TLS NATS logged it at every stop (found by an audit); it says nothing to an operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()
