"""`ANY /function/{name}[/{path}]`: the synchronous proxy, and its `?async=true` form (Cerebrium)."""

from __future__ import annotations

from typing import Any, Final

import httpx
from litestar import Request, Response, route
from litestar.enums import HttpMethod
from litestar.params import FromPath

from jetspool.domain import names
from jetspool.domain.errors import RequestError
from jetspool.domain.functions import HOP_BY_HOP, forwardable, with_query
from jetspool.domain.status import request_urls
from jetspool.gateway.intake import function_for, is_yes, raw_query_and_headers, read_submission
from jetspool.gateway.state import Gateway, GatewayDep

_METHODS: Final = [
    HttpMethod.GET,
    HttpMethod.POST,
    HttpMethod.PUT,
    HttpMethod.PATCH,
    HttpMethod.DELETE,
    HttpMethod.OPTIONS,
    HttpMethod.HEAD,
]
_NOT_RELAYED: Final = HOP_BY_HOP | {"content-encoding", "server", "date"}
"""httpx hands over the decoded body; the gateway's server sets its own Server and Date."""


class BadGateway(RequestError):
    status_code = 502


class GatewayTimeout(RequestError):
    status_code = 504
    error_type = "function_timeout"


@route("/function/{name:str}", http_method=_METHODS, status_code=200)
async def call_function(request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str]) -> Response[Any]:
    """Call `name` now and answer with its response; `?async=true` queues it instead (202)."""
    return await _call(request, gateway, name, "")


@route("/function/{name:str}/{path:path}", http_method=_METHODS, status_code=200)
async def call_function_path(
    request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str], path: FromPath[str]
) -> Response[Any]:
    """Call `name` at sub-path `path`."""
    return await _call(request, gateway, name, path)


async def _call(request: Request[Any, Any, Any], gateway: Gateway, name: str, path: str) -> Response[Any]:
    function = function_for(gateway.view, name)
    if is_yes(request.query_params.get("async")):
        submission = await read_submission(request, function, path, also_control=frozenset({"async"}))
        record = await gateway.intake.submit(submission)
        urls = request_urls(gateway.base_url, record.function, record.request_id)
        body = {"request_id": record.request_id, "run_id": record.request_id, **urls}
        return Response(body, status_code=202, headers={names.H_REQUEST_ID: record.request_id})
    url = function.endpoint(path.lstrip("/"))
    query, headers = raw_query_and_headers(request)
    try:
        answer = await gateway.http.request(
            request.method,
            with_query(url, query),
            content=await request.body(),
            headers=[*forwardable(headers), *function.headers.items()],
            timeout=function.timeout,
        )
    except httpx.TimeoutException as exc:
        raise GatewayTimeout(f"function {name!r} did not answer within {function.timeout:g} s") from exc
    except httpx.TransportError as exc:
        raise BadGateway(f"cannot reach function {name!r}: {exc.__class__.__name__}") from exc
    relayed = dict(forwardable(list(answer.headers.items()), _NOT_RELAYED))
    if request.method == HttpMethod.HEAD and "content-length" in answer.headers:
        relayed["content-length"] = answer.headers["content-length"]  # what a GET's body would be; none is sent
    content_type = answer.headers.get("content-type", "application/octet-stream")
    return Response(answer.content, status_code=answer.status_code, media_type=content_type, headers=relayed)
