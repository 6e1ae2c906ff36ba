"""The results bucket: a function's final response per request, kept for `result_ttl`.

A result of at most `RECORD_INLINE_BYTES` is kept in the completed status record itself (the
worker completes a request with one write); larger ones are stored here. Results larger than one
NATS message go to the object store, the bucket keeping a reference; a sweep job deletes the
object when the result expires.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING, Final

import msgspec
from nats.js.errors import KeyNotFoundError, NotFoundError

from jetspool.domain import names
from jetspool.domain.messages import StoredResult, decode, encode
from jetspool.domain.status import ttl_seconds
from jetspool.jetstream.ridethrough import RIDE_THROUGH_S, ride_through
from jetspool.jetstream.status_store import has_record

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore

    from jetspool.domain.status import StatusRecord
    from jetspool.jetstream.retention import Retention


log = logging.getLogger(__name__)

_STATUS_LATE_S: Final = RIDE_THROUGH_S + 5.0 + 1.0
"""The longest a completed status may outlast a record written `result_ttl` before it: the worker's
closing log line comes between the two (acknowledged within 1 s), and the status write rides
through a stall or an election for up to `RIDE_THROUGH_S` and its last try's 5 s (nats-py's request
timeout). The status expires at its `expires_at` however late a try is sent (`StatusStore`), but a
try held up on its way (by the client through a reconnect, or by a stopped server) is stored late
with the time to live it was sent with."""
_OUTLIVES_STATUS_S: Final = ttl_seconds(_STATUS_LATE_S) + 1
"""Seconds a result record is kept past its TTL, so that it goes after its completed status: kept one
second past it, it went first when a nats-server stall or election came between the two writes,
and a read found the request COMPLETED and its result gone (503; found by reviews). The status goes
first, and a read then finds no request (404). The record's object goes with the status (see
`names_any`): no read is directed to the record any more."""
BLOB_READ_S: Final = 60.0
"""The longest a read of one stored object may take (up to 32 MiB; a read took 0.5 s on a 2-core VM)."""

RECORD_INLINE_BYTES = 4096
"""Response bodies up to this size go in the status record (read with every status poll)."""


class ResultStore:
    def __init__(
        self, js: JetStreamContext, kv: KeyValue, blobs: ObjectStore, retention: Retention, inline_limit: int
    ) -> None:
        self._js = js
        self._kv = kv
        self._blobs = blobs
        self._retention = retention
        self._inline_limit = inline_limit
        self._prefix = f"$KV.{names.RESULTS_BUCKET}."

    async def keep(self, request_id: str, attempt: int, result: StoredResult, ttl_s: float) -> StoredResult | None:
        """Keep the answer of `attempt` for `ttl_s` seconds: a small one is returned, for the completed
        status record to carry (see `of`); a larger one is stored here, and None returned."""
        if len(result.body) <= RECORD_INLINE_BYTES:
            return result
        await self._put(request_id, attempt, result, ttl_s)
        return None

    async def _put(self, request_id: str, attempt: int, result: StoredResult, ttl_s: float) -> None:
        if len(result.body) > self._inline_limit:
            ref = names.result_object(request_id, attempt)
            # First: should this worker die uploading, the object is deleted all the same (its
            # chunks, should it die before the last, by the `BlobJanitor`).
            await self._retention.sweep_later(request_id, [ref], ttl_s)
            await self._blobs.put(ref, result.body)
            result = msgspec.structs.replace(result, body=b"", body_ref=ref)
        subject, payload = f"{self._prefix}{names.result_key(request_id, attempt)}", encode(result)
        # Putting the same result again changes nothing a reader sees.
        keep_s = ttl_seconds(ttl_s) + _OUTLIVES_STATUS_S
        await ride_through(partial(self._js.publish, subject, payload, msg_ttl=keep_s), "result write")

    async def of(self, record: StatusRecord) -> StoredResult | None:
        """The final response of the completed `record`: in it, or stored under its last attempt."""
        if record.result is not None:
            return record.result
        return await self.get(record.request_id, record.attempts)

    async def names_any(self, objects: list[str]) -> bool:
        """Whether one of `objects` may still be read: a result record names it, and the status record
        of its request, through which every read of a result goes, is still there. The sweep of a
        result's object is scheduled before the object and its record are written, so a slow upload
        or write made the record outlive its due time, and a read of the object as it went hung
        (found by a review): such a sweep waits for the record to go, or its status (the record is
        kept `_OUTLIVES_STATUS_S` past it)."""
        for name in objects:
            key = names.result_key_of_object(name)
            if key is None:
                continue
            try:
                await ride_through(partial(self._kv.get, key), "result read")
            except KeyNotFoundError:
                continue
            if await has_record(self._js, key.partition(".")[0]):
                return True
        return False

    async def get(self, request_id: str, attempt: int) -> StoredResult | None:
        try:
            key = names.result_key(request_id, attempt)
            entry = await ride_through(partial(self._kv.get, key), "result read")
        except KeyNotFoundError:
            return None
        if entry.value is None:  # pragma: no cover - a get never returns an empty put
            return None
        result = decode(entry.value, StoredResult)
        if result.body_ref is None:
            return result
        try:
            async with asyncio.timeout(BLOB_READ_S):
                stored = await self._blobs.get(result.body_ref)
        except NotFoundError:
            return None
        except TimeoutError:
            # nats-py reads an object's chunks with no time limit: one deleted during the read
            # held the result route for good (found by a review). It is gone, or unreadable now.
            log.warning("the result object %s could not be read within %g s", result.body_ref, BLOB_READ_S)
            return None
        return msgspec.structs.replace(result, body=stored.data or b"", body_ref=None)
