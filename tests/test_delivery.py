"""Delivery guarantees of SPEC §4 on a real stack: backoff and Retry-After, concurrency, large
bodies and results, in-progress acks for long calls, graceful shutdown, workers sharing a queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import nats
import pytest
import yaml

from jetspool.domain import names
from jetspool.domain.messages import QueuedRequest, encode
from jetspool.domain.status import utcnow
from jetspool.embedded import EmbeddedNats
from jetspool.jetstream.queue import RequestQueue
from jetspool.worker import runner
from jetspool.worker.handler import LEAVE, Settle
from jetspool.worker.runner import _log_failure
from tests.support.permissions import as_user, users
from tests.support.processes import start_part
from tests.support.servers import Reply, eventually, free_port
from tests.support.stack import Worker, start_stack

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from nats.aio.msg import Msg

    from jetspool.jetstream.connection import Nats
    from tests.support.stack import Stack

_MIB = 1024 * 1024
_POLL_SLACK_S = 0.6
"""Beyond a retry's wait: the idle worker's poll interval (0.2 s in tests) and scheduling noise."""


@pytest.fixture
async def paced_stack(nats_server: EmbeddedNats) -> AsyncIterator[Stack]:
    """A stack whose backoff is long enough to measure: 0.5 s, doubling, ±20 % jitter."""
    running = await start_stack(
        nats_server, overrides={"retry": {"initial_backoff": 0.5, "max_backoff": 10.0, "jitter": 0.2}}
    )
    yield running
    await running.close()


def _gaps(stack: Stack, path: str) -> list[float]:
    arrivals = [seen.at for seen in stack.functions.on(path)]
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


async def test_503_twice_then_200_waits_out_the_backoff_between_attempts(paced_stack: Stack) -> None:
    stack = paced_stack
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(503), Reply(503), Reply(200, b"third time")])
    request_id = await stack.submit("echo", content=b"x")

    final = await stack.wait_for_status("echo", request_id)

    assert (final["status"], final["attempts"]) == ("COMPLETED", 3)
    assert "error_type" not in final
    assert [s.header("x-attempt") for s in stack.functions.on("/echo")] == ["1", "2", "3"]
    first, second = _gaps(stack, "/echo")
    assert 0.5 * 0.8 <= first <= 0.5 * 1.2 + _POLL_SLACK_S, f"first wait {first:.3f} s, backoff 0.5 s ±20 %"
    assert 1.0 * 0.8 <= second <= 1.0 * 1.2 + _POLL_SLACK_S, f"second wait {second:.3f} s, backoff 1 s ±20 %"


async def test_retry_after_sets_the_wait_instead_of_the_backoff(paced_stack: Stack) -> None:
    stack = paced_stack
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(503, headers=(("Retry-After", "2"),)), Reply(200, b"ok")])
    request_id = await stack.submit("echo", content=b"x")

    final = await stack.wait_for_status("echo", request_id)

    assert (final["status"], final["attempts"]) == ("COMPLETED", 2)
    [gap] = _gaps(stack, "/echo")
    assert 2.0 <= gap <= 2.0 + _POLL_SLACK_S, f"waited {gap:.3f} s for Retry-After: 2"


@pytest.mark.parametrize("slack_s", [None, -0.1], ids=["as-set", "worker-first"])
async def test_a_retry_starts_when_its_backoff_ends_not_at_the_next_poll(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, slack_s: float | None
) -> None:
    """The worker pulls when the request it handed back is due; it used to wait for its next poll
    (here 30 s away), which put retries off the SPEC's backoff (found by a SPEC probe).

    `worker-first`: the worker's timer fires 100 ms before JetStream's, as a loaded machine may have
    it; its pull found nothing due and the retry waited for the poll (found by a test audit). The
    pull now waits for the message, as one on a wake-up does."""
    if slack_s is not None:
        monkeypatch.setattr(runner, "_DUE_SLACK_S", slack_s)
    gap = await _retried_once(nats_server, Reply(503), {"initial_backoff": 0.5, "max_backoff": 5.0, "jitter": 0.0})

    assert 0.5 <= gap <= 0.5 + _POLL_SLACK_S, f"waited {gap:.3f} s for a 0.5 s backoff"


async def test_a_retry_after_of_0_retries_at_once_not_at_the_next_poll(nats_server: EmbeddedNats) -> None:
    """`Retry-After: 0` handed the request back without a delay, and the worker pulled again only
    at its next poll (1 s by default, here 30 s), while its log said "retrying in 0.0 s" (found by
    an outside audit)."""
    gap = await _retried_once(nats_server, Reply(503, headers=(("Retry-After", "0"),)))

    assert gap <= _POLL_SLACK_S, f"waited {gap:.3f} s for Retry-After: 0"


async def _retried_once(nats_server: EmbeddedNats, first: Reply, backoff: dict[str, float] | None = None) -> float:
    """The seconds between a request's two calls, the first answered `first`, by a worker whose
    next poll is 30 s away."""
    overrides = {"worker": {"poll_interval": 30.0}, "retry": backoff or {}}
    stack = await start_stack(nats_server, overrides=overrides)
    try:
        await stack.register("echo")
        stack.functions.script("/echo", [first, Reply(200, b"ok")])
        request_id = await stack.submit("echo", content=b"x")
        final = await stack.wait_for_status("echo", request_id, timeout_s=60)
    finally:
        await stack.close()

    assert (final["status"], final["attempts"]) == ("COMPLETED", 2)
    [gap] = _gaps(stack, "/echo")
    return gap


def _handling_failures(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The delays the worker gave, in order, for each message whose handling raised."""
    return [float(r.args[1]) for r in caplog.records if r.msg.startswith("handling %s failed; it is tried again")]  # type: ignore[index, arg-type]


