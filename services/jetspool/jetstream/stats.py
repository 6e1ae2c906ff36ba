"""Live queue figures per function: waiting per priority and in progress from the consumers,
totals (completed, failed, retried, cancelled, callbacks delivered and failed) from server-side
counters bumped with `Nats-Incr`, each total the last message of its subject."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import orjson
from nats.js.errors import NotFoundError

from jetspool.aio import Periodic
from jetspool.domain import names
from jetspool.domain.status import ErrorType, utcnow
from jetspool.jetstream.positions import consumer_figures
from jetspool.jetstream.ridethrough import ride_through

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from nats.js.client import JetStreamContext

    from jetspool.domain.status import StatusRecord
    from jetspool.jetstream.connection import Nats

log = logging.getLogger(__name__)

_TRIM_RETRY_S: Final = 5.0
"""How soon a trim that failed (NATS away) is tried again."""


RECOUNT_WITHIN_S: Final = 100.0
"""How long after an outcome its count may be sent again by whoever finds the outcome recorded (its
first count's fate unknown): inside the counters stream's duplicate window (120 s), where nats-server
takes a repeat for one. Past it a repeat counted twice (found by a review): a count that never
landed then stays missing rather than one that did counted twice."""


def may_count_again(at: datetime | None) -> bool:
    """Whether an outcome recorded `at` may be counted again (see `RECOUNT_WITHIN_S`)."""
    return at is not None and (utcnow() - at).total_seconds() < RECOUNT_WITHIN_S


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


class CounterTrim(Periodic):
    """Trims the counters stream to the increments of the last duplicate window, and each total.

    A count sent twice with one message id counts once only while nats-server knows the id, and
    after a restart it knows the ids of the messages it still holds. Kept to one message per total,
    a count sent again after a nats-server restart (a worker finding its request completed cannot
    tell whether the first count landed) counted twice. So the stream keeps every increment, and
    every half window this removes those stored a whole window ago, keeping each subject's last
    message, its total. Several workers trimming at once remove the same messages."""

    name = "counter-trim"
    failed = "could not trim the counters stream; trying again"
    retry_s = _TRIM_RETRY_S

    def __init__(self, js: JetStreamContext, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._js = js
        self._clock = clock
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        """(when, the stream's last sequence then), oldest first."""

    async def turn(self) -> float:
        return await self.trim()

    async def trim(self) -> float:
        """Mark where the stream ends now, remove what was stored by the mark a window old, and
        say how long to wait before the next turn."""
        info = await self._js.stream_info(names.COUNTER_STREAM)
        window_s = info.config.duplicate_window or 0.0
        now = self._clock()
        self._marks.append((now, info.state.last_seq))
        through = None
        while self._marks and now - self._marks[0][0] >= window_s:
            through = self._marks.popleft()[1]
        if through is not None:
            await trim_counters(self._js, through)
        return max(window_s / 2, _TRIM_RETRY_S)


async def trim_counters(js: JetStreamContext, through_seq: int) -> None:
    """Remove the counters stream's messages up to `through_seq`, each subject's last one excepted."""
    subjects = (await js.stream_info(names.COUNTER_STREAM, subjects_filter=">")).state.subjects or {}
    for subject, kept in subjects.items():
        if kept <= 1:
            continue
        last = await js.get_msg(names.COUNTER_STREAM, subject=subject)
        upto = min(through_seq + 1, last.seq or 0)  # a purge stops before `seq`
        if upto > 0:
            await js.purge_stream(names.COUNTER_STREAM, seq=upto, subject=subject)
