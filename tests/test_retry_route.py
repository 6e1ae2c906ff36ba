"""The retry route (SPEC §2): a request that ended in an error or was cancelled runs again under
its id; what a finished request leaves in the object store is deleted in time."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import orjson
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, NotFoundError

from jetspool.domain import names
from jetspool.domain.messages import QueuedRequest, encode
from jetspool.jetstream.retention import Retention
from jetspool.jetstream.retry import next_run
from jetspool.jetstream.status_store import StatusStore
from tests.support.servers import Reply, eventually_true
from tests.support.stack import has_object, start_stack

if TYPE_CHECKING:
    from jetspool.embedded import EmbeddedNats
    from jetspool.jetstream.connection import Nats
    from tests.support.stack import Stack

_LARGE = bytes(range(256)) * (5 * 4096)  # 5 MiB: stored out of line (above half the 8 MiB max payload)


async def _retry(stack: Stack, request_id: str, name: str = "echo") -> dict[str, object]:
    response = await stack.client.post(f"/queue/{name}/requests/{request_id}/retry")
    assert response.status_code == 202, response.text
    assert response.headers["x-request-id"] == request_id
    body: dict[str, object] = response.json()
    return body


async def test_a_function_error_runs_again_under_the_same_id(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo/sub", [Reply(500, b"boom", "text/plain")])
    request_id = await stack.submit(
        "echo", "sub", params={"q": "1"}, content=b'{"n": 1}', headers={"Content-Type": "application/json"}
    )
    failed = await stack.wait_for_status("echo", request_id)
    assert failed["error_type"] == "function_error"

    answer = await _retry(stack, request_id)
    final = await stack.wait_for_status("echo", request_id)

    assert answer["request_id"] == request_id
    assert answer["status_url"] == f"{stack.url}/queue/echo/requests/{request_id}/status"
    assert answer["response_url"] == f"{stack.url}/queue/echo/requests/{request_id}"
    assert answer["cancel_url"] == f"{stack.url}/queue/echo/requests/{request_id}/cancel"
    assert isinstance(answer["queue_position"], int)
    assert "error_type" not in final
    assert final["attempts"] == 2
    first, second = stack.functions.on("/echo/sub")
    assert (second.method, second.query, second.body) == (first.method, first.query, first.body)
    assert second.header("content-type") == "application/json"
    assert [first.header("x-attempt"), second.header("x-attempt")] == ["1", "2"]
    result = await stack.client.get(f"/queue/echo/requests/{request_id}")
    assert (result.status_code, result.content) == (200, b'{"n": 1}')


async def test_max_attempts_counts_again_for_each_run(stack: Stack) -> None:
    await stack.register("down", max_attempts=2)
    stack.functions.script("/down", [Reply(503, b"busy")] * 4)
    request_id = await stack.submit("down")
    first = await stack.wait_for_status("down", request_id)
    assert first["error_type"] == "runner_unavailable"

    await _retry(stack, request_id, "down")

    async def ran_again() -> bool:  # IN_QUEUE lasts a round trip: a poll for it could miss it (a test audit)
        current = await stack.status("down", request_id)
        return (current["status"], current["attempts"]) == ("COMPLETED", 4)

    await eventually_true(ran_again, timeout_s=30)
    second = await stack.status("down", request_id)

    assert second["error_type"] == "runner_unavailable"
    assert second["attempts"] == 4
    assert [s.header("x-attempt") for s in stack.functions.on("/down")] == ["1", "2", "3", "4"]
    assert first["error"].startswith("gave up after 2 attempts:"), first["error"]
    assert second["error"].startswith("gave up after 2 attempts of this run, 4 in all:"), "it said 'after 4 attempts'"


async def test_a_cancelled_request_runs_again_and_calls_back_for_each_run(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    hook = stack.callback_url("/hook")
    request_id = await stack.submit("echo", content=b"again", headers={"X-Callback-Url": hook})
    cancelled = await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")
    assert cancelled.status_code == 202
    await stack.start_worker()
    await stack.receiver.wait_for("/hook")

    await _retry(stack, request_id)
    final = await stack.wait_for_status("echo", request_id)
    first, second = await stack.receiver.wait_for("/hook", 2)

    assert "error_type" not in final
    assert [s.body for s in stack.functions.on("/echo")] == [b"again"]
    assert first.header("x-function-status") == "400"
    assert (second.header("x-function-status"), second.body) == ("200", b"again")


async def test_a_request_ended_while_waiting_is_kept_for_a_retry_before_its_status_says_so(
    stack: Stack, conn: Nats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry sent the moment the status showed a waiting request cancelled or past its start
    deadline was refused as no longer kept: its status was written before it was kept (found by a
    soak test). What the status says when each is kept is noted here."""
    bucket = await conn.js.key_value(names.STATUS_BUCKET)
    seen_when_kept: list[str] = []
    keep = Retention.keep_envelope

    async def noting(retention: Retention, request: QueuedRequest, ttl_s: float) -> None:
        try:
            seen_when_kept.append(orjson.loads((await bucket.get(request.request_id)).value or b"")["status"])
        except KeyNotFoundError:
            seen_when_kept.append("no status yet")
        await keep(retention, request, ttl_s)

    monkeypatch.setattr(Retention, "keep_envelope", noting)
    await stack.occupy()  # the function's only slot is taken: both requests wait
    cancelled = await stack.submit("busy", content=b"cancelled")
    timed_out = await stack.submit("busy", content=b"late", headers={"X-Request-Timeout": "0.5"})
    assert (await stack.client.put(f"/queue/busy/requests/{cancelled}/cancel")).status_code == 202
    late = await stack.wait_for_status("busy", timed_out, timeout_s=30)
    stack.functions.release("/busy")

    assert late["error_type"] == "request_timeout"
    assert len(seen_when_kept) == 2
    assert "COMPLETED" not in seen_when_kept, seen_when_kept
    await _retry(stack, cancelled, "busy")
    await _retry(stack, timed_out, "busy")


