"""The dashboard: `/ui` serves a page from the package (no build step, no CDN), which reads
two admin routes besides the public API:

- `GET /system/dashboard`: per function, the queue figures (waiting by priority, in progress,
  totals) and the last ten minutes of activity (completions and failures per 10 s, run-time
  p50/p99), as every gateway hears it from the status-change events.
- `GET /system/dashboard/events`: Server-Sent Events, the latest status-change events (`limit`,
  default 100) and then each new one as it happens: the live list of recent requests.

The page itself is open (it holds no data); it asks for a key when the routes answer 401 or 403
and keeps it in the browser's session storage.
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from litestar import Response, get
from litestar.params import FromPath, FromQuery
from litestar.response import ServerSentEvent, ServerSentEventMessage

from jetspool.domain import names
from jetspool.domain.errors import InvalidInput, NotFound
from jetspool.gateway.feed import PING
from jetspool.gateway.state import Gateway, GatewayDep
from jetspool.jetstream.direct import direct_batch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.msg import Msg

    from jetspool.gateway.feed import Slot

_PAGE: Final = resources.files("jetspool.gateway") / "ui"
_ASSETS: Final = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
MAX_RECENT: Final = 500
_LIVE_BUFFER: Final = 10_000
"""Events a slow dashboard may fall behind by before the oldest are dropped."""
_CLOSING_CHECK_S: Final = 1.0
_LATEST_TIMEOUT_S: Final = 5.0


@get("/ui", include_in_schema=False)
async def page() -> Response[bytes]:
    return Response(
        (_PAGE / "index.html").read_bytes(),
        media_type="text/html",
        headers={"Cache-Control": "no-cache"},
    )


@get("/ui/{asset:str}", include_in_schema=False)
async def asset(asset: FromPath[str]) -> Response[bytes]:
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise NotFound(f"no dashboard file {asset!r}")
    return Response((_PAGE / asset).read_bytes(), media_type=media_type, headers={"Cache-Control": "no-cache"})


@get("/system/dashboard")
async def overview(gateway: GatewayDep) -> dict[str, Any]:
    functions = gateway.view.all()  # sorted by name
    figures = await asyncio.gather(*(gateway.stats.for_function(f.name) for f in functions))
    return {
        "functions": [
            {
                "name": function.name,
                "url": function.url,
                "concurrency": function.concurrency,
                "stats": stats,
                "activity": gateway.metrics.activity.series(function.name),
            }
            for function, stats in zip(functions, figures, strict=True)
        ]
    }


@get("/system/dashboard/events")
async def events(gateway: GatewayDep, limit: FromQuery[int] = 100) -> ServerSentEvent:
    if not 0 <= limit <= MAX_RECENT:
        raise InvalidInput(f"limit must be 0 to {MAX_RECENT}; got {limit}")
    # A place among the gateway's streams, as a status stream takes: each holds a subscription and
    # a task, and a client opening them without end was not held back (found by an audit).
    slot = gateway.feed.reserve()
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return ServerSentEvent(_event_feed(gateway, limit, slot), headers=headers)


async def _event_feed(gateway: Gateway, limit: int, slot: Slot) -> AsyncIterator[ServerSentEventMessage]:
    """Subscribe first, then send the stored latest events, then the live ones: none falls between
    (one may come twice, which the page takes as the same change)."""
    try:
        async for message in _events_of(gateway, limit):
            yield message
    finally:
        slot.release()


async def _events_of(gateway: Gateway, limit: int) -> AsyncIterator[ServerSentEventMessage]:
    live: asyncio.Queue[bytes] = asyncio.Queue(_LIVE_BUFFER)

    async def heard(msg: Msg) -> None:
        if live.full():
            live.get_nowait()
        live.put_nowait(msg.data)

    sub = await gateway.conn.nc.subscribe(names.EVENT_SUBJECTS, cb=heard)
    try:
        for data in await _latest(gateway, limit):
            yield ServerSentEventMessage(data=data.decode())
        quiet_s = 0.0
        while not gateway.feed.closing:
            try:
                data = await asyncio.wait_for(live.get(), _CLOSING_CHECK_S)
            except TimeoutError:
                quiet_s += _CLOSING_CHECK_S
                if quiet_s >= gateway.settings.gateway.sse_ping_interval:
                    quiet_s = 0.0
                    yield PING
                continue
            quiet_s = 0.0
            yield ServerSentEventMessage(data=data.decode())
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(sub.unsubscribe())


async def _latest(gateway: Gateway, limit: int) -> list[bytes]:
    """The last `limit` events of the events stream, oldest first, in one batched direct get."""
    if limit == 0:
        return []
    state = (await gateway.conn.js.stream_info(names.EVENT_STREAM)).state
    first = max(state.first_seq, state.last_seq - limit + 1)
    if state.last_seq == 0 or first > state.last_seq:
        return []
    found = await direct_batch(gateway.conn.nc, names.EVENT_STREAM, {"seq": first, "batch": limit}, _LATEST_TIMEOUT_S)
    return [msg.data for msg in found if msg.data]
