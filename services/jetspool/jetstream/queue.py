"""The queue stream: putting a request on it durably, and waking idle workers."""

from __future__ import annotations

import asyncio
import uuid
from functools import partial
from typing import TYPE_CHECKING

import msgspec
from nats.js.errors import NotFoundError

from jetspool import tracing
from jetspool.domain import names
from jetspool.domain.messages import DeadlineJob, QueuedRequest, encode
from jetspool.jetstream.results import BLOB_READ_S
from jetspool.jetstream.retention import body_meta
from jetspool.jetstream.ridethrough import ride_through

if TYPE_CHECKING:
    from nats.js.object_store import ObjectStore

    from jetspool.jetstream.connection import Nats


class RequestQueue:
    def __init__(self, conn: Nats, blobs: ObjectStore) -> None:
        self._conn = conn
        self._blobs = blobs

    async def enqueue(self, request: QueuedRequest) -> int:
        """Store `request` on its function's queue subject; returns once JetStream acknowledged it.

        A body too large for one message is written to the object store first (`_store_body`),
        named after the request id (a request whose id derives from its message has its body
        inline). The stream sequence is returned. The message id is the request id, or for a
        derived one its nonce (a run of the retry route adds a nonce), so a repeated publish inside
        the duplicate window stores nothing twice.
        """
        key = request.request_id or f"n{request.id_nonce}"
        if not self.fits(request.body):
            if not request.request_id:
                raise ValueError("a body stored out of line needs the request id before the message")
            ref = names.body_object(request.request_id)
            await self._store_body(ref, request)
            request = msgspec.structs.replace(request, body=b"", body_ref=ref)
        subject, payload = names.queue_subject(request.function, request.priority), encode(request)
        msg_id = key if request.retry == 0 else f"{key}.retry.{uuid.uuid4().hex}"
        headers = tracing.inject({names.NATS_MSG_ID: msg_id})  # the request's trace goes with it
        # Stored or not, a repeat with the same message id stores it exactly once.
        ack = await ride_through(partial(self._conn.js.publish, subject, payload, headers=headers), "enqueue")
        return int(ack.seq)

    async def _store_body(self, ref: str, request: QueuedRequest) -> None:
        """Upload the body of `request` as object `ref`, its meta saying where the request's message
        goes and after which queue sequence: should the message never be stored (this gateway dies
        before the publish, or it is refused), a worker's `BlobJanitor` finds the body without a
        request and removes it. Until then nothing else would: it was there for good (found by a
        review)."""
        info = await ride_through(partial(self._conn.js.stream_info, names.QUEUE_STREAM), "queue read")
        try:  # an Idempotency-Key's repeat stores its body again under the same name
            earlier = await ride_through(partial(self._blobs.get_info, ref), "object read")
        except NotFoundError:
            earlier = None
        await self._blobs.put(ref, request.body, meta=body_meta(ref, request, int(info.state.last_seq), earlier))

    @property
    def envelope_limit(self) -> int:
        """Most bytes a queue message may hold beside the body (headers, query, path, callback URLs):
        a quarter of NATS's max_payload. An inline body takes up to half of it, two thirds once
        base64-encoded, so a request within both limits fits in one message."""
        return int(self._conn.nc.max_payload) // 4

    def fits(self, body: bytes) -> bool:
        """Whether `body` travels inside the queue message (else in the object store)."""
        return len(body) <= self._conn.inline_limit

    async def set_deadline(self, job: DeadlineJob) -> None:
        """Arm the start deadline of a queued request (the worker also checks it on receipt)."""
        msg_id = f"{job.request_id}.deadline" + (f".retry{job.retry}" if job.retry else "")
        publish = partial(
            self._conn.js.publish, names.DEADLINE_SUBJECT, encode(job), headers={names.NATS_MSG_ID: msg_id}
        )
        await ride_through(publish, "timer")

    async def load_body(self, request: QueuedRequest) -> bytes:
        """The request's body, read from the object store when it was stored out of line."""
        if request.body_ref is None:
            return request.body
        async with asyncio.timeout(BLOB_READ_S):  # nats-py's read of an object deleted meanwhile never ends
            stored = await self._blobs.get(request.body_ref)
        return stored.data or b""
