"""Calling a function over HTTP: one attempt, its answer or a classified failure."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import httpx
from opentelemetry.trace import SpanKind

from jetspool import tracing
from jetspool.domain import names
from jetspool.domain.errors import PermanentDelivery, RetryableDelivery
from jetspool.domain.status import ErrorType, utcnow
from jetspool.worker.policy import check_response

if TYPE_CHECKING:
    from jetspool.domain.functions import Function
    from jetspool.domain.messages import QueuedRequest

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
    }
)
"""Headers never forwarded to a function: hop-by-hop ones, framing, and the caller's credentials."""


def forwardable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The caller's headers that travel to the function."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


@dataclass(frozen=True, slots=True)
class FunctionAnswer:
    status_code: int
    content_type: str | None
    body: bytes
    duration_s: float


async def invoke(
    client: httpx.AsyncClient, function: Function, request: QueuedRequest, body: bytes, *, attempt: int, logs_url: str
) -> FunctionAnswer:
    """One delivery of `request` to `function`; raises RetryableDelivery or PermanentDelivery."""
    url = function.endpoint(request.path)
    if request.query:
        url = f"{url}?{request.query}"
    started = time.monotonic()
    with tracing.tracer.start_as_current_span(
        "jetspool.invoke",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": request.method, "url.full": url, "jetspool.attempt": attempt},
    ) as span:
        headers = [
            *((k, v) for k, v in forwardable(request.headers) if k.lower() not in tracing.TRACE_HEADERS),
            (names.H_CALL_ID, request.request_id),
            (names.H_REQUEST_ID, request.request_id),
            (names.H_ATTEMPT, str(attempt)),
            (names.H_LOGS_URL, logs_url),
            *function.headers.items(),
            *tracing.inject({}).items(),
        ]
        response = await _call(client, function, request.method, url, body=body, headers=headers)
        span.set_attribute("http.response.status_code", response.status_code)
    check_response(response.status_code, response.headers.get(names.H_RETRY_AFTER), utcnow())
    return FunctionAnswer(
        status_code=response.status_code,
        content_type=response.headers.get("content-type"),
        body=response.content,
        duration_s=time.monotonic() - started,
    )


async def _call(
    client: httpx.AsyncClient,
    function: Function,
    method: str,
    url: str,
    *,
    body: bytes,
    headers: list[tuple[str, str]],
) -> httpx.Response:
    try:
        async with asyncio.timeout(function.timeout):
            return await client.request(method, url, content=body, headers=headers)
    except TimeoutError as exc:
        raise PermanentDelivery(
            f"function did not answer within its timeout of {function.timeout:g} s", ErrorType.FUNCTION_TIMEOUT
        ) from exc
    except httpx.TransportError as exc:
        raise RetryableDelivery(f"cannot reach function: {exc.__class__.__name__}: {exc}") from exc
