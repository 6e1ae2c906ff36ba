"""The status bucket: one record per request, every write fenced by compare-and-set.

`update` succeeds only if the record is still at the revision the writer read, so a stale
writer (a worker paused past its ack wait, a duplicate delivery) can never overwrite a newer
state; it gets `StaleStatus` and must read again. A completed record carries a per-key TTL up to
its `expires_at` (completion + the function's `result_ttl`), set again by every later write (a
callback's delivery state); records still waiting or running have none.

A request whose id derives from its queue message (`jetspool.domain.ids`) has no record until a
worker takes it: `get` then reads its message and answers the `IN_QUEUE` record it implies, at
revision 0 (or that of a delete marker left under its key), so that the first write to it (the
worker's start, a cancel) is a create, fenced like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from nats.js.errors import APIError, KeyNotFoundError, NotFoundError
from nats.js.kv import KV_OP

from jetspool.domain import ids, names
from jetspool.domain.errors import DecodeError, JetspoolError
from jetspool.domain.messages import QueuedRequest, decode
from jetspool.domain.status import StatusRecord, decode_status, ttl_seconds, utcnow
from jetspool.jetstream.ridethrough import ride_through

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

    from jetspool.jetstream.connection import Nats

_WRONG_LAST_SEQUENCE = (10071, 10164)


def _time_to_live(record: StatusRecord) -> int | None:
    """The TTL that has `record` go at its `expires_at`, for a write sent now (at each try: counted
    once before riding through, it had a record stored late, after a stall, live its whole TTL from
    then, past its result; found by a review)."""
    if record.expires_at is None:
        return None
    return ttl_seconds((record.expires_at - utcnow()).total_seconds())


class StaleStatus(JetspoolError):
    """The record changed since it was read."""


@dataclass(frozen=True, slots=True)
class Versioned:
    record: StatusRecord
    revision: int


class StatusStore:
    def __init__(self, conn: Nats, kv: KeyValue) -> None:
        self._js: JetStreamContext = conn.js
        self._kv = kv
        self._direct = conn.direct_reads
        self._prefix = f"$KV.{names.STATUS_BUCKET}."
        self._stream = f"KV_{names.STATUS_BUCKET}"

    async def create(self, record: StatusRecord) -> int:
        """Store the first record of a request; StaleStatus if the id is already taken.

        A delete marker in its place (an operator's `nats kv del`) is no record: the write names
        its revision. Naming revision 0, it was refused for good, and a worker taking the request
        read and created again without end (found by a review)."""
        try:
            return await self._write(record, 0)
        except StaleStatus:
            stored, marker = await self._stored(record.request_id)
            if stored is not None or not marker:
                raise
            return await self._write(record, marker)

    async def get(self, request_id: str) -> Versioned | None:
        """The request's record; for a derived id without one, the record its waiting message implies."""
        stored, marker = await self._stored(request_id)
        if stored is not None:
            return stored
        derived = ids.parse_derived(request_id)
        if derived is None:
            return None
        waiting = await self._waiting(request_id, *derived, revision=marker)
        # Taken (and its message acknowledged) between the two reads: the worker's record stands.
        return waiting if waiting is not None else (await self._stored(request_id))[0]

    async def _stored(self, request_id: str) -> tuple[Versioned | None, int]:
        """The stored record; else None and the revision of the delete marker in its place (0: none),
        which the first write must name: over a marker, a write naming revision 0 is refused for
        ever, and `change` re-read and retried it without end."""
        try:
            entry = await ride_through(partial(self._kv.get, request_id), "status read")
        except KeyNotFoundError as exc:
            return None, int(exc.entry.revision or 0) if exc.entry is not None else 0
        if entry.value is None:  # pragma: no cover - a get never returns an empty put
            return None, 0
        return Versioned(decode_status(entry.value), int(entry.revision or 0)), 0

    async def _waiting(self, request_id: str, seq: int, nonce: str, *, revision: int) -> Versioned | None:
        """The `IN_QUEUE` record of the derived-id request at queue sequence `seq`, if its message is there."""
        read = partial(self._js.get_msg, names.QUEUE_STREAM, seq=seq, direct=self._direct)
        try:
            msg = await ride_through(read, "queue read")
        except NotFoundError:
            return None
        try:
            request = decode(msg.data or b"", QueuedRequest)
        except DecodeError:
            return None
        if request.request_id or request.id_nonce != nonce:
            return None  # another request's message (the stream was recreated since)
        return Versioned(StatusRecord.waiting(request.identified(seq), seq), revision)

    async def update(self, record: StatusRecord, last: int) -> int:
        """Write `record` if the stored revision is still `last`; returns the new revision."""
        return await self._write(record, last)

    async def _write(self, record: StatusRecord, last: int) -> int:
        """Compare-and-set `record` over revision `last` (0: none), riding through a node loss.

        A write whose acknowledgement was lost may have landed: when its repeat is refused, the
        record is read from the stream leader, and if it holds exactly what we wrote, the write
        was ours."""
        subject, payload = f"{self._prefix}{record.request_id}", record.encode()
        headers = {names.NATS_EXPECTED_LAST_SUBJECT_SEQ: str(last)}
        tries = 0

        async def publish() -> int:
            nonlocal tries
            tries += 1
            ack = await self._js.publish(subject, payload, headers=headers, msg_ttl=_time_to_live(record))
            return int(ack.seq)

        try:
            return await ride_through(publish, "status write")
        except APIError as exc:
            if exc.err_code not in _WRONG_LAST_SEQUENCE:
                raise
            if tries > 1:
                landed = await self._landed(subject, payload)
                if landed is not None:
                    return landed
            raise StaleStatus(f"request {record.request_id} changed since revision {last}") from exc

    async def _landed(self, subject: str, payload: bytes) -> int | None:
        """The revision of the stored record if it is `payload`, read from the leader (a follower
        answering a direct get may not have it yet)."""
        try:
            stored = await ride_through(
                partial(self._js.get_msg, self._stream, subject=subject, direct=False), "status read"
            )
        except NotFoundError:
            return None
        return stored.seq if stored.data == payload else None

    async def change(
        self, current: Versioned, change: Callable[[StatusRecord], StatusRecord | None]
    ) -> Versioned | None:
        """Apply `change` to the record by compare-and-set, re-reading and re-applying on conflict.

        None when the record is gone or `change` declines (returns None).
        """
        while True:
            record = change(current.record)
            if record is None:
                return None
            try:
                revision = await self.update(record, current.revision)
            except StaleStatus:
                reread = await self.get(record.request_id)
                if reread is None:
                    return None
                current = reread
                continue
            return Versioned(record, revision)


async def has_record(js: JetStreamContext, request_id: str) -> bool:
    """Whether the status bucket holds a record of `request_id` (a delete marker is none), read from
    its stream's leader."""
    read = partial(js.get_msg, f"KV_{names.STATUS_BUCKET}", subject=f"$KV.{names.STATUS_BUCKET}.{request_id}")
    try:
        msg = await ride_through(read, "status read")
    except NotFoundError:
        return False
    return (msg.headers or {}).get(KV_OP) is None  # else a delete or purge marker
