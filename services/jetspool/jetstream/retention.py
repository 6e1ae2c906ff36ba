"""What a finished request leaves behind, and for how long.

- A request that ended in an error or was cancelled keeps its queued form (its envelope, in
  `jetspool-envelopes`, for the function's `result_ttl`) and its out-of-line body, so the retry
  route can run it again under the same id.
- A request that succeeded cannot be retried: its out-of-line body is deleted at once.
- Out-of-line results, and bodies kept for a retry, are deleted by a sweep job on the timers
  stream when their time is up; JetStream holds the job until then (see `worker/timers.py`).
- What a process killed, or a submit refused, in the middle of storing leaves in the object store
  (an upload's chunks, a body whose request was never queued) is removed by `BlobJanitor`, which
  every worker runs every half hour or so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import orjson
from nats.js.api import ObjectMeta
from nats.js.errors import APIError, KeyNotFoundError, NotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_META_PRE_TEMPLATE

from jetspool.aio import Periodic
from jetspool.domain import names
from jetspool.domain.errors import DecodeError
from jetspool.domain.messages import QueuedRequest, SweepJob, decode, encode
from jetspool.domain.status import ttl_seconds, utcnow
from jetspool.jetstream.ridethrough import ride_through
from jetspool.jetstream.status_store import has_record

if TYPE_CHECKING:
    from nats.js.api import ObjectInfo, RawStreamMsg
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore

    from jetspool.jetstream.connection import Nats

log = logging.getLogger(__name__)


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


ORPHANED_AFTER_S: Final = 600.0
"""The longest an upload may stand still, and a request's publish may follow the upload of its body
(a 32 MiB upload stores a chunk every few milliseconds; a publish rides through a node loss for
30 s): chunks no object names that were stored longer ago, and a body whose request was not queued
within this long of its upload, are left over."""
CLEAN_EVERY_S: Final = 1800.0
"""How often, on average, each worker looks for what is left over in the object store (a pass reads
every object's meta: with 100,000 objects, some 40 s of one worker's reads)."""
_STREAM_INFO: Final = f"$JS.API.STREAM.INFO.{names.BLOB_STREAM}"
_BODY_METAS: Final = OBJ_META_PRE_TEMPLATE.format(
    bucket=names.BLOB_STORE, obj=urlsafe_b64encode(names.body_object("").encode()).decode()[:6]
)
"""How the meta subject of every request body begins (its name, base64, begins `body-`), with a few more."""
_API_TIMEOUT_S: Final = 5.0
_SPREAD: Final = random.Random()  # noqa: S311 - spreads the workers' passes apart; nothing secret


def body_meta(ref: str, request: QueuedRequest, queued_after: int, earlier: ObjectInfo | None) -> ObjectMeta:
    """The meta of the out-of-line body `ref` of `request`: the subject its message goes to, and the
    queue stream's last sequence before the upload, so that `BlobJanitor` can look for the message.
    `earlier`: the body stored before under the same name (an Idempotency-Key's repeat), whose
    message, queued after the sequence it names, may be the request's. (Header values are lists,
    as NATS's other clients write and read object headers.)"""
    if earlier is not None:
        queued_after = min(queued_after, _queued_after(earlier.headers or {}))
    headers = {
        names.OBJ_FUNCTION: [request.function],
        names.OBJ_PRIORITY: [request.priority],
        names.OBJ_QUEUED_AFTER: [str(queued_after)],
    }
    return ObjectMeta(name=ref, headers=headers)


def _header(headers: dict[str, Any], key: str) -> str | None:
    value = headers.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def _queued_after(headers: dict[str, Any]) -> int:
    """The sequence a body's meta says its request was queued after (0: it does not say)."""
    value = _header(headers, names.OBJ_QUEUED_AFTER)
    return int(value) if value is not None and value.isdigit() else 0


@dataclass(frozen=True, slots=True)
class _Meta:
    """The meta message of one object, as stored."""

    subject: str
    seq: int
    stored_at: datetime
    name: str
    nuid: str
    deleted: bool
    headers: dict[str, Any]

    @classmethod
    def of(cls, msg: RawStreamMsg) -> _Meta:
        info = json.loads(msg.data or b"")
        headers = info.get("headers")
        return cls(
            subject=str(msg.subject),
            seq=int(msg.seq or 0),
            stored_at=msg.time or utcnow(),
            name=str(info["name"]),
            nuid=str(info.get("nuid") or ""),
            deleted=bool(info.get("deleted")),
            headers=headers if isinstance(headers, dict) else {},
        )

    def queue_subject(self) -> str:
        """The subject the message of this body's request was published to (all of them, when the
        body was stored by a gateway that did not say)."""
        function, priority = _header(self.headers, names.OBJ_FUNCTION), _header(self.headers, names.OBJ_PRIORITY)
        for known in names.PRIORITIES:
            if function and priority == known:
                return names.queue_subject(function, known)
        return names.QUEUE_SUBJECTS

    def queued_after(self) -> int:
        return _queued_after(self.headers)


class BlobJanitor(Periodic):
    """Removes from the object store what no request can ever read, left over by a process killed, or
    a submit refused, while storing it. Every worker runs a pass every `CLEAN_EVERY_S` or so; passes
    at once remove the same things. Each removal is decided on what can no longer change:

    - Chunks that no object's meta names, the last stored over `ORPHANED_AFTER_S` ago: an upload
      that never finished. nats-py stores an object's chunks under a random id and its meta, naming
      that id, after the last chunk; a worker killed uploading a large result, or a gateway a large
      body, left the chunks for good (found by a review). An upload in progress stores a chunk
      every few milliseconds; a finished one is named by its meta.
    - A request body stored over `ORPHANED_AFTER_S` ago whose request has neither a status record
      nor a message in the queue: the request was never queued (the gateway died between the
      upload and the publish, or the publish was refused), or it ended long ago. A waiting request
      has its message (its status record may not be written yet: the gateway writes it after the
      publish); one running, ended, or kept for the retry route, its status record. Results are
      left to their sweep jobs, scheduled before their upload.
    - The meta a deleted object leaves in its place, where the delete stopped before removing it.

    What is removed is the version that was looked at: the chunks under its id, and its meta up to
    its sequence; a body uploaded again under the same name meanwhile stays.
    """

    name = "blob-janitor"
    failed = f"could not clean the object store {names.BLOB_STORE}; trying again later"

    def __init__(
        self,
        conn: Nats,
        *,
        every_s: float = CLEAN_EVERY_S,
        orphaned_after_s: float = ORPHANED_AFTER_S,
    ) -> None:
        super().__init__()
        self._nc = conn.nc
        self._js = conn.js
        self._every_s = every_s
        self.retry_s = every_s
        self._orphaned_after = timedelta(seconds=orphaned_after_s)
        self._started = False

    async def turn(self) -> float:
        if self._started:  # not at once: workers started together, or restarting in a loop, read every meta
            await self.clean()
        self._started = True
        return self._every_s * _SPREAD.uniform(0.5, 1.5)

    async def clean(self) -> int:
        """One pass; returns how many uploads and objects it removed.

        Ages are told by nats-server's clock, the one that stamped what is judged: by the worker's, a
        worker whose clock ran ahead removed the chunks of a body being stored (found by a review).
        Chunks are removed only on a listing of every meta in one answer, which nats-server gives at
        one moment: page by page, a meta deleted between two pages moved another out of both, and
        a live object's chunks went as named by none (found by a review). Past one answer (100,000
        objects) chunks are left for a later pass; bodies need no such listing (one missed waits)."""
        chunk_subjects, now, _ = await self._listing(names.BLOB_CHUNK_SUBJECTS)  # before the metas
        meta_subjects, _, at_once = await self._listing(names.BLOB_META_SUBJECTS)
        if not at_once:  # no chunks removed this pass: only the bodies' metas are worth reading
            meta_subjects = [subject for subject in meta_subjects if subject.startswith(_BODY_METAS)]
        metas, readable = await self._metas(meta_subjects)
        removed = 0
        if at_once and readable:
            named = {meta.nuid for meta in metas if not meta.deleted}
            for subject in chunk_subjects:
                if subject.rpartition(".")[2] not in named and await self._still(subject, now):
                    log.info("removing the chunks of an upload that never finished (%s)", subject)
                    await self._purge(subject)
                    removed += 1
        for meta in metas:
            if await self._left_over(meta, now):
                log.info("removing the object %s: nothing can read it any more", meta.name)
                if meta.nuid:
                    await self._purge(OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=names.BLOB_STORE, obj=meta.nuid))
                await self._purge(meta.subject, upto=meta.seq)
                removed += 1
        return removed

    async def _listing(self, subjects: str) -> tuple[list[str], datetime, bool]:
        """Every subject of the object store's stream matching `subjects`, page by page (nats-server
        lists up to 100,000 in an answer, and nats-py reads the first only); nats-server's time at
        the first answer; whether one answer held them all."""
        found: dict[str, int] = {}
        now: datetime | None = None
        pages = 0
        while True:
            query = orjson.dumps({"subjects_filter": subjects, "offset": len(found)})
            reply = await self._nc.request(_STREAM_INFO, query, timeout=_API_TIMEOUT_S)
            answer = orjson.loads(reply.data)
            if "error" in answer:
                APIError.from_error(answer["error"])  # raises
            if now is None:
                now = datetime.fromisoformat(str(answer["ts"]))
            page = answer["state"].get("subjects") or {}
            pages += 1
            found.update(page)
            if not page or len(found) >= int(answer.get("total", 0)):
                return list(found), now, pages == 1

    async def _metas(self, subjects: list[str]) -> tuple[list[_Meta], bool]:
        """The meta on each of `subjects`, read from the stream's leader; whether every one could be
        read (the chunks an unreadable one names cannot be told from an upload cut short)."""
        metas, readable = [], True
        for subject in subjects:
            try:
                msg = await self._js.get_msg(names.BLOB_STREAM, subject=subject)
            except NotFoundError:
                continue  # removed meanwhile
            try:
                metas.append(_Meta.of(msg))
            except (ValueError, KeyError, TypeError):
                log.warning("the object meta on %s cannot be read; no chunks are removed this pass", subject)
                readable = False
        return metas, readable

    def _old(self, at: datetime | None, now: datetime) -> bool:
        return at is not None and now - at > self._orphaned_after

    async def _still(self, chunks: str, now: datetime) -> bool:
        """Whether nothing was stored on the chunk subject `chunks` for `ORPHANED_AFTER_S` by `now`."""
        try:
            last = await self._js.get_msg(names.BLOB_STREAM, subject=chunks)
        except NotFoundError:
            return False  # removed meanwhile
        return self._old(last.time, now)

    async def _left_over(self, meta: _Meta, now: datetime) -> bool:
        if not self._old(meta.stored_at, now):
            return False
        if meta.deleted:
            return True
        request_id = names.request_of_body_object(meta.name)
        if request_id is None:
            return False  # a result: its sweep job deletes it after its record
        # The status is read again after the queue: a worker writes it before it acknowledges (and so
        # removes) the message, and the request might have been taken between the first two reads.
        return not (
            await has_record(self._js, request_id)
            or await self._queued(request_id, meta)
            or await has_record(self._js, request_id)
        )

    async def _queued(self, request_id: str, meta: _Meta) -> bool:
        """Whether the queue holds a message of `request_id`: one stored after the body's upload
        began and before `ORPHANED_AFTER_S` had passed since its end."""
        subject, seq = meta.queue_subject(), meta.queued_after() + 1
        stored_by = meta.stored_at + self._orphaned_after
        while True:
            try:
                msg = await self._js.get_msg(names.QUEUE_STREAM, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return False
            if msg.time is not None and msg.time > stored_by:
                return False
            try:
                if decode(msg.data or b"", QueuedRequest).request_id == request_id:
                    return True
            except DecodeError:
                pass
            seq = int(msg.seq or seq) + 1

    async def _purge(self, subject: str, upto: int | None = None) -> None:
        """Remove the messages on `subject` (up to sequence `upto`)."""
        await self._js.purge_stream(names.BLOB_STREAM, subject=subject, seq=None if upto is None else upto + 1)
