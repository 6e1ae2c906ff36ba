"""Cancelling a request (SPEC §2, §4).

- Waiting (`IN_QUEUE`, including a retry waiting out its backoff): the status becomes
  COMPLETED/cancelled by compare-and-set, then its message is deleted from the queue stream, so
  it is never delivered and every position behind it moves up at once. Its callbacks are queued,
  and its envelope is kept for the retry route.
- Running (`IN_PROGRESS`): the record is marked `cancel_requested` (so a redelivery after a worker
  crash completes it as cancelled), then the workers are told on `jetspool.cancel.<function>`; the
  one holding it aborts the call, POSTs the function's `cancel_path` if configured, and records
  `cancelled`.
- Completed: nothing changes; the caller answers ALREADY_COMPLETED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from datetime import timedelta
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Final

import msgspec
from nats.js.errors import APIError, NotFoundError

from jetspool.aio import stop_task
from jetspool.domain import names
from jetspool.domain.errors import DecodeError
from jetspool.domain.functions import DEFAULT_RESULT_TTL_S
from jetspool.domain.messages import QueuedRequest, decode
from jetspool.domain.status import ErrorType, State, rfc3339, start_deadline_missed, utcnow
from jetspool.jetstream.ridethrough import ride_through
from jetspool.jetstream.stats import count_outcome
from jetspool.jetstream.status_store import StaleStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from jetspool.domain.functions import Function
    from jetspool.domain.status import StatusRecord
    from jetspool.jetstream.callbacks import CallbackQueue
    from jetspool.jetstream.connection import Nats
    from jetspool.jetstream.events import EventLog
    from jetspool.jetstream.logs import RequestLogs
    from jetspool.jetstream.retention import Retention
    from jetspool.jetstream.status_store import StatusStore, Versioned

log = logging.getLogger(__name__)


class CancelOutcome(Enum):
    CANCELLED = "cancelled"
    SIGNALLED = "signalled"
    STARTED = "started"
    """Running, left alone (`only_waiting`)."""
    ALREADY_COMPLETED = "already completed"
    NOT_FOUND = "not found"


_GONE = frozenset({10037, 10043, 10057})
"""JetStream's answers to deleting a message that is no longer there ("no message found",
"sequence not found"), depending on how it went."""


class Canceller:
    def __init__(
        self,
        conn: Nats,
        status: StatusStore,
        callbacks: CallbackQueue,
        retention: Retention,
        events: EventLog,
        *,
        logs: RequestLogs,
    ) -> None:
        self._conn = conn
        self._status = status
        self._callbacks = callbacks
        self._retention = retention
        self._events = events
        self._logs = logs
        self._purges: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def purging(self, function: str) -> asyncio.Lock:
        """Held by a purge of `function` on this gateway: purges of one function take turns."""
        return self._purges[function]

    async def expire(self, current: Versioned, function: Function | None) -> bool:
        """Complete a request still waiting at its start deadline as `request_timeout`; whether it did."""
        return (
            await self.cancel(current, function, error_type=ErrorType.REQUEST_TIMEOUT, only_waiting=True)
            is CancelOutcome.CANCELLED
        )

    async def cancel(
        self,
        current: Versioned,
        function: Function | None,
        *,
        error_type: ErrorType = ErrorType.CANCELLED,
        only_waiting: bool = False,
    ) -> CancelOutcome:
        """Cancel the request `current` describes, re-reading it when it changes underneath.

        A waiting request completes with `error_type`; a running one is signalled, unless `only_waiting`.
        """
        while True:
            record = current.record
            if record.status is State.COMPLETED:
                return CancelOutcome.ALREADY_COMPLETED
            running = record.status is State.IN_PROGRESS
            if running and only_waiting:
                return CancelOutcome.STARTED
            ttl_s = function.result_ttl if function is not None else DEFAULT_RESULT_TTL_S
            kept: QueuedRequest | None = None
            if running:
                changed = msgspec.structs.replace(record, cancel_requested=True)
            else:
                # Kept for the retry route before the status says it ended, as the worker keeps a
                # failed request: a retry sent on seeing the status was refused as no longer kept
                # (found by a soak test, for requests whose start deadline had passed). Its body's
                # sweep waits for the status write: a worker may start the request meanwhile.
                kept = await self._keep_envelope(record, ttl_s)
                changed = record.completed(
                    utcnow(),
                    keep_s=ttl_s,
                    function_status=None,
                    inference_time=None,
                    error="cancelled" if error_type is ErrorType.CANCELLED else start_deadline_missed(record.attempts),
                    error_type=error_type,
                )
            try:
                await self._status.update(changed, current.revision)
            except StaleStatus:
                reread = await self._status.get(record.request_id)
                if reread is None:
                    return CancelOutcome.NOT_FOUND
                current = reread
                continue
            if running:
                await self._conn.nc.publish(names.cancel_subject(record.function), record.request_id.encode())
                return CancelOutcome.SIGNALLED
            # The line a worker writes when a request ends: a request cancelled or timed out while it
            # waited ended with no log line, its status saying nothing of why (found by an audit).
            # Written after the status write, which may yet lose to a start; a status stream with
            # ?logs=1 may then end a moment before it (a status read shows it).
            await self._logs.write(record.request_id, f"completed, failed: {changed.error}", level="ERROR")
            await self._events.publish(changed)
            if kept is not None:
                await self._retention.sweep_body_later(kept, ttl_s)  # only now: it has ended
            await self._withdraw(changed, kept)
            await count_outcome(self._conn, changed)
            # The queue changed only now: positions behind it move up, and watchers recompute them.
            await self._conn.nc.publish(names.wake_subject(record.function), b"")  # any class
            return CancelOutcome.CANCELLED

    async def _keep_envelope(self, record: StatusRecord, ttl_s: float) -> QueuedRequest | None:
        """Keep the queued form of the waiting request `record` describes for the retry route; None
        when its message is gone (taken meanwhile: the worker sees the status and drops it) or
        unreadable."""
        seq = record.queue_seq
        if seq is None:
            return None
        try:
            msg = await ride_through(partial(self._conn.js.get_msg, names.QUEUE_STREAM, seq=seq), "queue read")
        except NotFoundError:
            return None
        try:
            request = decode(msg.data or b"", QueuedRequest).identified(seq)
        except DecodeError:
            log.exception("cancelled message %d is unreadable; no callbacks for it", seq)
            return None
        await self._retention.keep_envelope(request, ttl_s)
        return request

    async def _withdraw(self, record: StatusRecord, kept: QueuedRequest | None) -> None:
        """Queue the cancelled request's callbacks (when its message was `kept`) and delete its message."""
        if kept is not None:
            await self._callbacks.emit(record)
        seq = record.queue_seq
        if seq is None:
            return
        try:
            await ride_through(partial(self._conn.js.delete_msg, names.QUEUE_STREAM, seq), "queue delete")
        except APIError as exc:
            # Gone already: a repeat of this delete, or a worker that took the message meanwhile,
            # found the request cancelled, and acknowledged it (which deletes it).
            if exc.err_code not in _GONE:
                raise


