"""Calling a function over HTTP: one attempt, its answer or a classified failure.

The calls go through aiohttp: with dozens of calls in flight, its connection pool costs a small
fraction of httpx's (which polls every idle connection on each request; see docs/bench).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

import aiohttp
import yarl
from opentelemetry.trace import SpanKind

from jetspool import tracing
from jetspool.domain import names
from jetspool.domain.errors import PermanentDelivery, RetryableDelivery
from jetspool.domain.functions import (
    KEPT_HEADERS_BYTES,
    as_utf8,
    call_headers,
    forwardable,
    kept_headers,
    shown,
    with_query,
)
from jetspool.domain.status import ErrorType, utcnow
from jetspool.worker.policy import check_response

if TYPE_CHECKING:
    from jetspool.domain.functions import Function
    from jetspool.domain.messages import QueuedRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FunctionAnswer:
    status_code: int
    content_type: str | None
    body: bytes
    duration_s: float
    headers: list[tuple[str, str]]
    """The answer's headers its result keeps (`kept_headers`)."""


def function_client(max_connections: int, connect_timeout_s: float) -> aiohttp.ClientSession:
    """The worker's one session for calling functions (no overall timeout: each call has its function's).

    A function gets the caller's headers and jetspool's (SPEC §4), none of aiohttp's defaults: a
    body-less POST went out with `Content-Type: application/octet-stream`, and every call with
    `Accept: */*` and `Accept-Encoding: gzip, deflate`.

    aiohttp's own second try is turned off: it sent a GET, PUT or DELETE again, in the same attempt,
    when the function closed the connection without an answer, so a function got twice the calls
    `max_attempts` allows and two where `X-No-Retry` says one (found by an outside audit). Retrying
    is the worker's, counted and paced. aiohttp has only this private switch for it (its own test
    client turns it off the same way; aio-libs/aiohttp#10790); a release without it fails here."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )
    if not hasattr(session, "_retry_connection"):
        raise RuntimeError(f"aiohttp {aiohttp.__version__} has no switch for its own retries; jetspool needs 3.11+")
    session._retry_connection = False  # noqa: SLF001 - see above
    return session


async def invoke(
    client: aiohttp.ClientSession,
    function: Function,
    request: QueuedRequest,
    body: bytes,
    *,
    attempt: int,
    logs_url: str,
) -> FunctionAnswer:
    """One delivery of `request` to `function`; raises RetryableDelivery or PermanentDelivery."""
    url = function_url(function, request.path, request.query)
    started = time.monotonic()
    with tracing.tracer.start_as_current_span(
        "jetspool.invoke",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": request.method, "url.full": shown(str(url)), "jetspool.attempt": attempt},
    ) as span:
        own = [
            (names.H_CALL_ID, request.request_id),
            (names.H_REQUEST_ID, request.request_id),
            (names.H_ATTEMPT, str(attempt)),
            (names.H_LOGS_URL, logs_url),
            *tracing.inject({}).items(),
        ]
        forwarded = [(k, as_utf8(v)) for k, v in forwardable(request.headers) if k.lower() not in tracing.TRACE_HEADERS]
        headers = call_headers(forwarded, own, function.headers)
        reply = await _call(client, function, request.method, url, body=body, headers=headers)
        span.set_attribute("http.response.status_code", reply.status_code)
    check_response(reply.status_code, reply.retry_after, utcnow())
    return FunctionAnswer(
        status_code=reply.status_code,
        content_type=reply.content_type,
        body=reply.body,
        duration_s=time.monotonic() - started,
        headers=reply.headers,
    )


_LARGE_BODY = 1 << 20
"""From this size aiohttp wants a file-like body, which it sends without holding up the event loop."""


_QUERY_SAFE: Final = "".join(map(chr, range(0x21, 0x7F)))
"""Every printable ASCII character: a query keeps them as they came; other bytes are percent-encoded."""


_ORIGIN: Final = re.compile(r"(https?://[^/?#]*)(.*)", re.DOTALL)
"""A function URL's scheme and authority, and the rest (path and query)."""


def function_url(function: Function, path: str, query: str = "") -> yarl.URL:
    """Where a call to `function` at sub-path `path` goes (a request, or its cancel notice): the
    function's URL as registered, the sub-path percent-encoded again (see `Function.endpoint`), and
    `query` exactly as the caller sent it, after the URL's own.

    Only the host is normalised (IDNA). Given the rest to parse, yarl normalised it too: `%3A` in a
    query went out as `:` and `%2F` as `/`, in a caller's query or a key in the function's URL."""
    origin, rest = _ORIGIN.fullmatch(function.endpoint(path)).groups()  # type: ignore[union-attr]
    own = quote(rest, safe=_QUERY_SAFE)  # only what a request line cannot carry raw
    query = quote(query, safe=_QUERY_SAFE, encoding="latin-1")
    return yarl.URL(with_query(f"{yarl.URL(origin)}{own}", query), encoded=True)


def body_payload(body: bytes) -> bytes | io.BytesIO | None:
    if not body:
        return None
    return io.BytesIO(body) if len(body) >= _LARGE_BODY else body


@dataclass(frozen=True, slots=True)
class _Reply:
    status_code: int
    retry_after: str | None
    content_type: str | None
    body: bytes
    headers: list[tuple[str, str]]


async def _call(
    client: aiohttp.ClientSession,
    function: Function,
    method: str,
    url: yarl.URL,
    *,
    body: bytes,
    headers: list[tuple[str, str]],
) -> _Reply:
    try:
        async with (
            asyncio.timeout(function.timeout),
            client.request(method, url, data=body_payload(body), headers=headers, allow_redirects=False) as response,
        ):
            kept, left_out = kept_headers(response.raw_headers)
            if left_out:
                log.warning(
                    "function %s answered with %d headers beyond the %d bytes a result keeps; they are left out",
                    function.name,
                    left_out,
                    KEPT_HEADERS_BYTES,
                )
            return _Reply(
                response.status,
                response.headers.get(names.H_RETRY_AFTER),
                response.headers.get("content-type"),
                await response.read(),
                kept,
            )
    except aiohttp.ClientError as exc:  # before TimeoutError: a connect time-out is both, and retryable
        raise RetryableDelivery(f"cannot reach function: {exc.__class__.__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise PermanentDelivery(
            f"function did not answer within its timeout of {function.timeout:g} s", ErrorType.FUNCTION_TIMEOUT
        ) from exc