async def test_a_cancel_that_loses_to_a_start_leaves_the_body_unswept(
    stack_without_worker: Stack, conn: Nats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel keeps a waiting request for a retry before its status write, which may then
    lose to a worker starting the request: no sweep of its body may be scheduled then, or a request
    still running at `result_ttl` lost its body (found by a review). A worker's start in the window
    is written here by hand."""
    stack = stack_without_worker
    status = StatusStore(conn, await conn.js.key_value(names.STATUS_BUCKET))
    keep = Retention.keep_envelope

    async def started_meanwhile(retention: Retention, request: QueuedRequest, ttl_s: float) -> None:
        await keep(retention, request, ttl_s)
        current = await status.get(request.request_id)
        assert current is not None
        await status.update(current.record.started(1, datetime.now(UTC)), current.revision)

    monkeypatch.setattr(Retention, "keep_envelope", started_meanwhile)
    await stack.register("echo")
    submitted = await stack.client.post(
        "/queue/echo", content=_LARGE, headers={"Content-Type": "application/octet-stream"}
    )
    request_id = submitted.json()["request_id"]
    cancelled = await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")

    assert cancelled.json()["status"] == "CANCELLATION_REQUESTED", "it was running by then"
    with pytest.raises(NotFoundError):
        await conn.js.get_last_msg(names.TIMER_STREAM, names.SWEEP_SUBJECT)


async def test_only_a_failed_or_cancelled_request_can_be_retried(stack: Stack) -> None:
    await stack.register("echo")
    done = await stack.submit("echo", content=b"ok")
    await stack.wait_for_status("echo", done)
    running = await stack.occupy()

    succeeded = await stack.client.post(f"/queue/echo/requests/{done}/retry")
    in_progress = await stack.client.post(f"/queue/busy/requests/{running}/retry")
    unknown = await stack.client.post(f"/queue/echo/requests/{uuid.uuid4()}/retry")
    other_function = await stack.client.post(f"/queue/busy/requests/{done}/retry")
    malformed = await stack.client.post("/queue/echo/requests/not-an-id/retry")
    stack.functions.release("/busy")

    assert succeeded.status_code == 400
    assert succeeded.json()["status"] == "COMPLETED"
    assert "succeeded" in succeeded.json()["detail"]
    assert succeeded.headers["x-request-id"] == done
    assert in_progress.status_code == 400
    assert in_progress.json()["status"] == "IN_PROGRESS"
    assert (unknown.status_code, other_function.status_code, malformed.status_code) == (404, 404, 422)
    assert [s.body for s in stack.functions.on("/echo")] == [b"ok"], "nothing ran again"
    assert "error_type" not in await stack.status("echo", done)


async def test_a_request_of_a_function_no_longer_registered_is_not_retried(stack: Stack) -> None:
    """A retry queues the request again, and so answers as a submit would: 404 for a function that
    is not registered (queued, it would wait for a consumer that no longer exists)."""
    await stack.register("gone")
    stack.functions.script("/gone", [Reply(500, b"boom")])
    request_id = await stack.submit("gone", content=b"once")
    failed = await stack.wait_for_status("gone", request_id)
    assert (await stack.client.delete("/system/functions/gone")).status_code == 204

    refused = await stack.client.post(f"/queue/gone/requests/{request_id}/retry")

    assert refused.status_code == 404
    assert "not registered" in refused.json()["detail"]
    assert refused.headers["x-request-id"] == request_id
    assert await stack.status("gone", request_id) == failed, "nothing changed"
    assert len(stack.functions.on("/gone")) == 1


async def test_a_request_retried_twice_at_once_runs_once(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(500, b"boom")])
    request_id = await stack.submit("echo", content=b"once")
    await stack.wait_for_status("echo", request_id)
    stack.functions.hold("/echo")

    first = stack.client.post(f"/queue/echo/requests/{request_id}/retry")
    second = stack.client.post(f"/queue/echo/requests/{request_id}/retry")
    answers = sorted([(await first).status_code, (await second).status_code])
    await stack.functions.wait_for("/echo", 2)
    stack.functions.release("/echo", 2)
    final = await stack.wait_for_status("echo", request_id)

    assert answers == [202, 400]
    assert final["attempts"] == 2
    assert len(stack.functions.on("/echo")) == 2, "one call before the retry, one after"


async def test_a_run_the_status_never_names_is_dropped_without_a_call(stack: Stack, conn: Nats) -> None:
    """As when a gateway dies between queueing a retry and recording it: nobody was told, nothing runs."""
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(500, b"boom")])
    request_id = await stack.submit("echo", content=b"x")
    await stack.wait_for_status("echo", request_id)
    orphan = QueuedRequest(
        request_id=request_id, function="echo", body=b"orphan", submitted_at=datetime.now(UTC), retry=1
    )
    ack = await conn.js.publish(names.queue_subject("echo", "normal"), encode(orphan))

    async def gone() -> bool:
        try:
            await conn.js.get_msg(names.QUEUE_STREAM, seq=ack.seq)
        except NotFoundError:
            return True
        return False

    await eventually_true(gone, timeout_s=20)
    final = await stack.status("echo", request_id)

    assert final["status"] == "COMPLETED"
    assert final["error_type"] == "function_error"
    assert [s.body for s in stack.functions.on("/echo")] == [b"x"]


async def test_a_run_taken_before_the_retry_route_names_it_starts_once_named(
    nats_server: EmbeddedNats, conn: Nats
) -> None:
    """The route queues a run, then names it in the status record. A worker that took the run in
    between handed it back for a whole poll interval: the function sat idle that long, and a run
    with a start deadline of a second timed out unstarted (found by an audit, 2 of 10 retries)."""
    stack = await start_stack(nats_server, overrides={"worker": {"poll_interval": 5.0}})
    try:
        await stack.register("echo")
        stack.functions.script("/echo", [Reply(500, b"boom")])
        request_id = await stack.submit("echo", content=b"x")
        await stack.wait_for_status("echo", request_id)
        now = datetime.now(UTC)
        run = QueuedRequest(request_id=request_id, function="echo", body=b"again", submitted_at=now, retry=1)
        queued = time.monotonic()
        ack = await conn.js.publish(names.queue_subject("echo", "normal"), encode(run))

        async def handed_back() -> bool:  # taken, handed back, taken again
            info = await conn.js.consumer_info(names.QUEUE_STREAM, names.queue_consumer("echo", "normal"))
            return bool(info.delivered.stream_seq >= ack.seq and (info.num_redelivered or 0) > 0)

        await eventually_true(handed_back, timeout_s=10)
        status = StatusStore(conn, await conn.js.key_value(names.STATUS_BUCKET))
        current = await status.get(request_id)
        assert current is not None
        await status.update(current.record.retried(ack.seq), current.revision)
        calls = await stack.functions.wait_for("/echo", 2, timeout_s=10)
        waited_s = time.monotonic() - queued
        final = await stack.wait_for_status("echo", request_id)
    finally:
        await stack.close()

    assert [call.body for call in calls] == [b"x", b"again"]
    assert (final["status"], final.get("error_type")) == ("COMPLETED", None)
    assert waited_s < 2.5, f"the run started {waited_s:.2f} s after it was queued (a poll interval is 5 s)"


async def test_a_large_body_is_kept_for_a_retry_and_deleted_after_success(stack: Stack, conn: Nats) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(500, b"boom")])
    request_id = await stack.submit("echo", content=_LARGE, headers={"Content-Type": "application/octet-stream"})
    await stack.wait_for_status("echo", request_id, timeout_s=30)
    assert await has_object(conn, names.body_object(request_id))

    await _retry(stack, request_id)
    await stack.wait_for_status("echo", request_id, timeout_s=30)

    assert [s.body == _LARGE for s in stack.functions.on("/echo")] == [True, True]
    assert not await has_object(conn, names.body_object(request_id)), "a succeeded request's body is deleted"


async def test_a_succeeded_requests_body_is_deleted_by_the_delivery_that_finds_it_completed(
    stack: Stack, conn: Nats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stopped between the completion and the body's delete (SIGKILLed, or the delete
    failed) left the body for good: the delivery after it found the request completed and deleted
    nothing, and no sweep is ever due for a succeeded request's body (found by a review)."""
    real_release = Retention.release_body
    failures = [NatsTimeoutError()]

    async def fails_once(self: Retention, request: QueuedRequest) -> None:
        if failures:
            raise failures.pop()
        await real_release(self, request)

    monkeypatch.setattr(Retention, "release_body", fails_once)
    await stack.register("echo")
    request_id = await stack.submit("echo", content=_LARGE, headers={"Content-Type": "application/octet-stream"})
    final = await stack.wait_for_status("echo", request_id, timeout_s=30)

    async def body_gone() -> bool:
        return not await has_object(conn, names.body_object(request_id))

    await eventually_true(body_gone, timeout_s=15, interval_s=0.1)
    assert failures == [], "the first delete failed"
    assert "error_type" not in final
    assert len(stack.functions.on("/echo")) == 1


async def test_large_bodies_and_results_are_deleted_when_their_time_is_up(stack: Stack, conn: Nats) -> None:
    await stack.register("echo", result_ttl=2)
    stack.functions.script("/echo", [Reply(500, b"boom")])
    failed = await stack.submit("echo", content=_LARGE)
    await stack.wait_for_status("echo", failed, timeout_s=30)
    succeeded = await stack.submit("echo", content=_LARGE)
    await stack.wait_for_status("echo", succeeded, timeout_s=30)
    body, result = names.body_object(failed), names.result_object(succeeded, 1)
    assert await has_object(conn, body)
    assert await has_object(conn, result)
    assert (await stack.client.get(f"/queue/echo/requests/{succeeded}")).content == _LARGE

    async def both_gone() -> bool:
        return not await has_object(conn, body) and not await has_object(conn, result)

    await eventually_true(both_gone, timeout_s=15, interval_s=0.2)

    async def nothing_left() -> bool:  # nor a "deleted" record in their place (a soak run found them all kept)
        return (await conn.js.stream_info(names.BLOB_STREAM)).state.messages == 0

    await eventually_true(nothing_left, timeout_s=5)
    gone = await stack.client.get(f"/queue/echo/requests/{failed}/status")
    assert gone.status_code == 404, "the status went with the same time to live"


async def test_a_failed_request_no_longer_kept_is_refused(stack: Stack, conn: Nats) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(500, b"boom")])
    request_id = await stack.submit("echo", content=b"x")
    await stack.wait_for_status("echo", request_id)
    envelopes = await conn.js.key_value(names.ENVELOPE_BUCKET)
    await envelopes.purge(request_id)

    response = await stack.client.post(f"/queue/echo/requests/{request_id}/retry")

    assert response.status_code == 400
    assert "no longer kept" in response.json()["detail"]
    assert (await stack.status("echo", request_id))["error_type"] == "function_error"
    assert [s.body for s in stack.functions.on("/echo")] == [b"x"], "nothing ran again"


