"""Calling a function over HTTP: one attempt, its answer or a classified failure.

The calls go through aiohttp: with dozens of calls in flight, its connection pool costs a small
fraction of httpx's (which polls every idle connection on each request; see docs/bench).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError
from opentelemetry.trace import SpanKind

from jetspool import tracing
from jetspool.domain import names
from jetspool.domain.errors import PermanentDelivery, RetryableDelivery
from jetspool.domain.functions import (
    KEPT_HEADERS_BYTES,
    as_utf8,
    call_headers,
    forwardable,
    function_url,
    kept_headers,
    outbound_tls,
    shown,
)
from jetspool.domain.status import ErrorType, utcnow
from jetspool.worker.policy import check_response

if TYPE_CHECKING:
    from collections.abc import Iterable

    import yarl

    from jetspool.domain.functions import Function
    from jetspool.domain.messages import QueuedRequest

log = logging.getLogger(__name__)


_MAX_HEADER_LINE: Final = 64 * 1024
_MAX_HEADERS: Final = 4096
_DECODED_CODINGS: Final = frozenset({"gzip", "deflate", "br", "zstd"})
"""The content codings aiohttp decodes (a `Content-Encoding` of exactly one of them, in any case);
it hands on a body in any other as it came. `br` and `zstd` need packages not installed here: an
answer in them cannot be read (see `_BAD_ANSWER`)."""
_BAD_ANSWER: Final = 502
"""What an answer that cannot stand as sent is taken for, as a gateway takes it (RFC 9110 §15): one
whose status no final answer can carry (1xx, or outside 100-599), or one that cannot be read."""


@dataclass(frozen=True, slots=True)
class FunctionAnswer:
    status_code: int
    content_type: str | None
    body: bytes
    duration_s: float
    headers: list[tuple[str, str]]
    """The answer's headers its result keeps (`kept_headers`)."""
    invalid: str | None = None
    """Why the answer could not stand as the function sent it (taken for a 502, `_BAD_ANSWER`)."""


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
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=60, ssl=outbound_tls()),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        # aiohttp's defaults (128 fields, 8,190 bytes a line) refused a 200 with more or longer headers,
        # taken for a function out of reach and called again at every attempt (found by a review);
        # `kept_headers` bounds what a result keeps.
        max_field_size=_MAX_HEADER_LINE,
        max_line_size=_MAX_HEADER_LINE,
        max_headers=_MAX_HEADERS,
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
    invalid = reply.invalid
    if invalid is None and not 200 <= reply.status_code <= 599:  # noqa: PLR2004
        # Relayed as it came, a 101 switched the result route's client away from HTTP, and a 600
        # broke its answer (found by a review).
        invalid = f"answered with status {reply.status_code}, which no answer can carry"
    if invalid is not None:
        log.warning("function %s %s; taken for a %d", function.name, invalid, _BAD_ANSWER)
        return FunctionAnswer(_BAD_ANSWER, reply.content_type, reply.body, time.monotonic() - started, [], invalid)
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
    invalid: str | None = None


def _unreadable(exc: aiohttp.ClientError) -> str | None:
    """Why an answer that came cannot be read, when `exc` says so: a malformed head, or a body in a
    coding that cannot be decoded (`br` without Brotli; gzip that is not gzip). None for the rest,
    a body cut short with the connection included: that is a call to make again (SPEC §4)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.message
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ContentEncodingError) and cause.message.startswith(_UNDECODABLE):
            return cause.message
        cause = cause.__cause__
    return None


_UNDECODABLE: Final = "Can not decode"
"""How aiohttp's `ContentEncodingError` begins for a body its decoder refused (not one cut short)."""


def _header(raw: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (lower case) read off the wire, as the answer's other headers
    are (`read_off_wire`), so that it goes out as the same bytes. The content type decoded by aiohttp
    as UTF-8 failed the completion write on a byte that is not UTF-8, and the function was called
    again at every attempt (found by a review)."""
    return next((value.decode("latin-1") for key, value in raw if key.lower() == name), None)


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
            coding = _header(response.raw_headers, b"content-encoding")
            if coding and not (coding.isascii() and coding.lower() in _DECODED_CODINGS):
                # aiohttp handed the body on as it came: it stays in its coding, and says so (dropped
                # with the codings aiohttp decodes, it came back as bytes no one could read; a review)
                kept.append(("Content-Encoding", coding))
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
                _header(response.raw_headers, b"content-type"),
                await response.read(),
                kept,
            )
    except aiohttp.ClientError as exc:  # before TimeoutError: a connect time-out is both, and retryable
        unreadable = _unreadable(exc)
        if unreadable is not None:
            # An answer came, but cannot be read: not a function out of reach, to be called again at
            # every attempt (found by reviews).
            return _Reply(_BAD_ANSWER, None, None, b"", [], f"answered in a form that cannot be read ({unreadable})")
        raise RetryableDelivery(f"cannot reach function: {exc.__class__.__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise PermanentDelivery(
            f"function did not answer within its timeout of {function.timeout:g} s", ErrorType.FUNCTION_TIMEOUT
        ) from exc
