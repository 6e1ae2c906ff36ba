"""The fetch that the callback and timer loops use hands a message over as soon as it arrives,
not once its batch has filled or its pull has expired."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import nats
import pytest
from nats.js import api

from jetspool.jetstream.pulling import fetch
from tests.support.servers import eventually_true

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.js.client import JetStreamContext

    from jetspool.embedded import EmbeddedNats

_LONG_PULL_S = 30.0


@pytest.fixture
async def jobs(nats_server: EmbeddedNats) -> AsyncIterator[tuple[JetStreamContext, JetStreamContext.PullSubscription]]:
    """A stream `JOBS` on `jobs.>` and a durable pull subscription `loop` on it."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name="JOBS", subjects=["jobs.>"]))
        yield js, await js.pull_subscribe("jobs.>", durable="loop", stream="JOBS")
    finally:
        await nc.close()


async def test_a_message_arriving_during_a_long_pull_is_handed_over_at_once(
    jobs: tuple[JetStreamContext, JetStreamContext.PullSubscription],
) -> None:
    js, sub = jobs
    started = time.monotonic()
    pulling = asyncio.create_task(fetch(sub, 32, _LONG_PULL_S, "test"))

    async def pull_waits() -> bool:
        return bool((await js.consumer_info("JOBS", "loop")).num_waiting)

    await eventually_true(pull_waits, timeout_s=10)  # the job comes while the pull waits on the server
    assert not pulling.done()
    await js.publish("jobs.one", b"job")

    [msg] = await asyncio.wait_for(pulling, timeout=_LONG_PULL_S / 2)
    waited = time.monotonic() - started
    await msg.ack()

    assert msg.data == b"job"
    assert waited < _LONG_PULL_S / 2, "not held back until the pull expired"


async def test_an_empty_pull_ends_empty_after_its_timeout(
    jobs: tuple[JetStreamContext, JetStreamContext.PullSubscription],
) -> None:
    _, sub = jobs
    assert await fetch(sub, 32, 0.3, "test") == []
