"""Idempotent provisioning of every stream, bucket, object store and consumer.

Every component calls `provision` at start: a second start, or a second gateway, changes
nothing; a changed setting (replicas, ack wait) is applied with a log line naming it, and
one the server cannot apply stops start-up with a message naming the setting.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from nats.js import api
from nats.js.errors import APIError, NotFoundError

from jetspool.domain import names
from jetspool.domain.errors import ConfigError
from jetspool.jetstream.logs import MAX_LINES as MAX_LOG_LINES
from jetspool.jetstream.positions import consumer_figures
from jetspool.jetstream.ridethrough import is_transient, ride_through
from jetspool.settings import EventSettings

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore

    from jetspool.jetstream.connection import Nats

log = logging.getLogger(__name__)

_KV_PREFIX = "KV_"
_DUPLICATE_WINDOW_S = 120.0
_MAX_ACK_PENDING = 20_000
_MAX_TIMERS = 1_000_000
"""Every pending timer is a delayed nak holding an ack-pending slot."""
_LOG_MAX_AGE_S = 7 * 86400.0
_CANNOT_PLACE = frozenset({10005, 10023, 10074})
"""No suitable peers for placement, insufficient resources, replicas > 1 on a single server."""


@dataclass(frozen=True, slots=True)
class Stores:
    """Handles on the provisioned buckets and object store."""

    status: KeyValue
    functions: KeyValue
    results: KeyValue
    idempotency: KeyValue
    envelopes: KeyValue
    blobs: ObjectStore


async def provision(conn: Nats, replicas: int, events: EventSettings | None = None) -> Stores:
    """Create or reconcile every stream and bucket jetspool uses; return handles on the buckets."""
    js = conn.js
    await ensure_stream(js, _event_stream(replicas, events or EventSettings()))
    await ensure_stream(js, _queue_stream(replicas))
    await ensure_stream(js, _callback_stream(replicas))
    await ensure_stream(js, _timer_stream(replicas))
    await ensure_stream(js, _log_stream(replicas))
    await _ensure_consumer(
        js, names.TIMER_STREAM, _work_consumer(names.TIMER_CONSUMER, names.TIMER_SUBJECTS, 30.0, _MAX_TIMERS)
    )
    await ensure_stream(js, _counter_stream(replicas))
    await ensure_callback_consumer(js)
    status_changes = api.RePublish(src=f"$KV.{names.STATUS_BUCKET}.>", dest=names.STATUS_CHANGE_SUBJECTS)
    await ensure_stream(js, _kv_stream(names.STATUS_BUCKET, replicas, republish=status_changes))
    for bucket in (names.FUNCTIONS_BUCKET, names.RESULTS_BUCKET, names.IDEMPOTENCY_BUCKET, names.ENVELOPE_BUCKET):
        await ensure_stream(js, _kv_stream(bucket, replicas))
    blobs = await _ensure_object_store(js, replicas)
    return Stores(
        status=await js.key_value(names.STATUS_BUCKET),
        functions=await js.key_value(names.FUNCTIONS_BUCKET),
        results=await js.key_value(names.RESULTS_BUCKET),
        idempotency=await js.key_value(names.IDEMPOTENCY_BUCKET),
        envelopes=await js.key_value(names.ENVELOPE_BUCKET),
        blobs=blobs,
    )


async def ensure_function_consumers(js: JetStreamContext, function: str, ack_wait_s: float) -> None:
    """One durable pull consumer per priority class of `function` (non-overlapping WorkQueue filters)."""
    for priority in names.PRIORITIES:
        consumer = _work_consumer(
            names.queue_consumer(function, priority),
            names.queue_subject(function, priority),
            ack_wait_s,
            _MAX_ACK_PENDING,
            max_waiting=512,
        )
        await _ensure_consumer(js, names.QUEUE_STREAM, consumer)


async def drop_idle_function_consumers(js: JetStreamContext, function: str) -> None:
    """Delete the consumers of an unregistered `function` when none holds a request, waiting or in
    flight. Kept, they stayed for good: three per function name ever deleted, each with its
    subscriptions on the server. With requests left, they stay, and the requests run if the
    function is registered again (a request queued after the check waits in the stream for that)."""
    for priority in names.PRIORITIES:
        waiting, in_flight = await consumer_figures(js, function, priority)
        if waiting or in_flight:
            return
    for priority in names.PRIORITIES:
        delete = partial(js.delete_consumer, names.QUEUE_STREAM, names.queue_consumer(function, priority))
        with contextlib.suppress(NotFoundError):
            await ride_through(delete, "consumer delete")


async def ensure_callback_consumer(js: JetStreamContext) -> None:
    consumer = _work_consumer(names.CALLBACK_CONSUMER, names.CALLBACK_SUBJECTS, 60.0, _MAX_ACK_PENDING)
    await _ensure_consumer(js, names.CALLBACK_STREAM, consumer)


def _work_consumer(
    durable: str, filter_subject: str, ack_wait_s: float, max_ack_pending: int, max_waiting: int | None = None
) -> api.ConsumerConfig:
    """A durable pull consumer whose acknowledgements we decide: explicit acks, no delivery limit."""
    return api.ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        max_waiting=max_waiting,
    )


def _queue_stream(replicas: int) -> api.StreamConfig:
    return _work_queue_stream(
        names.QUEUE_STREAM,
        names.QUEUE_SUBJECTS,
        "jetspool: requests waiting for a worker, one subject per function and priority",
        replicas,
        allow_direct=True,
        republish=api.RePublish(src=names.WAKE_REPUBLISH[0], dest=names.WAKE_REPUBLISH[1], headers_only=True),
    )


def _callback_stream(replicas: int) -> api.StreamConfig:
    return _work_queue_stream(
        names.CALLBACK_STREAM, names.CALLBACK_SUBJECTS, "jetspool: callbacks waiting for delivery", replicas
    )


def _log_stream(replicas: int) -> api.StreamConfig:
    return api.StreamConfig(
        name=names.LOG_STREAM,
        description="jetspool: log lines of requests, one subject per request",
        subjects=[names.LOG_SUBJECTS],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        persist_mode=_observational(replicas),
        max_age=_LOG_MAX_AGE_S,
        max_msgs_per_subject=MAX_LOG_LINES,
        allow_direct=True,
        duplicate_window=_DUPLICATE_WINDOW_S,
    )


def _observational(replicas: int) -> api.PersistMode | None:
    """The persist mode of streams that record what happened (events, log lines, counters) rather
    than what must happen: on one replica they are flushed asynchronously (ADR-56), so they do
    not wait for an fsync per write even under `sync_interval: always`. A power loss may take
    their last moments; the queue, status, results and callbacks keep fsyncing every write."""
    return api.PersistMode.ASYNC if replicas == 1 else None


def _timer_stream(replicas: int) -> api.StreamConfig:
    return _work_queue_stream(
        names.TIMER_STREAM,
        names.TIMER_SUBJECTS,
        "jetspool: timers (start deadlines, object sweeps), held back by delayed naks until due",
        replicas,
    )


def _work_queue_stream(
    name: str,
    subjects: str,
    description: str,
    replicas: int,
    *,
    allow_direct: bool | None = None,
    republish: api.RePublish | None = None,
) -> api.StreamConfig:
    """A stream whose messages are removed once a worker acknowledges them."""
    return api.StreamConfig(
        name=name,
        description=description,
        subjects=[subjects],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=_DUPLICATE_WINDOW_S,
        allow_direct=allow_direct,
        republish=republish,
    )


def _event_stream(replicas: int, settings: EventSettings) -> api.StreamConfig:
    return api.StreamConfig(
        name=names.EVENT_STREAM,
        description="jetspool: every status change of every request, for subscribers to follow and replay",
        subjects=[names.EVENT_SUBJECTS],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        persist_mode=_observational(replicas),
        max_age=settings.max_age,
        max_bytes=settings.max_bytes,
        duplicate_window=_DUPLICATE_WINDOW_S,
        allow_direct=True,
    )


def _counter_stream(replicas: int) -> api.StreamConfig:
    return api.StreamConfig(
        name=names.COUNTER_STREAM,
        description="jetspool: per-function totals (completed, failed)",
        subjects=[names.COUNTER_SUBJECTS],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        persist_mode=_observational(replicas),
        allow_msg_counter=True,
        # Every increment stays for the duplicate window (then `stats.CounterTrim` removes it): after a
        # restart nats-server knows only the message ids of the messages it still holds, and kept to one
        # message per subject, a count sent again after a restart counted twice.
        max_msgs_per_subject=-1,
        duplicate_window=_DUPLICATE_WINDOW_S,
        allow_direct=True,
    )


def _kv_stream(bucket: str, replicas: int, republish: api.RePublish | None = None) -> api.StreamConfig:
    """The stream behind a KV bucket, as nats-py's `create_key_value` builds it, with per-key TTLs allowed.

    On a cluster, direct gets are off, so every read is answered by the stream leader: a direct
    get may be answered by a replica that has not applied the latest write yet, and a client
    would see a completed request as still waiting (on three nodes with one restarting, 6.5% of
    reads right after a write were stale; none from the leader)."""
    return api.StreamConfig(
        name=f"{_KV_PREFIX}{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        discard=api.DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=replicas == 1,
        allow_msg_ttl=True,
        duplicate_window=_DUPLICATE_WINDOW_S,
        max_consumers=-1,
        max_msgs=-1,
        republish=republish,
    )


async def ensure_stream(js: JetStreamContext, desired: api.StreamConfig) -> None:
    """Create `desired`, or bring an existing stream in line with it, or explain why not."""
    assert desired.name is not None  # noqa: S101 - every config above names its stream
    try:
        info = await js.stream_info(desired.name)
    except NotFoundError:
        await _apply(js.add_stream, desired, "create")
        log.info("created stream %s", desired.name)
        return
    await _reconcile(js, info, desired)


async def _reconcile(js: JetStreamContext, info: api.StreamInfo, desired: api.StreamConfig) -> None:
    """Bring the existing stream `info` in line with `desired`, or explain why not."""
    if info.config.persist_mode == api.PersistMode.ASYNC and (desired.num_replicas or 1) > 1:
        raise ConfigError(
            f"nats.replicas: {desired.num_replicas}: stream {desired.name} was created for one server, flushed "
            "asynchronously, and JetStream cannot replicate such a stream. It only keeps history "
            f"({info.config.description}): remove it (nats stream rm {desired.name}) and start again to "
            f"have it recreated with {desired.num_replicas} replicas."
        )
    if info.config.persist_mode != desired.persist_mode:
        # JetStream cannot change it on an existing stream: keep the stream's own.
        log.info("stream %s keeps persist mode %s (recreate it to change that)", desired.name, info.config.persist_mode)
        desired = replace(desired, persist_mode=info.config.persist_mode)
    changes = _differences(info.config, desired)
    if changes:
        await _apply(js.update_stream, desired, "update")
        log.info("updated stream %s: %s", desired.name, ", ".join(changes))


async def _apply(call: Any, config: api.StreamConfig, verb: str) -> None:
    try:
        await call(config)
    except APIError as exc:
        if is_transient(exc):
            raise  # the cluster is between leaders: provisioning is tried again
        detail = exc.description or str(exc)
        if getattr(exc, "err_code", None) in _CANNOT_PLACE or "replica" in detail.lower():
            detail += (
                f" (nats.replicas: {config.num_replicas} needs a JetStream cluster with at least "
                f"{config.num_replicas} servers up; lower it, or start or add servers)"
            )
        raise ConfigError(f"cannot {verb} stream {config.name}: {detail}") from exc


def _differences(current: api.StreamConfig, desired: api.StreamConfig) -> list[str]:
    """Settings of `desired` that `current` does not have, as `field: old -> new`."""
    changes = []
    for field, wanted in desired.as_dict().items():
        if field in {"name", "description"}:
            continue
        have = current.as_dict().get(field)
        if have != wanted:
            changes.append(f"{field}: {have!r} -> {wanted!r}")
    return changes


async def _ensure_consumer(js: JetStreamContext, stream: str, desired: api.ConsumerConfig) -> None:
    assert desired.durable_name is not None  # noqa: S101
    try:
        info = await js.consumer_info(stream, desired.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, desired)
        log.info("created consumer %s on %s", desired.durable_name, stream)
        return
    have = info.config.as_dict()
    changes = [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in desired.as_dict().items() if have.get(k) != v]
    if changes:
        # add_consumer with the same durable name updates the mutable settings in place.
        await js.add_consumer(stream, desired)
        log.info("updated consumer %s: %s", desired.durable_name, ", ".join(changes))


async def _ensure_object_store(js: JetStreamContext, replicas: int) -> ObjectStore:
    try:
        store = await js.object_store(names.BLOB_STORE)
    except NotFoundError:
        return await js.create_object_store(
            names.BLOB_STORE,
            config=api.ObjectStoreConfig(
                description="jetspool: bodies and results too large for one message",
                storage=api.StorageType.FILE,
                replicas=replicas,
            ),
        )
    stream = await js.stream_info(names.BLOB_STREAM)
    await _reconcile(js, stream, replace(stream.config, num_replicas=replicas))
    return store
