"""Demo functions served by `jetspool up --demo`, so every route in the README can be tried at once.

echo    answers with what it received: method, path, query, headers and body
sleep   waits `?seconds=S` (default 2, at most 60), then answers
flaky   answers 503 to the first two attempts of each request, then 200
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Litestar, Request, Response, get, route
from litestar.enums import HttpMethod

from jetspool.domain import names
from jetspool.domain.functions import Function

_METHODS = [HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH, HttpMethod.DELETE]
_MAX_SLEEP_S = 60.0
_FLAKY_FAILURES = 2


@route(["/echo", "/echo/{rest:path}"], http_method=_METHODS, status_code=200)
async def echo(request: Request[Any, Any, Any]) -> dict[str, Any]:
    body = await request.body()
    return {
        "method": request.method,
        "path": request.url.path,
        "query": request.scope.get("query_string", b"").decode("latin-1"),
        "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]},
        "body": body.decode("utf-8", errors="replace"),
    }


@route(["/sleep", "/sleep/{rest:path}"], http_method=_METHODS, status_code=200)
async def sleep(request: Request[Any, Any, Any]) -> dict[str, float]:
    try:
        seconds = min(max(float(request.query_params.get("seconds", 2)), 0.0), _MAX_SLEEP_S)
    except ValueError:
        seconds = 2.0
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@route(["/flaky", "/flaky/{rest:path}"], http_method=_METHODS, status_code=200)
async def flaky(request: Request[Any, Any, Any]) -> Any:
    attempt = int(request.headers.get(names.H_ATTEMPT, "1"))
    if attempt <= _FLAKY_FAILURES:
        return Response({"detail": f"attempt {attempt}: unavailable, try again"}, status_code=503)
    return {"attempt": attempt, "detail": "worked this time"}


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def create_app() -> Litestar:
    return Litestar(route_handlers=[echo, sleep, flaky, healthz], openapi_config=None, logging_config=None)


def functions(base_url: str) -> list[Function]:
    """Registry entries of the demo functions served at `base_url`."""
    return [
        Function(name="echo", url=f"{base_url}/echo"),
        Function(name="sleep", url=f"{base_url}/sleep", concurrency=4),
        Function(name="flaky", url=f"{base_url}/flaky", max_attempts=5),
    ]
