"""The worker's pull of a function's queue, against a real nats-server."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from jetspool.domain import names
from jetspool.domain.messages import QueuedRequest, encode
from jetspool.jetstream.provision import ensure_function_consumers, provision
from jetspool.worker import puller
from jetspool.worker.puller import PriorityPuller
from tests.support.servers import eventually_true

if TYPE_CHECKING:
    import pytest

    from jetspool.jetstream.connection import Nats


async def _a_pull_waits(conn: Nats, priority: names.Priority) -> bool:
    info = await conn.js.consumer_info(names.QUEUE_STREAM, names.queue_consumer("fn", priority))
    return bool(info.num_waiting)


async def test_a_pull_on_a_wake_up_waits_for_the_request_the_wake_up_announced(
    conn: Nats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster the wake-up (sent by the stream's leader) can come before the consumer's
    leader has the message; a plain no_wait pull then found nothing, and the request waited for
    the poll interval (55 of 780 submits in a 3-node check with the two leaders apart). The wait
    is long here so that the message is surely stored while the pull waits on the server, and the
    pull must end as the request comes, not when its wait is up."""
    monkeypatch.setattr(puller, "_WOKEN_WAIT_S", 10.0, raising=False)
    await provision(conn, replicas=1)
    await ensure_function_consumers(conn.js, "fn", ack_wait_s=30.0)
    pulls = PriorityPuller(conn.nc, "fn", recheck_s=30.0)
    await pulls.start()
    try:
        assert await pulls.pull(4) == [], "nothing waits: every class found empty at once"
        pulls.heard("normal")
        pulling = asyncio.create_task(pulls.pull(4))
        await eventually_true(lambda: _a_pull_waits(conn, "normal"), timeout_s=10)
        request = QueuedRequest(request_id="r1", function="fn", body=b"x", submitted_at=datetime.now(UTC))
        await conn.js.publish(names.queue_subject("fn", "normal"), encode(request))
        stored = time.monotonic()
        delivered = await asyncio.wait_for(pulling, timeout=10)
        waited_s = time.monotonic() - stored
    finally:
        for msg in await pulls.stop():
            await msg.nak()

    assert [msg.subject for msg in delivered] == [names.queue_subject("fn", "normal")]
    assert waited_s < 5, f"the pull ended {waited_s:.1f} s after the request came: it waited out its time"
    for msg in delivered:
        await msg.ack()