_PURGE_HOLD_S: Final = 30.0
"""How long a purge pauses its function's consumers at a time: renewed while it runs, so that a
gateway dying mid-purge holds the function's queue up for at most this long."""
_PURGE_AT_ONCE: Final = 32
"""Cancellations a purge has in flight at once."""


async def purge(conn: Nats, status: StatusStore, canceller: Canceller, function: Function) -> int:
    """Cancel every request of `function` waiting when it begins (running ones go on); returns how
    many were dropped.

    The function's consumers are paused while it runs (nats-server 2.11+), so that no worker starts
    a request it has not reached yet: it walked the queue one request at a time (2,000 took 18 s),
    and the workers went on taking what it had not reached, 83 of 2,000 (found by an outside
    audit). It walks the function's queue subjects message by message, up to the last stored when
    it began (requests submitted meanwhile wait for it, and run after), and cancels
    `_PURGE_AT_ONCE` at a time, each as by the cancel route. A request a worker had already pulled
    when the pause began may still start: it is running, and goes on. Purges of one function on one
    gateway take turns: the first to end lifted the pause of the other.
    """
    async with canceller.purging(function.name), _paused(conn, function):
        return await _cancel_waiting(conn, status, canceller, function)


async def _cancel_waiting(conn: Nats, status: StatusStore, canceller: Canceller, function: Function) -> int:
    last = (await ride_through(partial(conn.js.stream_info, names.QUEUE_STREAM), "queue read")).state.last_seq
    purged = 0
    in_flight: set[asyncio.Task[bool]] = set()

    async def drop(request_id: str) -> bool:
        current = await status.get(request_id)
        if current is None or current.record.status is not State.IN_QUEUE:
            return False
        return await canceller.cancel(current, function, only_waiting=True) is CancelOutcome.CANCELLED

    def settle(tasks: set[asyncio.Task[bool]]) -> None:
        nonlocal purged
        purged += sum(task.result() for task in tasks)  # the first failure answers the purge

    try:
        async for request_id in _waiting_ids(conn, function, last):
            if len(in_flight) >= _PURGE_AT_ONCE:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                settle(done)
            in_flight.add(asyncio.create_task(drop(request_id)))
        if in_flight:
            done, in_flight = await asyncio.wait(in_flight)
            settle(done)
    finally:  # none is left half done: a cancellation cut between its writes would lose its callbacks
        if in_flight:
            await asyncio.wait(in_flight)
    return purged


