"""Calling a function over HTTP: one attempt, its answer or a classified failure."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import httpx

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
    headers = [
        *forwardable(request.headers),
        (names.H_CALL_ID, request.request_id),
        (names.H_REQUEST_ID, request.request_id),
        (names.H_ATTEMPT, str(attempt)),
        (names.H_LOGS_URL, logs_url),
        *function.headers.items(),
    ]
    url = function.endpoint(request.path)
    if request.query:
        url = f"{url}?{request.query}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(function.timeout):
            response = await client.request(request.method, url, content=body, headers=headers)
    except TimeoutError as exc:
        raise PermanentDelivery(
            f"function did not answer within its timeout of {function.timeout:g} s", ErrorType.FUNCTION_TIMEOUT
        ) from exc
    except httpx.TransportError as exc:
        raise RetryableDelivery(f"cannot reach function: {exc.__class__.__name__}: {exc}") from exc
    check_response(response.status_code, response.headers.get(names.H_RETRY_AFTER), utcnow())
    return FunctionAnswer(
        status_code=response.status_code,
        content_type=response.headers.get("content-type"),
        body=response.content,
        duration_s=time.monotonic() - started,
    )
