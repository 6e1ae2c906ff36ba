"""Live queue figures per function: waiting per priority and in progress from the consumers,
completed and failed totals from server-side counters (one message per counter subject)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from nats.js.errors import NotFoundError

from jetspool.domain import names
from jetspool.jetstream.positions import consumer_figures

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

    from jetspool.domain.status import StatusRecord


async def count_outcome(nc: Client, record: StatusRecord) -> None:
    """Add the completed `record` to its function's `completed` or `failed` total.

    Sent without waiting; the message id (request and run) lets whoever finds the request
    completed after a crash send it again and have it counted once."""
    counter = "completed" if record.error_type is None else "failed"
    headers = {names.NATS_INCR: "+1", names.NATS_MSG_ID: f"{record.request_id}.outcome.{record.retries}"}
    await nc.publish(names.counter_subject(record.function, counter), b"", headers=headers)


class StatsReader:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

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

    async def _counter(self, function: str, counter: str) -> int:
        try:
            msg = await self._js.get_msg(
                names.COUNTER_STREAM, subject=names.counter_subject(function, counter), direct=True
            )
        except NotFoundError:
            return 0
        return int(orjson.loads(msg.data or b"{}").get("val", 0))
