"""Provisioning is idempotent: a second start changes nothing; a changed setting is applied or explained."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytest
from nats.js import api

from jetspool.domain import names
from jetspool.domain.errors import ConfigError
from jetspool.jetstream.provision import ensure_function_consumers, provision

if TYPE_CHECKING:
    from jetspool.jetstream.connection import Nats

_STREAMS = (
    names.QUEUE_STREAM,
    names.CALLBACK_STREAM,
    names.COUNTER_STREAM,
    f"KV_{names.STATUS_BUCKET}",
    f"KV_{names.FUNCTIONS_BUCKET}",
    f"KV_{names.RESULTS_BUCKET}",
    f"OBJ_{names.BLOB_STORE}",
)


async def _snapshot(conn: Nats) -> dict[str, object]:
    configs: dict[str, object] = {}
    for stream in _STREAMS:
        info = await conn.js.stream_info(stream)
        configs[stream] = info.config.as_dict()
    for priority in names.PRIORITIES:
        consumer = names.queue_consumer("echo", priority)
        configs[consumer] = (await conn.js.consumer_info(names.QUEUE_STREAM, consumer)).config.as_dict()
    return configs


async def test_second_provisioning_changes_nothing(conn: Nats, caplog: pytest.LogCaptureFixture) -> None:
    await provision(conn, replicas=1)
    await ensure_function_consumers(conn.js, "echo", ack_wait_s=30.0)
    before = await _snapshot(conn)

    with caplog.at_level(logging.INFO, logger="jetspool.jetstream.provision"):
        await provision(conn, replicas=1)
        await ensure_function_consumers(conn.js, "echo", ack_wait_s=30.0)

    assert await _snapshot(conn) == before
    assert [r.getMessage() for r in caplog.records] == [], "nothing was created or updated the second time"


async def test_a_changed_ack_wait_is_applied_to_existing_consumers(
    conn: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    await provision(conn, replicas=1)
    await ensure_function_consumers(conn.js, "echo", ack_wait_s=30.0)

    with caplog.at_level(logging.INFO, logger="jetspool.jetstream.provision"):
        await ensure_function_consumers(conn.js, "echo", ack_wait_s=12.0)

    for priority in names.PRIORITIES:
        info = await conn.js.consumer_info(names.QUEUE_STREAM, names.queue_consumer("echo", priority))
        assert info.config.ack_wait == 12.0
    assert any("ack_wait" in r.getMessage() for r in caplog.records)


async def test_provisioning_keeps_what_is_stored(conn: Nats) -> None:
    stores = await provision(conn, replicas=1)
    await stores.functions.put("kept", b"{}")

    again = await provision(conn, replicas=1)

    assert (await again.functions.get("kept")).value == b"{}"


async def test_replicas_a_single_server_cannot_honour_stop_startup_naming_the_setting(conn: Nats) -> None:
    with pytest.raises(ConfigError, match=r"nats\.replicas"):
        await provision(conn, replicas=3)


async def test_streams_of_what_happened_are_flushed_asynchronously_on_one_replica(conn: Nats) -> None:
    """Events, log lines and counters skip the per-write fsync; what must happen keeps it."""
    await provision(conn, replicas=1)

    modes = {
        stream: (await conn.js.stream_info(stream)).config.persist_mode
        for stream in (names.EVENT_STREAM, names.LOG_STREAM, names.COUNTER_STREAM, names.QUEUE_STREAM)
    }
    modes[f"KV_{names.STATUS_BUCKET}"] = (await conn.js.stream_info(f"KV_{names.STATUS_BUCKET}")).config.persist_mode

    assert modes == {
        names.EVENT_STREAM: api.PersistMode.ASYNC,
        names.LOG_STREAM: api.PersistMode.ASYNC,
        names.COUNTER_STREAM: api.PersistMode.ASYNC,
        names.QUEUE_STREAM: None,
        f"KV_{names.STATUS_BUCKET}": None,
    }


async def test_a_stream_made_before_keeps_its_persist_mode(conn: Nats, caplog: pytest.LogCaptureFixture) -> None:
    """JetStream cannot change a stream's persist mode: an older deployment's stream stays as it is."""
    await conn.js.add_stream(
        api.StreamConfig(name=names.EVENT_STREAM, subjects=[names.EVENT_SUBJECTS], storage=api.StorageType.FILE)
    )

    with caplog.at_level(logging.INFO, logger="jetspool.jetstream.provision"):
        await provision(conn, replicas=1)

    assert (await conn.js.stream_info(names.EVENT_STREAM)).config.persist_mode is None
    assert f"stream {names.EVENT_STREAM} keeps persist mode None" in caplog.text


async def test_a_queue_stream_made_before_is_given_the_wake_up_republish(conn: Nats) -> None:
    """Workers of this version wait for the wake-ups the queue stream sends: an older deployment's
    stream, which sent none (its gateways published them), gets the republish at start."""
    await conn.js.add_stream(
        api.StreamConfig(
            name=names.QUEUE_STREAM,
            subjects=[names.QUEUE_SUBJECTS],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
        )
    )

    await provision(conn, replicas=1)
    woken = await conn.nc.subscribe(names.WAKE_SUBJECTS)
    await conn.js.publish(names.queue_subject("echo", "high"), b"{}")
    wake = await woken.next_msg(timeout=5)

    republish = (await conn.js.stream_info(names.QUEUE_STREAM)).config.republish
    assert republish is not None
    assert (republish.src, republish.dest, republish.headers_only) == (*names.WAKE_REPUBLISH, True)
    assert wake.subject == names.wake_subject("echo", "high")
    assert wake.data == b"", "headers only: the request's body does not travel twice"
