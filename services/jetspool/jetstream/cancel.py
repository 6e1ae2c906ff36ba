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

import logging
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING

import msgspec
from nats.js.errors import APIError, NotFoundError

from jetspool.domain import names
from jetspool.domain.errors import DecodeError
from jetspool.domain.functions import DEFAULT_RESULT_TTL_S
from jetspool.domain.messages import QueuedRequest, decode
from jetspool.domain.status import ErrorType, State, start_deadline_missed, utcnow
from jetspool.jetstream.ridethrough import ride_through
from jetspool.jetstream.stats import count_outcome
from jetspool.jetstream.status_store import StaleStatus

if TYPE_CHECKING:
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


async def purge(conn: Nats, status: StatusStore, canceller: Canceller, function: Function) -> int:
    """Cancel every waiting request of `function` (running ones go on); returns how many were dropped.

    Walks the function's queue subjects message by message (an administrative operation, linear
    in the backlog by nature); each waiting request is cancelled as by the cancel route.
    """
    purged = 0
    for priority in names.PRIORITIES:
        subject, seq = names.queue_subject(function.name, priority), 1
        while True:
            try:
                read = partial(conn.js.get_msg, names.QUEUE_STREAM, seq=seq, subject=subject, next=True)
                msg = await ride_through(read, "queue read")
            except NotFoundError:
                break
            found = int(msg.seq or seq)
            seq = found + 1
            try:
                request_id = decode(msg.data or b"", QueuedRequest).identified(found).request_id
            except DecodeError:
                continue
            current = await status.get(request_id)
            if current is not None and current.record.status is State.IN_QUEUE:
                outcome = await canceller.cancel(current, function, only_waiting=True)  # one that started goes on
                purged += outcome is CancelOutcome.CANCELLED
    return purged
