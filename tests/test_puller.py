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
    from nats.aio.msg import Msg

    from jetspool.jetstream.connection import Nats


_ROUNDS = 20


async def _ended_or_waits(pulling: asyncio.Task[list[Msg]], conn: Nats) -> bool:
    """Whether the pull is over, or waits on the server."""
    if pulling.done():
        return True
    info = await conn.js.consumer_info(names.QUEUE_STREAM, names.queue_consumer("fn", "normal"))
    return bool(info.num_waiting)


async def test_a_pull_on_a_wake_up_waits_for_the_request_the_wake_up_announced(
    conn: Nats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster the wake-up (sent by the stream's leader) can come before the consumer's
    leader has the message; a plain no_wait pull then found nothing, and the request waited for
    the poll interval (55 of 780 submits in a 3-node check with the two leaders apart). The wait
    is long here so that the message is surely stored while the pull waits on the server, and the
    pull must end as the request comes, not when its wait is up.

    nats-server holds a `no_wait` pull with `expires` only until its consumer next finds nothing to
    deliver (`processWaiting(eos)` ends every `no_wait` request), which may come at once: the test
    failed about once in thirty for want of a waiting pull. Such a round is begun again."""
    monkeypatch.setattr(puller, "_WOKEN_WAIT_S", 10.0, raising=False)
    await provision(conn, replicas=1)
    await ensure_function_consumers(conn.js, "fn", ack_wait_s=30.0)
    pulls = PriorityPuller(conn.nc, "fn", recheck_s=30.0)
    await pulls.start()
    delivered: list[Msg] = []
    try:
        assert await pulls.pull(4) == [], "nothing waits: every class found empty at once"
        for _ in range(_ROUNDS):
            pulls.heard("normal")
            pulling = asyncio.create_task(pulls.pull(4))
            await eventually_true(lambda: _ended_or_waits(pulling, conn), timeout_s=10)  # noqa: B023 - used at once
            if pulling.done():
                assert pulling.result() == [], "nothing was there to deliver"
                continue  # ended by the server before it waited
            request = QueuedRequest(request_id="r1", function="fn", body=b"x", submitted_at=datetime.now(UTC))
            await conn.js.publish(names.queue_subject("fn", "normal"), encode(request))
            stored = time.monotonic()
            delivered = await asyncio.wait_for(pulling, timeout=15)
            waited_s = time.monotonic() - stored
            if delivered:
                break
            pulls.heard("normal", 0.0)  # ended just before the request came: take it, go again
            for msg in await pulls.pull(4):  # (the class counts as drained until it is heard of)
                await msg.ack()
    finally:
        for msg in await pulls.stop():
            await msg.nak()

    assert [msg.subject for msg in delivered] == [names.queue_subject("fn", "normal")]
    assert waited_s < 5, f"the pull ended {waited_s:.1f} s after the request came: it waited out its time"
    for msg in delivered:
        await msg.ack()
