"""Exact queue positions from JetStream's own state, at a cost that does not grow with the backlog.

A waiting request R of class c, stored at stream sequence s, starts after

    every undelivered request of the higher classes   Σ num_pending of their consumers
  + the undelivered requests of c stored before s       num_pending(c) - 1 - after(R)

where `after(R)`, the messages on R's subject stored after s, comes from a direct get of R's
own message: the server answers it with `Nats-Num-Pending`, computed from per-block subject
state (bounded by one block's scan, not by the backlog). Cancelled requests are deleted from
the stream, so neither figure counts them. A request waiting out a retry backoff has been
delivered already: it is redelivered before any new message, so only higher classes precede it.

The two figures of R's class cannot be read atomically. Read at once, a request of the class
stored between the reads counted as ahead of R (a submit answer under 64 concurrent submits said
up to 27 too many; found by a load audit). So `after(R)` is read once `num_pending(c)` is in: a
request stored before the class's figure was read counts in both, and cancels out; one stored
between the two reads counts in `after(R)` alone, and makes the position one short. Never does a
request behind R count as ahead. (Reading `after(R)` before and after, until the two agreed, cost
the submit benchmark 5-8 % of its throughput, and under its load they seldom agreed.) While
requests start, a reading may also be off by the starts in between. Concurrent askers of a class's figure share one read
(`SharedRead`), begun after each of them asked: a thousand status streams refreshing their
positions at once cost a few consumer reads, not a thousand.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING

import orjson
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError

from jetspool.aio import SharedRead
from jetspool.domain import names
from jetspool.jetstream.ridethrough import ride_through

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from jetspool.domain.status import StatusRecord
    from jetspool.jetstream.connection import Nats

_TIMEOUT_S = 5.0


class QueuePositions:
    def __init__(self, conn: Nats) -> None:
        self._conn = conn
        self._figure_reads: dict[tuple[str, names.Priority], SharedRead[tuple[int, int]]] = {}

    async def waiting(self, function: str) -> dict[names.Priority, int]:
        """Undelivered requests of `function` per priority class."""
        figures = await self._all_figures(function, names.PRIORITIES)
        return {priority: waiting for priority, (waiting, _) in zip(names.PRIORITIES, figures, strict=True)}

    async def position(self, record: StatusRecord) -> int:
        """How many requests of the same function will start before `record` (which is IN_QUEUE),
        reading the figures of its class and those above it only."""
        own = names.PRIORITIES.index(record.priority)
        position, _ = await self._place(record, names.PRIORITIES[: own + (0 if _retried(record) else 1)])
        return position

    async def place(self, record: StatusRecord) -> tuple[int, int]:
        """`position(record)`, and the requests of its function delivered and not yet settled (its
        calls under way on every worker, and those waiting out a retry backoff), from one read of
        every class's figures: read apart for `eta_seconds`, each class's consumer was read twice."""
        return await self._place(record, names.PRIORITIES)

    async def _place(self, record: StatusRecord, classes: tuple[names.Priority, ...]) -> tuple[int, int]:
        figures = await self._all_figures(record.function, classes)
        in_flight = sum(delivered for _, delivered in figures)
        own = names.PRIORITIES.index(record.priority)
        higher = sum(waiting for waiting, _ in figures[:own])
        if _retried(record):  # a retry waits before new messages
            return higher, in_flight
        after = await self._after(record)  # after the class's figure: see the module's docstring
        if after is None:
            return higher, in_flight  # taken a moment ago
        return higher + max(0, figures[own][0] - 1 - after), in_flight

    async def _all_figures(self, function: str, classes: tuple[names.Priority, ...]) -> list[tuple[int, int]]:
        return list(await asyncio.gather(*(self._figures(function, p) for p in classes)))

    async def _figures(self, function: str, priority: names.Priority) -> tuple[int, int]:
        key = (function, priority)
        shared = self._figure_reads.get(key)
        if shared is None:
            shared = self._figure_reads[key] = SharedRead(partial(consumer_figures, self._conn.js, function, priority))
        return await shared.get()

    async def _after(self, record: StatusRecord) -> int | None:
        """Messages on the record's subject stored after its own; None when its message is gone."""
        request = {
            "seq": record.queue_seq,
            "next_by_subj": names.queue_subject(record.function, record.priority),
            "batch": 1,
        }
        try:
            reply = await self._conn.nc.request(
                f"$JS.API.DIRECT.GET.{names.QUEUE_STREAM}", orjson.dumps(request), timeout=_TIMEOUT_S
            )
        except NoRespondersError:
            return None
        headers = reply.headers or {}
        if headers.get("Nats-Sequence") != str(record.queue_seq):
            return None  # gone: the next message on the subject answered instead, or none (404)
        return int(headers.get("Nats-Num-Pending", "0"))


def _retried(record: StatusRecord) -> bool:
    """Whether `record`'s message was delivered before (or it has no queue sequence): then only
    higher classes count before it. Delivered in its current run: a run of the retry route is a new
    message, behind every request of its class stored before it, and its attempts of the runs
    before made it count none of them (found by a review)."""
    return record.attempts > record.attempt_base or record.queue_seq is None


async def consumer_figures(js: JetStreamContext, function: str, priority: names.Priority) -> tuple[int, int]:
    """(undelivered, delivered but not yet acknowledged) messages of one priority class of `function`."""
    consumer = names.queue_consumer(function, priority)
    try:
        info = await ride_through(partial(js.consumer_info, names.QUEUE_STREAM, consumer), "queue figures")
    except NotFoundError:
        return 0, 0
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)
