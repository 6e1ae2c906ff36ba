"""Live queue figures per function: waiting per priority and in progress from the consumers,
totals (completed, failed, retried, cancelled, callbacks delivered and failed) from server-side
counters, one message per counter subject, bumped with `Nats-Incr`."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from nats.js.errors import NotFoundError

from jetspool.domain import names
from jetspool.domain.status import ErrorType
from jetspool.jetstream.positions import consumer_figures
from jetspool.jetstream.ridethrough import ride_through

if TYPE_CHECKING:
    from jetspool.domain.status import StatusRecord
    from jetspool.jetstream.connection import Nats


async def count(conn: Nats, function: str, counter: names.Counter, msg_id: str | None = None) -> None:
    """Add one to a total of `function` (a message id makes a repeat count once)."""
    headers = {names.NATS_INCR: "+1"} | ({names.NATS_MSG_ID: msg_id} if msg_id else {})
    await conn.record(names.counter_subject(function, counter), b"", headers)


async def count_outcome(conn: Nats, record: StatusRecord) -> None:
    """Add the completed `record` to its function's `completed` or `failed` total (and `cancelled`).

    The message id (request and run) lets whoever finds the request completed after a crash
    send it again and have it counted once."""
    outcome = f"{record.request_id}.outcome.{record.retries}"
    await count(conn, record.function, "completed" if record.error_type is None else "failed", outcome)
    if record.error_type is ErrorType.CANCELLED:
        await count(conn, record.function, "cancelled", f"{outcome}.cancelled")


class StatsReader:
    def __init__(self, conn: Nats) -> None:
        self._js = conn.js
        self._direct = conn.direct_reads

    async def for_function(self, function: str) -> dict[str, Any]:
        infos = await asyncio.gather(*(consumer_figures(self._js, function, p) for p in names.PRIORITIES))
        completed, failed = await asyncio.gather(
            self._counter(function, "completed"), self._counter(function, "failed")
        )
        return {
            "waiting": {p: pending for p, (pending, _) in zip(names.PRIORITIES, infos, strict=True)},
            "in_progress": sum(in_flight for _, in_flight in infos),
            "completed": completed,
            "failed": failed,
        }

    async def totals(self, function: str) -> dict[names.Counter, int]:
        """Every total of `function`."""
        values = await asyncio.gather(*(self._counter(function, c) for c in names.COUNTERS))
        return dict(zip(names.COUNTERS, values, strict=True))

    async def _counter(self, function: str, counter: names.Counter) -> int:
        read = partial(
            self._js.get_msg,
            names.COUNTER_STREAM,
            subject=names.counter_subject(function, counter),
            direct=self._direct,
        )
        try:
            msg = await ride_through(read, "totals")
        except NotFoundError:
            return 0
        return int(orjson.loads(msg.data or b"{}").get("val", 0))
