"""`ANY /function/{name}[/{path}]`: the synchronous proxy, and its `?async=true` form (Cerebrium)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any, Final, TypeVar

import httpx
import orjson
from litestar import Request, route
from litestar.enums import HttpMethod
from litestar.params import FromPath
from litestar.response.base import ASGIResponse

from jetspool.aio import stop_task
from jetspool.domain import names
from jetspool.domain.errors import RequestError
from jetspool.domain.functions import (
    NOT_FORWARDED,
    NOT_HANDED_ON,
    call_headers,
    forwardable,
    function_url,
    read_off_wire,
    to_wire,
)
from jetspool.domain.status import request_urls
from jetspool.gateway.intake import (
    as_sent,
    control_values,
    flag,
    function_for,
    raw_query_and_headers,
    read_submission,
    sub_path,
)
from jetspool.gateway.state import Gateway, GatewayDep

if TYPE_CHECKING:
    from collections.abc import Coroutine

_T = TypeVar("_T")

_METHODS: Final = [
    HttpMethod.GET,
    HttpMethod.POST,
    HttpMethod.PUT,
    HttpMethod.PATCH,
    HttpMethod.DELETE,
    HttpMethod.OPTIONS,
    HttpMethod.HEAD,
]
_OWN: Final = frozenset(
    h.lower() for h in (names.H_CALL_ID, names.H_REQUEST_ID, names.H_START_TIME, names.H_DURATION_SECONDS)
)
"""Headers of a synchronous call that the gateway sets itself, both ways (`_call_headers`)."""
_NOT_FORWARDED: Final = NOT_FORWARDED | _OWN | {names.H_ATTEMPT.lower(), names.H_LOGS_URL.lower()}
"""Nor a caller's `X-Attempt` and `X-Logs-Url`: a function reads them as jetspool's (SPEC §4), and a
synchronous call has neither."""
_NOT_RELAYED: Final = (NOT_HANDED_ON - {"content-encoding"}) | _OWN
"""A synchronous answer goes with its coding: its body is relayed as it came (`_exchange`)."""
_ASYNC: Final = frozenset({"async"})
"""The sync route's own query parameter (`?async=true` queues the call), not forwarded."""


def _call_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """What the gateway adds to a synchronous call, both ways, as OpenFaaS's gateway does: the call's
    id (the caller's `X-Call-Id` when it is a UUID, so a function calling another through the gateway
    keeps one id; else a new one), also as `X-Request-Id`, and `X-Start-Time` (Unix nanoseconds)."""
    given = next((value for key, value in headers if key.lower() == "x-call-id"), "")
    try:
        call_id = str(uuid.UUID(given))
    except ValueError:
        call_id = str(uuid.uuid4())
    return {names.H_CALL_ID: call_id, names.H_REQUEST_ID: call_id, names.H_START_TIME: str(time.time_ns())}


class BadGateway(RequestError):
    status_code = 502


class GatewayTimeout(RequestError):
    status_code = 504
    error_type = "function_timeout"


@route("/function/{name:str}", http_method=_METHODS, status_code=200)
async def call_function(request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str]) -> ASGIResponse:
    """Call `name` now and answer with its response; `?async=true` queues it instead (202)."""
    return await _call(request, gateway, name, "")


@route("/function/{name:str}/{path:path}", http_method=_METHODS, status_code=200)
async def call_function_path(
    request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str], path: FromPath[str]
) -> ASGIResponse:
    """Call `name` at sub-path `path`."""
    return await _call(request, gateway, name, path)


async def _call(request: Request[Any, Any, Any], gateway: Gateway, name: str, path: str) -> ASGIResponse:
    function = function_for(gateway.view, name)
    # A typo (`?async=ture`) is refused, not taken for a synchronous call that may run for minutes.
    query, headers = raw_query_and_headers(request)
    if flag("async", control_values(query, _ASYNC).get("async")):
        submission = await read_submission(request, function, path, also_control=_ASYNC)
        record = await gateway.intake.submit(submission)
        urls = request_urls(gateway.base_url, record.function, record.request_id)
        body = {"request_id": record.request_id, "run_id": record.request_id, **urls}
        answer_headers = {names.H_REQUEST_ID: record.request_id}
        return ASGIResponse(
            body=orjson.dumps(body), status_code=202, media_type="application/json", headers=answer_headers
        )
    url = function_url(function, sub_path(as_sent(request, path)), query)
    call = _call_headers(headers)
    started = time.monotonic()
    outgoing = gateway.http.build_request(
        request.method,
        str(url),
        content=await request.body(),
        headers=to_wire(call_headers(forwardable(headers, _NOT_FORWARDED), list(call.items()), function.headers)),
        # The request line as the worker sends it: httpx percent-encoded `"` in a query (found by a review).
        extensions={"target": url.raw_path_qs.encode("ascii")},
    )
    try:
        async with asyncio.timeout(function.timeout):  # the whole call: httpx's bounds each read alone
            answer, content = await _until_gone(request, _exchange(gateway.http, outgoing), call, name)
    except TimeoutError as exc:  # the call's headers too: its X-Call-Id is what the logs know it by
        raise GatewayTimeout(f"function {name!r} did not answer within {function.timeout:g} s", call) from exc
    except httpx.TransportError as exc:  # a connect time-out too: a function out of reach
        raise BadGateway(f"cannot reach function {name!r}: {exc.__class__.__name__}", call) from exc
    if not 200 <= answer.status_code <= 599:  # noqa: PLR2004 - relayed, a 600 dropped the caller's connection
        raise BadGateway(
            f"function {name!r} answered with status {answer.status_code}, which no answer can carry", call
        )
    # A list, not a dict: a header the function repeats (`Set-Cookie`) is relayed as often, where only
    # its last copy was (found by a review).
    # Read off the wire, not as httpx decodes them (UTF-8 when it can), which the server could not encode again.
    relayed = forwardable(read_off_wire(answer.headers.raw), _NOT_RELAYED)
    relayed += [*call.items(), (names.H_DURATION_SECONDS, f"{time.monotonic() - started:.6f}")]
    if request.method == HttpMethod.HEAD and "content-length" in answer.headers:
        relayed.append(("content-length", answer.headers["content-length"]))  # a GET's body's; none is sent
    content_type = answer.headers.get("content-type", "application/octet-stream")
    return ASGIResponse(body=content, status_code=answer.status_code, media_type=content_type, headers=relayed)


async def _exchange(http: httpx.AsyncClient, outgoing: httpx.Request) -> tuple[httpx.Response, bytes]:
    """Send `outgoing`; its answer and body as they came, in their coding: decoded by httpx, a body in
    a coding it does not decode (`br`, `compress`) went out still coded without saying so, and one
    that did not decode was a bare 500 (found by a review). The `Content-Encoding` is relayed."""
    answer = await http.send(outgoing, stream=True)
    try:
        return answer, b"".join([chunk async for chunk in answer.aiter_raw()])
    finally:
        await answer.aclose()


async def _until_gone(
    request: Request[Any, Any, Any], work: Coroutine[Any, Any, _T], call: dict[str, str], name: str
) -> _T:
    """`work`, ended when the caller hangs up, as OpenFaaS's gateway ends the call with the caller's
    request context: a call its caller gave up on ran on, holding a connection, until the function
    answered or its timeout passed (found by a review)."""
    doing = asyncio.ensure_future(work)

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watching = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({doing, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (doing, watching):
            if not task.done():
                await stop_task(task)
    if not doing.done() or doing.cancelled():
        raise BadGateway(f"the caller of {name!r} hung up", call)
    return doing.result()