async def test_each_run_backs_off_from_the_initial_delay(nats_server: EmbeddedNats) -> None:
    """The second run's first retry waits `initial_backoff`, not the delay its attempt number has
    over both runs (here 1 s against 100 s)."""
    backoff = {"initial_backoff": 1.0, "multiplier": 10.0, "max_backoff": 100.0, "jitter": 0.0}
    stack = await start_stack(nats_server, overrides={"retry": backoff})
    try:
        await stack.register("down", max_attempts=2)
        stack.functions.script("/down", [Reply(503, b"busy")] * 4)
        request_id = await stack.submit("down")
        await stack.wait_for_status("down", request_id, timeout_s=20)
        await _retry(stack, request_id, "down")
        final = await stack.wait_for_status("down", request_id, timeout_s=20)
    finally:
        await stack.close()

    calls = stack.functions.on("/down")
    assert final["attempts"] == 4
    assert len(calls) == 4
    assert 0.9 < calls[3].at - calls[2].at < 10, "the second run's first backoff is the initial one"


def test_each_run_of_the_retry_route_gets_the_first_runs_start_timeout_from_its_retry() -> None:
    """The second run's deadline was worked out from the first retry's message, whose deadline is
    fresh but whose `submitted_at` is the submission's: the time from the submission to the first
    retry was added to it (a 3 s timeout fired 11 s after a second retry; found by a review)."""
    submitted = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    first = QueuedRequest(function="echo", submitted_at=submitted, start_deadline=submitted + timedelta(seconds=3))
    first_retry = submitted + timedelta(minutes=10)
    second_retry = first_retry + timedelta(minutes=5)

    run_1 = next_run(first, 1, first_retry)
    run_2 = next_run(run_1, 2, second_retry)

    assert (run_1.retry, run_1.start_deadline) == (1, first_retry + timedelta(seconds=3))
    assert (run_2.retry, run_2.start_deadline) == (2, second_retry + timedelta(seconds=3))
    assert run_2.submitted_at == submitted
    assert next_run(QueuedRequest(function="echo", submitted_at=submitted), 1, first_retry).start_deadline is None
