"""Status-change events (SPEC §6): every change published on jetspool.events.<function>.<type>,
into a stream subscribers can replay; every payload validates against schemas/."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import orjson
import pytest
from nats.js.api import DeliverPolicy

from jetspool.domain import names
from tests.support.servers import Reply, eventually
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.msg import Msg

    from jetspool.embedded import EmbeddedNats
    from jetspool.jetstream.connection import Nats
    from tests.support.stack import Stack

EVENT_SCHEMA = orjson.loads((Path(__file__).resolve().parents[1] / "schemas" / "status-event.schema.json").read_bytes())


class Listener:
    """A nats-py subscriber on every event subject, as a user would write it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def on_event(self, msg: Msg) -> None:
        self.events.append((msg.subject, orjson.loads(msg.data)))

    def of(self, request_id: str) -> list[str]:
        return [event["type"] for _, event in self.events if event["request_id"] == request_id]

    async def wait_for(self, request_id: str, last: str) -> list[str]:
        await eventually(lambda: last in self.of(request_id))
        return self.of(request_id)


@pytest.fixture
async def listener(conn: Nats) -> AsyncIterator[Listener]:
    found = Listener()
    sub = await conn.nc.subscribe(names.EVENT_SUBJECTS, cb=found.on_event)
    yield found
    await sub.unsubscribe()


def _check(events: list[tuple[str, dict[str, Any]]]) -> None:
    for subject, event in events:
        jsonschema.validate(event, EVENT_SCHEMA, cls=jsonschema.Draft202012Validator)
        assert subject == names.event_subject(event["function"], event["type"])


async def test_a_request_is_queued_started_and_succeeded(stack: Stack, listener: Listener) -> None:
    await stack.register("echo")
    request_id = await stack.submit("echo", content=b'{"answer": 42}', headers={"Content-Type": "application/json"})

    types = await listener.wait_for(request_id, "succeeded")

    assert types == ["queued", "started", "succeeded"]
    _check(listener.events)
    succeeded = next(e for _, e in listener.events if e["type"] == "succeeded")
    assert succeeded["result"] == {"answer": 42}
    assert succeeded["status"]["status"] == "COMPLETED"
    assert succeeded["status"]["request_id"] == request_id
    started = next(e for _, e in listener.events if e["type"] == "started")
    assert (started["status"]["status"], started["status"]["attempts"]) == ("IN_PROGRESS", 1)


async def test_each_event_is_stamped_with_the_time_of_its_change(stack: Stack, listener: Listener) -> None:
    """`queued` is stamped when the gateway took the request: a worker may start and finish the
    request before the gateway's event goes out, and a publish-time stamp came after theirs."""
    await stack.register("echo")
    request_id = await stack.submit("echo", content=b"{}")

    await listener.wait_for(request_id, "succeeded")

    stamped = {e["type"]: e for _, e in listener.events if e["request_id"] == request_id}
    queued, started, succeeded = (stamped[kind] for kind in ("queued", "started", "succeeded"))
    assert queued["at"] == queued["status"]["submitted_at"]
    assert succeeded["status"]["submitted_at"] == queued["at"]
    # the status object's own times, not a few milliseconds after them (found by an outside audit)
    assert started["at"] == started["status"]["started_at"]
    assert succeeded["at"] == succeeded["status"]["completed_at"]
    moments = [datetime.fromisoformat(event["at"]) for event in (queued, started, succeeded)]
    assert moments == sorted(moments)


async def test_exhausted_attempts_are_retrying_then_failed(stack: Stack, listener: Listener) -> None:
    await stack.register("down", max_attempts=2)
    stack.functions.script("/down", [Reply(503, b"busy"), Reply(503, b"busy")])
    request_id = await stack.submit("down")

    types = await listener.wait_for(request_id, "failed")

    assert types == ["queued", "started", "retrying", "started", "failed"]
    _check(listener.events)
    failed = next(e for _, e in listener.events if e["type"] == "failed")
    assert failed["status"]["error_type"] == "runner_unavailable"


async def test_a_cancel_and_a_retry_are_events_too(stack_without_worker: Stack, listener: Listener) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    request_id = await stack.submit("echo", content=b"x")
    await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")
    await listener.wait_for(request_id, "cancelled")
    retried = await stack.client.post(f"/queue/echo/requests/{request_id}/retry")
    await stack.start_worker()

    types = await listener.wait_for(request_id, "succeeded")

    assert retried.status_code == 202
    assert types == ["queued", "cancelled", "queued", "started", "succeeded"]
    _check(listener.events)


async def test_results_ride_along_only_when_json_and_small(nats_server: EmbeddedNats, conn: Nats) -> None:
    stack = await start_stack(nats_server, overrides={"events": {"inline_result_limit": 16}})
    found = Listener()
    sub = await conn.nc.subscribe(names.EVENT_SUBJECTS, cb=found.on_event)
    try:
        await stack.register("echo")
        small = await stack.submit("echo", content=b"[1, 2]")
        large = await stack.submit("echo", content=b'{"text": "more than sixteen bytes"}')
        text = await stack.submit("echo", content=b"plain words")
        null = await stack.submit("echo", content=b"null")
        for request_id in (small, large, text, null):
            await found.wait_for(request_id, "succeeded")
    finally:
        await sub.unsubscribe()
        await stack.close()

    done = {e["request_id"]: e for _, e in found.events if e["type"] == "succeeded"}
    assert done[small]["result"] == [1, 2]
    assert "result" not in done[large]
    assert "result" not in done[text]
    assert done[null]["result"] is None  # JSON's null is an output too


async def test_a_late_subscriber_replays_the_events_from_the_stream(stack: Stack, conn: Nats) -> None:
    await stack.register("echo")
    request_id = await stack.submit("echo", content=b"{}")
    await stack.wait_for_status("echo", request_id)
    replayed: list[str] = []

    sub = await conn.js.subscribe("jetspool.events.echo.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        async with asyncio.timeout(10):
            while "succeeded" not in replayed:
                msg = await sub.next_msg(timeout=5)
                replayed.append(orjson.loads(msg.data)["type"])
    finally:
        await sub.unsubscribe()

    assert replayed == ["queued", "started", "succeeded"]
