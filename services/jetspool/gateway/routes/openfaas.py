"""The OpenFaaS dialect: `POST /async-function/{name}[/{path}]`."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.params import FromPath
from litestar.response.base import ASGIResponse

from jetspool.domain import names
from jetspool.gateway.intake import function_for, read_submission
from jetspool.gateway.state import Gateway, GatewayDep


@post("/async-function/{name:str}", status_code=202)
async def async_function(request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str]) -> ASGIResponse:
    """Queue a request for `name`; 202 with `X-Call-Id` once it is durably stored."""
    return await _queue(request, gateway, name, "")


@post("/async-function/{name:str}/{path:path}", status_code=202)
async def async_function_path(
    request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str], path: FromPath[str]
) -> ASGIResponse:
    """Queue a request for `name` with sub-path `path`."""
    return await _queue(request, gateway, name, path)


async def _queue(request: Request[Any, Any, Any], gateway: Gateway, name: str, path: str) -> ASGIResponse:
    function = function_for(gateway.view, name)
    record = await gateway.intake.submit(await read_submission(request, function, path))
    # A bare ASGI response: an empty body and two headers need none of a Response's rendering.
    return ASGIResponse(
        status_code=202,
        media_type="text/plain",
        headers={names.H_CALL_ID: record.request_id, names.H_REQUEST_ID: record.request_id},
    )
