"""Start deadlines (X-Request-Timeout): a request that has not started in time completes as
request_timeout within about a second, even while every worker is busy, and is never delivered."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import pytest

from jetspool.domain import names
from jetspool.jetstream.connection import connect
from jetspool.settings import NatsSettings
from tests.support.servers import Reply, eventually_true

if TYPE_CHECKING:
    from jetspool.jetstream.connection import Nats
    from tests.support.stack import Stack


@pytest.mark.parametrize("header", ["X-Request-Timeout", "X-Fal-Request-Timeout"])
async def test_a_request_not_started_by_its_deadline_times_out_and_is_never_delivered(
    stack: Stack, header: str
) -> None:
    await stack.occupy()
    late = (await stack.client.post("/queue/busy", json={}, headers={header: "0.5"})).json()["request_id"]

    final = await stack.wait_for_status("busy", late, timeout_s=5)
    result = await stack.client.get(f"/queue/busy/requests/{late}")
    stack.functions.release("/busy", 2)
    after = (await stack.client.post("/queue/busy", json={})).json()["request_id"]
    await stack.wait_for_status("busy", after)

    assert final["error_type"] == "request_timeout"
    waited_s = datetime.fromisoformat(final["completed_at"]) - datetime.fromisoformat(final["submitted_at"])
    assert 0.5 <= waited_s.total_seconds() < 0.5 + 1.5, "completes about a second after the deadline at most"
    assert result.status_code == 504
    assert result.headers["x-request-timeout-type"] == "user"
    assert result.json()["error_type"] == "request_timeout"
    called = [seen.header("x-call-id") for seen in stack.functions.on("/busy")]
    assert late not in called
    assert after in called


async def test_a_timer_job_that_fails_leaves_the_later_deadlines_to_fire(stack: Stack, conn: Nats) -> None:
    """A job whose handling raised an error that was not NATS's (here its request's status record
    cannot be read) ended the worker's timers loop for good: no start deadline fired after it
    (found by a review)."""
    await stack.occupy()
    unreadable = (await stack.client.post("/queue/busy", json={}, headers={"X-Request-Timeout": "0.3"})).json()
    kv = await conn.js.key_value(names.STATUS_BUCKET)
    await kv.put(unreadable["request_id"], b"\x00 not a status record")
    late = (await stack.client.post("/queue/busy", json={}, headers={"X-Request-Timeout": "1.0"})).json()

    final = await stack.wait_for_status("busy", late["request_id"], timeout_s=10)
    stack.functions.release("/busy", 5)

    assert final["error_type"] == "request_timeout"


async def test_a_request_that_started_in_time_may_run_past_its_deadline(stack: Stack) -> None:
    await stack.register("slow", concurrency=1)
    stack.functions.hold("/slow")
    submitted = await stack.client.post("/queue/slow", json={}, headers={"X-Request-Timeout": "0.3"})
    request_id = submitted.json()["request_id"]
    await stack.wait_for_status("slow", request_id, "IN_PROGRESS")
    conn = await connect(NatsSettings(url=stack.nats.url), "deadline-test")
    try:

        async def deadline_has_fired() -> bool:
            return int((await conn.js.stream_info(names.TIMER_STREAM)).state.messages) == 0

        await eventually_true(deadline_has_fired)
    finally:
        await conn.close()

    stack.functions.release("/slow")
    final = await stack.wait_for_status("slow", request_id)

    assert "error_type" not in final


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "31622400", "1_0", "+5", "1e3", ""])
async def test_a_bad_start_deadline_is_refused(stack: Stack, value: str) -> None:
    """Not a number, not above 0, or a year (366 days) or more; the message names the range."""
    await stack.register("echo")

    response = await stack.client.post("/queue/echo", headers={"X-Request-Timeout": value})

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "X-Request-Timeout must be a number of seconds above 0 and below 31622400" in detail
    assert (await stack.client.get("/system/functions/echo")).json()["stats"]["waiting"]["normal"] == 0


async def test_a_retried_request_gets_its_deadline_afresh(stack: Stack) -> None:
    busy = await stack.occupy()
    late = (await stack.client.post("/queue/busy", json={}, headers={"X-Request-Timeout": "0.5"})).json()
    request_id = late["request_id"]
    first = await stack.wait_for_status("busy", request_id, timeout_s=5)

    retried = await stack.client.post(f"/queue/busy/requests/{request_id}/retry")
    again = await stack.wait_for_status("busy", request_id, timeout_s=5)
    stack.functions.release("/busy", 2)
    await stack.wait_for_status("busy", busy)
    last = await stack.client.post(f"/queue/busy/requests/{request_id}/retry")
    final = await stack.wait_for_status("busy", request_id)

    assert first["error_type"] == "request_timeout"
    assert retried.status_code == 202
    assert again["error_type"] == "request_timeout", "the new run had a deadline of its own, and missed it"
    waited_s = datetime.fromisoformat(again["completed_at"]) - datetime.fromisoformat(first["completed_at"])
    assert waited_s.total_seconds() >= 0.5, "not timed out at once by the first run's deadline"
    assert last.status_code == 202
    assert "error_type" not in final
    assert [seen.header("x-call-id") for seen in stack.functions.on("/busy")].count(request_id) == 1


async def test_a_deadline_passed_while_waiting_to_be_retried_says_so(stack: Stack) -> None:
    """It said "no attempt started" of a request whose first attempt had run (found by a SPEC audit)."""
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(503, headers=(("Retry-After", "30"),))])

    response = await stack.client.post("/queue/echo", json={}, headers={"X-Request-Timeout": "0.5"})
    final = await stack.wait_for_status("echo", response.json()["request_id"], timeout_s=10)

    assert (final["error_type"], final["attempts"]) == ("request_timeout", 1)
    assert final["error"] == "the request's start deadline passed while it waited to be retried after attempt 1"
    assert len(stack.functions.on("/echo")) == 1
    assert final["metrics"]["inference_time"] is not None, "attempt 1 ran: it was null (found by a SPEC audit)"
    assert 0 <= final["metrics"]["inference_time"] < 0.5


async def test_a_deadline_passed_during_an_attempt_that_fails_ends_it_without_waiting_out_a_retry(
    stack: Stack,
) -> None:
    """A start deadline that passed while attempt 1 ran, which then failed with a 503 asking for 30 s,
    was re-queued: the request showed IN_QUEUE for the 30 s of a retry that could never start, and
    completed only then (found by an audit; SPEC §2: failed attempts count against the deadline)."""
    await stack.register("flaky")
    stack.functions.script("/flaky", [Reply(503, b"busy", headers=(("Retry-After", "30"),), delay_s=1.0)])

    submitted = await stack.client.post("/queue/flaky", json={}, headers={"X-Request-Timeout": "0.5"})
    final = await stack.wait_for_status("flaky", submitted.json()["request_id"], timeout_s=10)

    assert (final["error_type"], final["attempts"]) == ("request_timeout", 1), final
    assert final["error"].startswith("the request's start deadline passed during attempt 1, which failed: "), final
    assert len(stack.functions.on("/flaky")) == 1