async def test_a_request_whose_handling_keeps_failing_backs_off_and_is_never_dropped(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue message whose handling raises (here: its request's status record is unreadable) is
    tried again after the retry backoff, growing each time, not every poll interval as it was; once
    the record can be read, the request runs."""
    backoff = {"initial_backoff": 0.2, "multiplier": 2.0, "max_backoff": 5.0, "jitter": 0.0}
    stack = await start_stack(nats_server, worker=False, overrides={"retry": backoff})
    nc = await nats.connect(nats_server.url)
    try:
        await stack.register("echo")
        request_id = await stack.submit("echo", content=b"x")
        status = await nc.jetstream().key_value(names.STATUS_BUCKET)
        await status.put(request_id, b"not a status record")
        with caplog.at_level(logging.ERROR, logger="jetspool.worker.runner"):
            await stack.start_worker()
            await eventually(lambda: len(_handling_failures(caplog)) >= 3, timeout_s=20)
            await status.delete(request_id)  # readable again: the record derives from the message
            final = await stack.wait_for_status("echo", request_id, timeout_s=20)
    finally:
        await nc.close()
        await stack.close()

    assert _handling_failures(caplog)[:3] == [0.2, 0.4, 0.8]
    assert (final["status"], "error_type" in final) == ("COMPLETED", False)
    assert [seen.body for seen in stack.functions.on("/echo")] == [b"x"]


def test_a_failed_handling_whose_hold_lapsed_is_not_logged_as_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    """The error line of a handling that raised says what becomes of the message: the nak's delay,
    or, once its hold may have lapsed and the nak became a leave, that nothing was sent (it said
    "tried again in 0.2 s" either way)."""
    msg = SimpleNamespace(subject="jetspool.queue.echo.normal")
    with caplog.at_level(logging.ERROR, logger="jetspool.worker.runner"):
        for decision in (Settle("nak", 0.2), LEAVE):
            try:
                raise RuntimeError("status unreadable")
            except RuntimeError as exc:
                _log_failure(msg, decision, exc)  # type: ignore[arg-type]

    assert [r.getMessage() for r in caplog.records] == [
        "handling jetspool.queue.echo.normal failed; it is tried again in 0.2 s",
        "handling jetspool.queue.echo.normal failed; it is left to its redelivery",
    ]
    assert all(r.exc_info is not None for r in caplog.records)


async def test_a_worker_cut_off_past_its_ack_wait_leaves_the_retry_to_the_redelivery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A call asks for a retry after NATS was away longer than the ack wait: the worker does not
    nak the message, which JetStream may have redelivered meanwhile (to another worker, running the
    request by now; nats-server applies the nak to the message whichever delivery it names, and a
    third delivery then ran beside the second, or completed the request as given up while the
    second answered 200). The redelivery runs the retry."""
    nats_server = EmbeddedNats(tmp_path / "nats", port=free_port())
    nats_server.start()
    stack = await start_stack(nats_server, overrides={"worker": {"ack_wait": 2.0}})
    try:
        await stack.register("echo", max_attempts=2)
        stack.functions.hold("/echo")
        stack.functions.script("/echo", [Reply(503, b"busy")])
        request_id = await stack.submit("echo", content=b"x")
        await stack.functions.wait_for("/echo")
        with caplog.at_level(logging.INFO, logger="jetspool.worker.handler"):
            nats_server.kill()
            await asyncio.sleep(3.0)  # the outage, longer than the ack wait
            nats_server.start()
            stack.functions.release("/echo", 2)  # the first call answers 503, the second 200
            final = await stack.wait_for_status("echo", request_id, timeout_s=60)
    finally:
        await stack.close()
        nats_server.stop()

    assert "was not kept within its ack wait; leaving it to its redelivery" in caplog.text
    assert (final["attempts"], "error_type" in final) == (2, False)
    assert [seen.header("x-attempt") for seen in stack.functions.on("/echo")] == ["1", "2"]


async def test_a_nats_outage_shorter_than_the_ack_wait_starts_no_second_attempt(tmp_path: Path) -> None:
    """SPEC §4: no request is delivered twice while its first attempt still runs. nats-server is
    killed and restarted, away for less than the ack wait, while a call runs, with a second worker
    idle. The worker skipped its in-progress signals while NATS was away and sent the next one a
    third of the ack wait later; the restarted server had counted the ack wait from its last signal
    and redelivered the message to the idle worker first (found by a fault audit). The worker now
    signals as soon as it is reconnected.

    The restarted server restores the call's last signal rounded down to a whole second and checks
    its pending messages 0.5-1.5 s after it starts: with an ack wait of 4 s, a server back after
    2.8 s could find the rounded deadline passed before the worker had reconnected, and sent the
    message to the idle worker (found by a test audit). With 9 s the outage still spans two of the
    worker's turns to signal (every 3 s), and the rounded deadline lies a second or more past the
    worker's reconnection."""
    ack_wait = 9.0
    nats_server = EmbeddedNats(tmp_path / "nats", port=free_port())
    nats_server.start()
    stack = await start_stack(nats_server, overrides={"worker": {"ack_wait": ack_wait, "poll_interval": 0.2}})
    idle = Worker(stack.settings)
    await idle.start()
    try:
        await stack.register("long", concurrency=1)  # a redelivery can only go to the idle worker
        stack.functions.hold("/long")
        request_id = await stack.submit("long", content=b"x")
        await stack.functions.wait_for("/long")
        nats_server.kill()
        await asyncio.sleep(ack_wait * 0.7)  # the outage: past two of the worker's turns to signal
        await asyncio.to_thread(nats_server.start)  # the worker may reconnect as soon as it is up
        await asyncio.sleep(ack_wait)  # the call runs on, past the ack wait counted from before
        stack.functions.release("/long", 2)
        final = await stack.wait_for_status("long", request_id, timeout_s=30)
    finally:
        await idle.stop()
        await stack.close()
        nats_server.stop()

    assert [seen.header("x-attempt") for seen in stack.functions.on("/long")] == ["1"]
    assert (final["attempts"], "error_type" in final) == (1, False)


async def test_every_request_the_queue_stream_stores_wakes_an_idle_worker(
    nats_server: EmbeddedNats, conn: Nats
) -> None:
    """The queue stream sends the wake-up of each message it stores (a republish), so a worker
    idle for its poll interval (here 30 s) starts at once whatever the request's class, and also a
    request stored by a writer that sends no wake-up of its own (before, only the gateway's did)."""
    stack = await start_stack(nats_server, overrides={"worker": {"poll_interval": 30.0}})
    try:
        await stack.register("echo")
        first = await stack.submit("echo", content=b"first")  # the worker has pulled once and found all empty
        await stack.wait_for_status("echo", first, timeout_s=30)
        woken = []
        for priority in ("high", "low", "normal"):
            request_id = await stack.submit(
                "echo", content=priority.encode(), headers={names.H_QUEUE_PRIORITY: priority}
            )
            woken.append((await stack.wait_for_status("echo", request_id, timeout_s=5))["status"])
        stored = QueuedRequest(request_id=str(uuid.uuid4()), function="echo", body=b"raw", submitted_at=utcnow())
        await conn.js.publish(names.queue_subject("echo", "normal"), encode(stored))
        await eventually(lambda: len(stack.functions.on("/echo")) == 5, timeout_s=5)  # no status before the worker
        raw = await stack.wait_for_status("echo", stored.request_id, timeout_s=5)
    finally:
        await stack.close()

    assert woken == ["COMPLETED"] * 3
    assert raw["status"] == "COMPLETED"
    assert [s.body for s in stack.functions.on("/echo")] == [b"first", b"high", b"low", b"normal", b"raw"]


async def test_concurrency_is_never_exceeded_under_a_burst(stack: Stack) -> None:
    await stack.register("pair", concurrency=2)
    stack.functions.script("/pair", [Reply(200, b"ok", delay_s=0.02)] * 200)
    gate = asyncio.Semaphore(50)

    async def submit(n: int) -> str:
        async with gate:
            return await stack.submit("pair", content=str(n).encode())

    ids = await asyncio.gather(*(submit(n) for n in range(200)))
    for request_id in ids:
        await stack.wait_for_status("pair", request_id, timeout_s=30)

    assert len(stack.functions.on("/pair")) == 200
    assert stack.functions.most_in_flight == 2, "two at a time: never more, and the slots were used"


async def test_a_slow_function_does_not_hold_up_the_others(stack: Stack) -> None:
    held = await stack.occupy("slow")
    waiting = await stack.submit("slow", content=b"behind")
    await stack.register("fast")

    fast = [await stack.submit("fast", content=str(n).encode()) for n in range(20)]
    for request_id in fast:
        await stack.wait_for_status("fast", request_id)

    assert (await stack.status("slow", held))["status"] == "IN_PROGRESS"
    assert (await stack.status("slow", waiting))["status"] == "IN_QUEUE"
    stack.functions.release("/slow", 2)
    await stack.wait_for_status("slow", waiting)


@pytest.mark.timeout(120)
async def test_a_20_mib_body_and_result_travel_byte_exact(stack: Stack) -> None:
    await stack.register("echo")
    body = os.urandom(20 * _MIB)
    response = await stack.client.post(
        "/queue/echo", content=body, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]

    final = await stack.wait_for_status("echo", request_id, timeout_s=90)
    result = await stack.client.get(f"/queue/echo/requests/{request_id}")

    assert "error_type" not in final
    [seen] = stack.functions.on("/echo")
    assert seen.body == body, "the function got the body byte-exact"
    assert result.status_code == 200
    assert result.content == body, "the result came back byte-exact"
    assert result.headers["content-type"] == "application/octet-stream"


async def test_a_call_longer_than_the_ack_wait_is_delivered_once(nats_server: EmbeddedNats) -> None:
    stack = await start_stack(nats_server, overrides={"worker": {"ack_wait": 1.0}})
    try:
        await stack.register("long")
        stack.functions.script("/long", [Reply(200, b"done", delay_s=3.5)])
        request_id = await stack.submit("long", content=b"x")

        final = await stack.wait_for_status("long", request_id)
    finally:
        await stack.close()

    assert (final["attempts"], final["status"]) == (1, "COMPLETED")
    assert len(stack.functions.on("/long")) == 1, "in-progress acks kept the message through 3.5 ack waits"


async def test_a_message_is_kept_from_receipt_not_only_during_the_call(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the call (here: loading the body, held) the message is kept too; it used to be
    redelivered after the ack wait and run a second time beside the first (found by a SPEC probe)."""
    loading, release = asyncio.Event(), asyncio.Event()
    load_body = RequestQueue.load_body

    async def held(queue: RequestQueue, request: QueuedRequest) -> bytes:
        loading.set()
        await release.wait()
        return await load_body(queue, request)

    monkeypatch.setattr(RequestQueue, "load_body", held)
    stack = await start_stack(nats_server, overrides={"worker": {"ack_wait": 1.0}})
    observer = await nats.connect(nats_server.url)
    try:
        kept = 0

        async def on_ack(msg: Msg) -> None:
            nonlocal kept
            kept += msg.data == b"+WPI"

        await observer.subscribe(f"$JS.ACK.{names.QUEUE_STREAM}.>", cb=on_ack)
        await stack.register("echo")
        request_id = await stack.submit("echo", content=b"x")
        await asyncio.wait_for(loading.wait(), 10)
        await eventually(lambda: kept >= 4, timeout_s=10)  # held for over an ack wait (1 s; one every 1/3 s)
        release.set()
        final = await stack.wait_for_status("echo", request_id)
    finally:
        release.set()
        await observer.close()
        await stack.close()

    assert (final["attempts"], final["status"]) == (1, "COMPLETED")
    assert [seen.header("X-Attempt") for seen in stack.functions.on("/echo")] == ["1"]


async def test_a_stopping_worker_finishes_a_call_within_its_grace(stack: Stack) -> None:
    request_id = await stack.held_call("echo", b"finish me")
    assert stack.worker is not None

    stopping = asyncio.create_task(stack.worker.stop())
    stack.functions.release("/echo")
    await stopping
    stack.worker = None
    final = await stack.status("echo", request_id)

    assert final["status"] == "COMPLETED"
    assert "error_type" not in final
    assert len(stack.functions.on("/echo")) == 1


async def test_calls_and_callbacks_in_flight_share_one_grace_when_the_worker_stops(nats_server: EmbeddedNats) -> None:
    """The worker drained its callbacks first and its calls after, each for the whole grace, so it
    could outlast a Kubernetes grace period set from `shutdown_grace` by as much again."""
    grace_s = 2.5
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": grace_s}})
    try:
        await stack.register("echo")
        stack.receiver.hold("/callback")
        await stack.submit("echo", content=b"called back", headers={"X-Callback-Url": stack.callback_url()})
        await stack.receiver.wait_for("/callback")  # a callback in flight
        stack.functions.hold("/echo")
        await stack.submit("echo", content=b"held")
        await stack.functions.wait_for("/echo", 2)  # and a call
        assert stack.worker is not None

        began = time.monotonic()
        await stack.worker.stop()
        took_s = time.monotonic() - began
        stack.worker = None
    finally:
        stack.receiver.release("/callback")
        await stack.close()

    assert grace_s <= took_s < grace_s * 1.9, f"stopping took {took_s:.2f} s with a grace of {grace_s} s"


async def test_a_cancel_still_aborts_a_call_the_stopping_worker_lets_finish(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 30.0}})
    try:
        request_id = await stack.held_call("echo", b"cancel me")
        assert stack.worker is not None
        with caplog.at_level(logging.INFO, logger="jetspool.worker.main"):
            stopping = asyncio.create_task(stack.worker.stop())
            await eventually(lambda: "worker stopping" in caplog.text)

            cancel = await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")
            final = await stack.wait_for_status("echo", request_id, timeout_s=10)  # not after the 30 s grace
            await stopping
        stack.worker = None
    finally:
        await stack.close()

    assert cancel.status_code == 202
    assert (final["status"], final["error_type"]) == ("COMPLETED", "cancelled")


async def test_the_callback_of_a_call_ending_in_the_grace_goes_to_the_next_worker_at_once(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by an audit of rolling restarts: the stopping worker's last callback fetch was still
    open on the server, took the callback job of its own call ending in the grace, and nobody read
    it; it waited out the callbacks consumer's ack wait (60 s)."""
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 10.0}})
    try:
        await stack.register("echo")
        stack.functions.hold("/echo")
        callback_url = {"X-Callback-Url": stack.callback_url()}
        request_id = await stack.submit("echo", content=b"called back", headers=callback_url)
        await stack.functions.wait_for("/echo")
        assert stack.worker is not None
        with caplog.at_level(logging.INFO, logger="jetspool.worker.main"):
            stopping = asyncio.create_task(stack.worker.stop())
            await eventually(lambda: "worker stopping" in caplog.text)
            stack.functions.release("/echo")  # the call ends in the grace, and its callback job is sent
            await stopping

        await stack.start_worker()
        [callback] = await stack.receiver.wait_for("/callback", timeout_s=20)  # not after 60 s
    finally:
        await stack.close()

    assert callback.header("x-call-id") == request_id