async def _waiting_ids(conn: Nats, function: Function, last: int) -> AsyncIterator[str]:
    """The request ids of `function`'s queue messages up to stream sequence `last`, class by class."""
    for priority in names.PRIORITIES:
        subject, seq = names.queue_subject(function.name, priority), 1
        while seq <= last:
            try:
                read = partial(conn.js.get_msg, names.QUEUE_STREAM, seq=seq, subject=subject, next=True)
                msg = await ride_through(read, "queue read")
            except NotFoundError:
                break
            found = int(msg.seq or seq)
            seq = found + 1
            if found > last:
                break
            try:
                yield decode(msg.data or b"", QueuedRequest).identified(found).request_id
            except DecodeError:
                continue


@contextlib.asynccontextmanager
async def _paused(conn: Nats, function: Function) -> AsyncIterator[None]:
    """`function`'s queue consumers paused for as long as the block runs, the pause renewed every
    third of `_PURGE_HOLD_S`. One that cannot be paused (an older nats-server, a NATS error) is
    said in a warning and the purge goes on; every one is resumed after, whatever happened: a
    failed pause of one left the others paused for `_PURGE_HOLD_S` after the purge (found by a
    review)."""
    consumers = [names.queue_consumer(function.name, priority) for priority in names.PRIORITIES]

    async def pause() -> None:
        until = rfc3339(utcnow() + timedelta(seconds=_PURGE_HOLD_S))
        paused = await asyncio.gather(
            *(conn.js.pause_consumer(names.QUEUE_STREAM, c, until) for c in consumers), return_exceptions=True
        )
        for consumer, outcome in zip(consumers, paused, strict=True):
            if isinstance(outcome, Exception):
                log.warning("purge of %s: consumer %s is not paused (%s)", function.name, consumer, outcome)

    async def keep_paused() -> None:
        while True:
            await asyncio.sleep(_PURGE_HOLD_S / 3)
            await pause()

    await pause()
    keeper = asyncio.create_task(keep_paused())
    try:
        yield
    finally:
        await stop_task(keeper)
        resumed = await asyncio.gather(
            *(conn.js.resume_consumer(names.QUEUE_STREAM, c) for c in consumers), return_exceptions=True
        )
        for consumer, outcome in zip(consumers, resumed, strict=True):
            if isinstance(outcome, Exception) and not isinstance(outcome, NotFoundError):
                log.warning("consumer %s stays paused up to %g s after a purge: %s", consumer, _PURGE_HOLD_S, outcome)
