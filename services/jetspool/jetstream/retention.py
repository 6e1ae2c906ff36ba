"""What a finished request leaves behind, and for how long.

- A request that ended in an error or was cancelled keeps its queued form (its envelope, in
  `jetspool-envelopes`, for the function's `result_ttl`) and its out-of-line body, so the retry
  route can run it again under the same id.
- A request that succeeded cannot be retried: its out-of-line body is deleted at once.
- Out-of-line results, and bodies kept for a retry, are deleted by a sweep job on the timers
  stream when their time is up; JetStream holds the job until then (see `worker/timers.py`).
"""

from __future__ import annotations

import contextlib
from base64 import urlsafe_b64encode
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Final

from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.object_store import OBJ_META_PRE_TEMPLATE

from jetspool.domain import names
from jetspool.domain.messages import QueuedRequest, SweepJob, decode, encode
from jetspool.domain.status import ttl_seconds, utcnow
from jetspool.jetstream.ridethrough import ride_through

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore


_SWEEP_AFTER_S: Final = 1.0
"""How long an object outlives the records naming it (their TTLs are whole seconds, written a few
milliseconds apart)."""


class Retention:
    def __init__(self, js: JetStreamContext, envelopes: KeyValue, blobs: ObjectStore) -> None:
        self._js = js
        self._envelopes = envelopes
        self._blobs = blobs
        self._prefix = f"$KV.{names.ENVELOPE_BUCKET}."

    async def keep_for_retry(self, request: QueuedRequest, ttl_s: float) -> None:
        """Keep what the retry route needs to run `request` again, for `ttl_s` seconds."""
        await self.keep_envelope(request, ttl_s)
        await self.sweep_body_later(request, ttl_s)

    async def keep_envelope(self, request: QueuedRequest, ttl_s: float) -> None:
        """Keep the queued form of `request` for the retry route, for `ttl_s` seconds."""
        await self._js.publish(f"{self._prefix}{request.request_id}", encode(request), msg_ttl=ttl_seconds(ttl_s))

    async def sweep_body_later(self, request: QueuedRequest, ttl_s: float) -> None:
        """Delete the out-of-line body of `request`, which has ended, in `ttl_s` seconds, unless retried."""
        if request.body_ref is not None:
            await self.sweep_later(request.request_id, [request.body_ref], ttl_s, unless_retried_after=request.retry)

    async def envelope(self, request_id: str) -> QueuedRequest | None:
        """The queued form of a failed or cancelled request, while it is kept."""
        try:
            # Ridden through as the route's other reads are: during an election of the bucket's
            # leader the retry route answered 503 (found by a cluster audit).
            entry = await ride_through(partial(self._envelopes.get, request_id), "envelope read")
        except KeyNotFoundError:
            return None
        return decode(entry.value or b"", QueuedRequest)

    async def release_body(self, request: QueuedRequest) -> None:
        """Delete the out-of-line body of a request that can never run again."""
        if request.body_ref is not None:
            await self.delete([request.body_ref])

    async def sweep_later(
        self, request_id: str, objects: list[str], after_s: float, *, unless_retried_after: int | None = None
    ) -> None:
        """Have `objects` deleted in `after_s` seconds, rounded up as the records' time to live is,
        and `_SWEEP_AFTER_S` more: an object goes after the records that name it, so that a read
        never finds a record whose object is gone (see `SweepJob` for `unless_retried_after`)."""
        job = SweepJob(
            request_id=request_id,
            objects=objects,
            due_at=utcnow() + timedelta(seconds=ttl_seconds(after_s) + _SWEEP_AFTER_S),
            unless_retried_after=unless_retried_after,
        )
        msg_id = f"sweep.{request_id}.{objects[0]}.{unless_retried_after}"  # a repeat schedules nothing twice
        await self._js.publish(names.SWEEP_SUBJECT, encode(job), headers={names.NATS_MSG_ID: msg_id})

    async def delete(self, objects: list[str]) -> None:
        for name in objects:
            with contextlib.suppress(NotFoundError):
                await self._blobs.delete(name)
            # nats-py's delete leaves a "deleted" record in place of the object's data, which is
            # never removed: one per large body or result (a soak run counted 410 and nothing else).
            meta = OBJ_META_PRE_TEMPLATE.format(bucket=names.BLOB_STORE, obj=urlsafe_b64encode(name.encode()).decode())
            await self._js.purge_stream(names.BLOB_STREAM, subject=meta)
