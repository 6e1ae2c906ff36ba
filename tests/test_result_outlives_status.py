"""A result (above 4 KiB, kept in the results bucket) is readable as long as its completed status,
however late the status is written after it; the status still goes at its `expires_at`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
import uuid
from typing import TYPE_CHECKING, Any

import nats
from nats.js.errors import KeyNotFoundError

from jetspool.domain import names
from jetspool.domain.messages import QueuedRequest
from jetspool.domain.status import StatusRecord, utcnow
from jetspool.jetstream.provision import provision
from jetspool.jetstream.status_store import StatusStore
from tests.support.servers import Reply

if TYPE_CHECKING:
    from jetspool.embedded import EmbeddedNats
    from jetspool.jetstream.connection import Nats
    from tests.support.stack import Stack


async def test_the_result_lives_as_long_as_its_completed_status_after_a_stall(
    nats_server: EmbeddedNats, stack: Stack
) -> None:
    """nats-server stalls for 4 s (SIGSTOP: a GC pause, an election on a cluster) just after the
    worker stored a 5,000-byte result and before it wrote the completed status: the result's TTL
    ran from its own write, the status's from the later one, and the result went first."""
    await stack.register("echo", result_ttl=3)
    stack.functions.script("/echo", [Reply(200, b"r" * 5000, "text/plain")])  # kept in jetspool-results
    loop = asyncio.get_running_loop()
    watcher = await nats.connect(nats_server.url)
    stalled = asyncio.Event()

    async def on_result(_msg: Any) -> None:
        if not stalled.is_set():
            stalled.set()
            os.kill(nats_server.pid, signal.SIGSTOP)
            loop.call_later(4.0, os.kill, nats_server.pid, signal.SIGCONT)

    await watcher.subscribe(f"$KV.{names.RESULTS_BUCKET}.>", cb=on_result)
    await watcher.flush()
    answers: list[tuple[int, int]] = []
    try:
        request_id = await stack.submit("echo", content=b"in")
        await stack.wait_for_status("echo", request_id, timeout_s=40)
        async with asyncio.timeout(30):
            while True:
                status = await stack.client.get(f"/queue/echo/requests/{request_id}/status")
                if status.status_code == 404:
                    break
                result = await stack.client.get(f"/queue/echo/requests/{request_id}")
                answers.append((status.status_code, result.status_code))
                await asyncio.sleep(0.05)
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
        await watcher.close()

    assert stalled.is_set()
    assert answers, "the completed request was read"
    gone_early = sum(1 for answer in answers if answer == (200, 503))
    assert gone_early == 0, f"{gone_early} of {len(answers)} reads found the request COMPLETED and its result gone"


async def test_a_completed_status_stored_late_still_goes_at_its_expiry(conn: Nats) -> None:
    """The status bucket takes no write for 2.5 s (on a cluster: its stream between leaders; here its
    subjects taken away), and a completed record expiring in 3 s is written through it: stored late,
    it goes at its `expires_at` all the same, not its whole time to live after the late write."""
    stores = await provision(conn, replicas=1)
    status = StatusStore(conn, stores.status)
    request = QueuedRequest(request_id=str(uuid.uuid4()), function="echo", submitted_at=utcnow())
    waiting = StatusRecord.waiting(request, 1)
    revision = await status.create(waiting)
    now = utcnow()
    completed = waiting.started(1, now).completed(now, keep_s=3, function_status=200, inference_time=0.1)
    assert completed.expires_at is not None
    stream = f"KV_{names.STATUS_BUCKET}"
    config = (await conn.js.stream_info(stream)).config
    await conn.js.update_stream(dataclasses.replace(config, subjects=["jetspool.test.elsewhere"], republish=None))
    write = asyncio.create_task(status.update(completed, revision))
    await asyncio.sleep(2.5)
    await conn.js.update_stream(config)
    await write
    stored_at = time.time()

    async with asyncio.timeout(10):
        while True:
            try:
                await stores.status.get(request.request_id)
            except KeyNotFoundError:
                break
            await asyncio.sleep(0.05)

    late_s = time.time() - completed.expires_at.timestamp()
    assert stored_at > completed.expires_at.timestamp() - 1.0, "stored late"
    assert late_s < 1.6, f"the record went {late_s:.1f} s after its expiry"