async def _called_again_at_once(stack: Stack, request_id: str) -> dict[str, Any]:
    """Start a worker: the held call of `request_id` to /echo, handed back, comes again (not after
    the ack wait of 60 s these tests set); then let both calls answer and wait for the outcome."""
    await stack.start_worker()
    await stack.functions.wait_for("/echo", 2, timeout_s=20)
    stack.functions.release("/echo", 2)
    return await stack.wait_for_status("echo", request_id)


@pytest.mark.parametrize("restarted", ["the worker", "the worker and nats-server"])
async def test_a_stopping_worker_hands_back_what_outlasts_its_grace(restarted: str, tmp_path: Path) -> None:
    """Handed back, not left to the ack wait: the next worker receives it at once. Also when
    nats-server restarts in between, as `jetspool up` stopped and started again does: a plain nak's
    "redeliver now" lives in nats-server's memory only, and the request waited out the ack wait."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port())  # a fixed port: the gateway reconnects to it
    server.start()
    stack = await start_stack(server, overrides={"worker": {"shutdown_grace": 0.5, "ack_wait": 60.0}})
    try:
        request_id = await stack.held_call("echo", b"hand me back")
        assert stack.worker is not None
        await stack.worker.stop()
        if restarted == "the worker and nats-server":
            server.stop()  # SIGTERM, as `jetspool up` stops it
            server.start()

        final = await _called_again_at_once(stack, request_id)
    finally:
        await stack.close()
        server.stop()

    assert final["status"] == "COMPLETED"
    assert [s.header("x-attempt") for s in stack.functions.on("/echo")] == ["1", "2"]


async def test_a_call_handed_back_shows_waiting_until_another_worker_takes_it(nats_server: EmbeddedNats) -> None:
    """It showed IN_PROGRESS, for good should no worker come (found by an audit)."""
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 0.5, "ack_wait": 60.0}})
    try:
        request_id = await stack.held_call("echo", b"hand me back")
        running = await stack.status("echo", request_id)
        assert stack.worker is not None
        await stack.worker.stop()
        shown = await stack.client.get(f"/queue/echo/requests/{request_id}/status", params={"logs": "1"})
        final = await _called_again_at_once(stack, request_id)
    finally:
        await stack.close()

    waiting = shown.json()
    assert running["status"] == "IN_PROGRESS"
    assert (waiting["status"], waiting["attempts"], waiting["queue_position"]) == ("IN_QUEUE", 1, 0)
    assert "attempt 1: the worker stopped before the function answered" in waiting["logs"][-1]["message"]
    assert (final["status"], final["attempts"], "error_type" in final) == ("COMPLETED", 2, False)


async def test_a_worker_stopped_during_start_up_hands_back_what_it_took(tmp_path: Path) -> None:
    """Found by a rolling-restart audit: a worker starts delivering to a function as soon as it has
    read it from the registry, before the rest of its start-up. Stopped then, it was cancelled until
    it ended: its calls were cut, their hand-backs failed on the closed connection, and the requests
    waited out the ack wait. Here start-up hangs on a second function whose consumers the worker's
    NATS user may not read (each such request times out)."""
    slow_to_read = [f"$JS.API.CONSUMER.INFO.JETSPOOL_QUEUE.jetspool-zz-{p}" for p in names.PRIORITIES]
    server = EmbeddedNats(tmp_path / "nats", extra_config=users("worker", slow_to_read))
    server.start()
    worker = {"shutdown_grace": 0.5, "ack_wait": 60.0, "poll_interval": 0.2}
    admin = {**as_user("admin"), "worker": worker}
    stack = await start_stack(server, worker=False, overrides=admin)
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump({**as_user("worker"), "worker": worker}))
    try:
        await stack.register("echo")
        await stack.register("zz")
        stack.functions.hold("/echo")
        request_id = await stack.submit("echo", content=b"taken during start-up")
        starting = start_part("worker", config, server.url)
        try:
            await stack.functions.wait_for("/echo", timeout_s=30)
            assert "worker ready" not in starting.output
            code = starting.terminate(30)
        finally:
            starting.kill_tree()

        final = await _called_again_at_once(stack, request_id)
    finally:
        await stack.close()
        server.stop()

    assert code == 0, starting.output
    assert "worker stopping during start-up" in starting.output
    assert "Traceback" not in starting.output
    assert final["status"] == "COMPLETED"


async def test_several_workers_share_a_functions_queue(stack: Stack) -> None:
    await stack.register("echo", concurrency=1)
    second = Worker(stack.settings)
    await second.start()
    try:
        stack.functions.hold("/echo")
        ids = [await stack.submit("echo", content=str(n).encode()) for n in range(2)]
        # Each worker may run one call at a time: two at once means both workers took one.
        await stack.functions.wait_for("/echo", 2)
        assert stack.functions.most_in_flight == 2
        stack.functions.release("/echo", 2)
        for request_id in ids:
            await stack.wait_for_status("echo", request_id)
    finally:
        await second.stop()
