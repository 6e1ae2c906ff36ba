"""Administration: the function registry, health and readiness."""

from __future__ import annotations

from functools import partial
from typing import Any, Final

import msgspec
from litestar import Request, Response, delete, get, post, put, route
from litestar.enums import HttpMethod
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath
from nats.errors import Error as NatsError

from jetspool.domain.errors import BadRequest, InvalidInput, NotFound
from jetspool.domain.functions import Function
from jetspool.domain.validation import describe
from jetspool.gateway.intake import function_for
from jetspool.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jetspool.gateway.state import Gateway, GatewayDep
from jetspool.jetstream.cancel import purge
from jetspool.jetstream.connection import round_trip
from jetspool.jetstream.provision import drop_idle_function_consumers, ensure_function_consumers
from jetspool.jetstream.ridethrough import ride_through


async def _function_body(request: Request[Any, Any, Any], name: str | None = None) -> Function:
    """The registry entry in the request body; 422 naming the bad field."""
    raw = await request.body()
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object describing the function")
    if name is not None:
        if data.get("name") is None:  # `"name": null` too: it was a 400 naming None (found by an audit)
            data["name"] = name
        if data["name"] != name:
            raise BadRequest(f"the body names {data['name']!r} but the path names {name!r}")
    # An entry as read back carries its queue's figures: a body copied from a GET registers as it
    # does with PUT, where a POST refused it as having an unknown key (found by a SPEC audit).
    data.pop("stats", None)
    try:
        return msgspec.convert(data, Function)
    except msgspec.ValidationError as exc:
        raise InvalidInput(describe(exc)) from exc


async def _registered(gateway: Gateway, function: Function) -> None:
    """Make `function` visible at once: its consumers exist (so its queue figures show) and this gateway knows it.

    The entry is stored by now, so this rides through a NATS outage: answered 503, the client's
    repeat of a registration would be refused as taken."""
    ensure = partial(ensure_function_consumers, gateway.conn.js, function.name, gateway.settings.worker.ack_wait)
    await ride_through(ensure, "function consumers")
    gateway.view.remember(function)


async def _with_stats(gateway: GatewayDep, function: Function) -> dict[str, Any]:
    entry: dict[str, Any] = msgspec.to_builtins(function)
    entry["stats"] = await gateway.stats.for_function(function.name)
    return entry


def _allow(path: str) -> HTTPRouteHandler:
    """OPTIONS on `path`, naming every method its handlers serve. Litestar's own answer, made for
    handlers registered one by one, named the first handler's only (`Allow: GET, OPTIONS` on the
    registry, found by an audit; litestar#4169, fixed in Litestar 3). Registered before them."""

    @route(path, http_method=[HttpMethod.OPTIONS], status_code=204, include_in_schema=False)
    async def allow(request: Request[Any, Any, Any]) -> Response[None]:
        methods = next(r.methods for r in request.app.routes if r.path == path)
        return Response(None, status_code=204, headers={"Allow": ", ".join(sorted(methods))})

    return allow


REGISTRY_OPTIONS: Final = (_allow("/system/functions"), _allow("/system/functions/{name:str}"))
"""The registry paths' OPTIONS, each served by several handlers."""


@get("/system/functions")
async def list_functions(gateway: GatewayDep) -> list[dict[str, Any]]:
    return [await _with_stats(gateway, f) for f in gateway.view.all()]


@get("/system/functions/{name:str}")
async def get_function(gateway: GatewayDep, name: FromPath[str]) -> dict[str, Any]:
    return await _with_stats(gateway, function_for(gateway.view, name))


@post("/system/functions", status_code=201)
async def create_function(request: Request[Any, Any, Any], gateway: GatewayDep) -> Response[dict[str, Any]]:
    """Register a function: 201; 200 when exactly this entry is registered already (a repeat)."""
    function = await _function_body(request)
    created = await gateway.registry.create(function)
    await _registered(gateway, function)
    return Response(await _with_stats(gateway, function), status_code=201 if created else 200)


@put("/system/functions/{name:str}")
async def replace_function(
    request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str]
) -> Response[dict[str, Any]]:
    """Register or replace `name`: 201 when it is new, 200 when it replaced an entry."""
    function = await _function_body(request, name)
    created = await gateway.registry.put(function)
    await _registered(gateway, function)
    return Response(await _with_stats(gateway, function), status_code=201 if created else 200)


@delete("/system/functions/{name:str}", status_code=204)
async def delete_function(gateway: GatewayDep, name: FromPath[str]) -> None:
    """Unregister `name`. Requests still waiting stay queued and run if it is registered again;
    with none, its consumers go too."""
    function_for(gateway.view, name)
    await gateway.registry.delete(name)
    gateway.view.forget(name)
    await drop_idle_function_consumers(gateway.conn.js, name)
    # A registration between the delete and the drop found the consumers still there and left
    # them to be dropped: the function stayed registered with no consumers, and its requests
    # waited for good (found by a race review). Such a registration gets them back.
    try:
        again = await gateway.registry.get(name)
    except NotFound:
        return
    await _registered(gateway, again)


@post("/system/functions/{name:str}/purge", status_code=200)
async def purge_function(gateway: GatewayDep, name: FromPath[str]) -> dict[str, int]:
    """Drop every waiting request of `name`; each completes as cancelled. Running ones go on."""
    function = function_for(gateway.view, name)
    return {"purged": await purge(gateway.conn, gateway.status, gateway.canceller, function)}


@get("/metrics", media_type=METRICS_CONTENT_TYPE)
async def metrics(gateway: GatewayDep) -> Response[bytes]:
    """Prometheus metrics: queue figures and totals per function, histograms, request latency."""
    return Response(await gateway.metrics.render(), media_type=METRICS_CONTENT_TYPE)


_PROBE: Final = [HttpMethod.GET, HttpMethod.HEAD]
"""Probes answer HEAD too (`curl -I`, uptime checkers): uvicorn sends a HEAD answer's headers only."""


@route("/healthz", http_method=_PROBE)
async def healthz() -> Response[dict[str, str]]:
    return Response({"status": "ok"})


@route("/readyz", http_method=_PROBE)
async def readyz(gateway: GatewayDep) -> Response[dict[str, str]]:
    """Ready while connected to NATS and a message to itself comes back through NATS within
    `_READY_PING_S`. A connected flag alone stayed true for a nats-server that had hung (SIGSTOP):
    /readyz said ready while every submit waited 31 s for a 503 (found by a SPEC audit)."""
    nc = gateway.conn.nc
    if not nc.is_connected:
        return Response({"status": "not ready", "detail": "not connected to NATS"}, status_code=503)
    try:
        await round_trip(nc, _READY_PING_S)
    except NatsError:  # its TimeoutError among them
        detail = f"NATS did not answer within {_READY_PING_S:g} s"
        return Response({"status": "not ready", "detail": detail}, status_code=503)
    return Response({"status": "ready"})


_READY_PING_S: Final = 2
