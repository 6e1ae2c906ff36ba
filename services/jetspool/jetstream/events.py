"""Status-change events (SPEC §6): every change of a request's status, published on
`jetspool.events.<function>.<type>` into the `JETSPOOL_EVENTS` stream, which subscribers can
follow live or replay (kept for `events.max_age`).

Payload: `{"v": 1, "type", "function", "request_id", "at", "status": <status object>,
"result": <the function's JSON output, when small>}`. Each event is published after the status
write it describes; its message id (request, type, attempt, run) makes a repeat after a crash
harmless within the duplicate window.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import orjson
from nats.errors import Error as NatsError

from jetspool.domain import names
from jetspool.domain.status import ErrorType, State, public_status, rfc3339, utcnow

if TYPE_CHECKING:
    from datetime import datetime

    from jetspool.domain.status import StatusRecord
    from jetspool.jetstream.connection import Nats

log = logging.getLogger(__name__)

EVENT_VERSION = 1


def event_type(record: StatusRecord) -> names.EventType:
    """The event a record that was just written stands for."""
    if record.status is State.IN_QUEUE:
        return "retrying" if record.attempts > record.attempt_base else "queued"
    if record.status is State.IN_PROGRESS:
        return "started"
    if record.error_type is None:
        return "succeeded"
    return "cancelled" if record.error_type is ErrorType.CANCELLED else "failed"


def _changed_at(record: StatusRecord, kind: names.EventType) -> datetime:
    """When the change an event tells happened: the status object's own time of it where it has one,
    now otherwise (a retry's requeue). Taken as the event went out, `at` came a few milliseconds
    after the `started_at` or `completed_at` it tells of (found by an outside audit)."""
    if kind == "started" and record.started_at is not None:
        return record.started_at
    if kind in {"succeeded", "failed", "cancelled"} and record.completed_at is not None:
        return record.completed_at
    return utcnow()


class EventLog:
    def __init__(self, conn: Nats, base_url: str, inline_result_limit: int) -> None:
        self._conn = conn
        self._base_url = base_url
        self._inline_limit = inline_result_limit

    async def publish(self, record: StatusRecord, output: bytes | None = None, at: datetime | None = None) -> None:
        """Publish the event of `record`, just written; `output`: the function's response body;
        `at`: when the change happened, if not now.

        On one server it is sent without waiting for the stream's acknowledgement (events observe,
        they do not steer: the status write stands either way), which spares a round trip per
        change; on a cluster it is acknowledged (see `Nats.record`). Being on the same connection
        as the status write, it lands in the stream after the ones sent before."""
        kind = event_type(record)
        event: dict[str, Any] = {
            "v": EVENT_VERSION,
            "type": kind,
            "function": record.function,
            "request_id": record.request_id,
            "at": rfc3339(at or _changed_at(record, kind)),
            "status": public_status(record, self._base_url),
        }
        result = self._inline(output)
        if result is not _NOT_INLINE:
            event["result"] = result
        msg_id = f"{record.request_id}.{kind}.{record.attempts}.{record.retries}"
        try:
            await self._conn.record(
                names.event_subject(record.function, kind), orjson.dumps(event), {names.NATS_MSG_ID: msg_id}
            )
        except (NatsError, TimeoutError):
            log.warning("could not publish the %s event of %s", kind, record.request_id, exc_info=True)

    def _inline(self, output: bytes | None) -> Any:
        """The output as JSON when it is JSON and small enough; `_NOT_INLINE` otherwise. (An output
        of `null` rides along as null: it was left out, like one that is not JSON, found by an audit.)"""
        if not output or len(output) > self._inline_limit:
            return _NOT_INLINE
        try:
            return orjson.loads(output)
        except orjson.JSONDecodeError:
            return _NOT_INLINE


_NOT_INLINE: Final = object()
