"""Queue positions are exact, priority is strict, cancelling removes a request at once (SPEC §2 to §4)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from jetspool.domain import names
from jetspool.embedded import EmbeddedNats
from jetspool.jetstream.connection import connect
from jetspool.settings import NatsSettings
from tests.support.permissions import PASSWORD, as_user, users
from tests.support.servers import Reply, free_port
from tests.support.stack import Worker, start_stack

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.stack import Stack

_BLIND_GATEWAY = users("gateway", [f"$JS.API.DIRECT.GET.{names.QUEUE_STREAM}"])
"""A NATS user that may queue requests but not read the queue stream's messages directly: the
read behind a request's queue position gets no answer."""


async def _queue(stack: Stack, name: str, priority: str | None = None) -> dict[str, Any]:
    headers = {"X-Queue-Priority": priority} if priority else {}
    response = await stack.client.post(f"/queue/{name}", json={"n": 1}, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _positions(stack: Stack, name: str, ids: list[str]) -> list[int | None]:
    return [(await stack.status(name, request_id)).get("queue_position") for request_id in ids]


async def test_submit_answers_with_absolute_urls_and_position(stack: Stack) -> None:
    await stack.register("echo")

    body = await _queue(stack, "echo")

    prefix = f"{stack.url}/queue/echo/requests/{body['request_id']}"
    assert body["response_url"] == prefix
    assert body["status_url"] == f"{prefix}/status"
    assert body["cancel_url"] == f"{prefix}/cancel"
    assert body["queue_position"] == 0


async def test_positions_count_the_requests_ahead(stack: Stack) -> None:
    await stack.occupy()

    submitted = [await _queue(stack, "busy") for _ in range(5)]

    assert [s["queue_position"] for s in submitted] == [0, 1, 2, 3, 4]
    ids = [s["request_id"] for s in submitted]
    assert await _positions(stack, "busy", ids) == [0, 1, 2, 3, 4]
    running = await stack.status("busy", (await stack.functions.wait_for("/busy"))[0].header("x-call-id") or "")
    assert "queue_position" not in running


async def test_a_submit_answer_never_counts_a_request_stored_after_it_as_ahead(nats_server: EmbeddedNats) -> None:
    """Submits 48 at a time into a queue that does not move: a request's class figure was read
    beside its own message's count of those after it, and one stored between the two reads was
    counted as ahead (up to 27 too many; found by a load audit)."""
    stack = await start_stack(nats_server, worker=False)
    try:
        await stack.register("echo")

        answers: list[dict[str, Any]] = []
        for _ in range(5):
            answers += await asyncio.gather(*(_queue(stack, "echo") for _ in range(48)))
        settled = await _positions(stack, "echo", [answer["request_id"] for answer in answers])
    finally:
        await stack.close()

    assert sorted(p or 0 for p in settled) == list(range(len(answers))), "read in a quiet queue: exact"
    told = [answer["queue_position"] for answer in answers]
    overstated = [(said, truth) for said, truth in zip(told, settled, strict=True) if truth is None or said > truth]
    assert overstated == []


async def test_low_waits_behind_later_normal_and_high_goes_first(stack: Stack) -> None:
    await stack.occupy()
    normal_1 = (await _queue(stack, "busy"))["request_id"]
    low = (await _queue(stack, "busy", "low"))["request_id"]
    normal_2 = (await _queue(stack, "busy"))["request_id"]
    high = (await _queue(stack, "busy", "high"))["request_id"]

    assert await _positions(stack, "busy", [high, normal_1, normal_2, low]) == [0, 1, 2, 3]

    stack.functions.release("/busy", 5)
    for request_id in (high, normal_1, normal_2, low):
        await stack.wait_for_status("busy", request_id)
    order = [seen.header("x-call-id") for seen in stack.functions.on("/busy")[1:]]
    assert order == [high, normal_1, normal_2, low]


async def test_positions_move_up_after_a_cancel_and_after_each_start(stack: Stack) -> None:
    await stack.occupy()
    ids = [(await _queue(stack, "busy"))["request_id"] for _ in range(4)]

    cancel = await stack.client.put(f"/queue/busy/requests/{ids[1]}/cancel")
    assert cancel.status_code == 202
    assert await _positions(stack, "busy", [ids[0], ids[2], ids[3]]) == [0, 1, 2]

    stack.functions.release("/busy")  # the running one finishes, ids[0] starts
    await stack.wait_for_status("busy", ids[0], "IN_PROGRESS")
    assert await _positions(stack, "busy", [ids[2], ids[3]]) == [0, 1]

    stack.functions.release("/busy", 3)
    for request_id in (ids[0], ids[2], ids[3]):
        await stack.wait_for_status("busy", request_id)
    called = [seen.header("x-call-id") for seen in stack.functions.on("/busy")]
    assert ids[1] not in called, "a cancelled request is never delivered"


async def test_a_run_of_the_retry_route_counts_the_requests_of_its_class_stored_before_it(stack: Stack) -> None:
    """Its new message waits behind them; the attempts of its run before made it count none of
    them (queue_position 0 where 2 wait ahead; found by a review)."""
    await stack.register("busy", concurrency=1)
    stack.functions.script("/busy", [Reply(500, b"boom")])
    failed = (await _queue(stack, "busy"))["request_id"]
    assert (await stack.wait_for_status("busy", failed))["error_type"] == "function_error"
    stack.functions.hold("/busy")
    running = (await _queue(stack, "busy"))["request_id"]
    await stack.wait_for_status("busy", running, "IN_PROGRESS")
    ahead = [(await _queue(stack, "busy"))["request_id"] for _ in range(2)]

    retried = await stack.client.post(f"/queue/busy/requests/{failed}/retry")
    positions = await _positions(stack, "busy", [*ahead, failed])
    stack.functions.release("/busy", 4)
    started = [(await stack.wait_for_status("busy", r))["started_at"] for r in (*ahead, failed)]

    assert (retried.status_code, retried.json()["queue_position"]) == (202, 2)
    assert positions == [0, 1, 2]
    assert started == sorted(started), "they did start in that order"


async def test_cancelled_waiting_request_completes_as_cancelled(stack: Stack) -> None:
    await stack.occupy()
    request_id = (await _queue(stack, "busy"))["request_id"]

    cancel = await stack.client.put(f"/queue/busy/requests/{request_id}/cancel")
    status = await stack.status("busy", request_id)
    result = await stack.client.get(f"/queue/busy/requests/{request_id}")
    again = await stack.client.put(f"/queue/busy/requests/{request_id}/cancel")

    assert (cancel.status_code, cancel.json()["status"]) == (202, "CANCELLATION_REQUESTED")
    assert (status["status"], status["error_type"]) == ("COMPLETED", "cancelled")
    assert result.status_code == 400
    assert result.json()["error_type"] == "cancelled"
    assert result.headers["x-error-type"] == "cancelled"
    assert (again.status_code, again.json()["status"]) == (400, "ALREADY_COMPLETED")
    stats = (await stack.client.get("/system/functions/busy")).json()["stats"]
    assert stats["waiting"]["normal"] == 0


async def test_cancelling_a_running_request_aborts_the_call_and_posts_cancel_path(stack: Stack) -> None:
    await stack.register("busy", concurrency=1, cancel_path="/cancel")
    stack.functions.hold("/busy")
    request_id = (await _queue(stack, "busy"))["request_id"]
    await stack.functions.wait_for("/busy")
    await stack.wait_for_status("busy", request_id, "IN_PROGRESS")

    cancel = await stack.client.put(f"/queue/busy/requests/{request_id}/cancel")
    final = await stack.wait_for_status("busy", request_id)
    [notice] = await stack.functions.wait_for("/busy/cancel")  # url + cancel_path

    assert (cancel.status_code, cancel.json()["status"]) == (202, "CANCELLATION_REQUESTED")
    assert final["error_type"] == "cancelled"
    assert notice.body == f'{{"request_id":"{request_id}"}}'.encode()
    assert notice.header("x-call-id") == request_id
    stack.functions.release("/busy")


async def test_the_cancel_path_carries_the_key_of_the_function_url_as_registered(stack: Stack) -> None:
    """Like the call itself: a key in the URL (`?code=`) goes with the cancel notice, unaltered."""
    await stack.register("busy", path="/busy?code=k%2F1", concurrency=1, cancel_path="/cancel")
    stack.functions.hold("/busy")
    request_id = (await _queue(stack, "busy"))["request_id"]
    await stack.wait_for_status("busy", request_id, "IN_PROGRESS")

    await stack.client.put(f"/queue/busy/requests/{request_id}/cancel")
    [notice] = await stack.functions.wait_for("/busy/cancel")

    assert notice.query == "code=k%2F1"
    stack.functions.release("/busy")


async def test_a_slow_cancel_path_does_not_hold_the_cancelled_status_back(stack: Stack) -> None:
    await stack.register("busy", concurrency=1, cancel_path="/cancel")
    stack.functions.hold("/busy")
    stack.functions.hold("/busy/cancel")  # answers only when released
    request_id = (await _queue(stack, "busy"))["request_id"]
    await stack.wait_for_status("busy", request_id, "IN_PROGRESS")

    await stack.client.put(f"/queue/busy/requests/{request_id}/cancel")

    final = await stack.wait_for_status("busy", request_id, timeout_s=5)  # the notice waits up to 10 s
    assert final["error_type"] == "cancelled"
    assert len(await stack.functions.wait_for("/busy/cancel")) == 1
    stack.functions.release("/busy/cancel")
    stack.functions.release("/busy")


async def test_cancel_of_unknown_or_malformed_ids(stack: Stack) -> None:
    await stack.register("echo")

    unknown = await stack.client.put("/queue/echo/requests/00000000-0000-4000-8000-000000000000/cancel")
    malformed = await stack.client.put("/queue/echo/requests/nope/cancel")

    assert (unknown.status_code, unknown.json()["status"]) == (404, "NOT_FOUND")
    assert unknown.json()["detail"]
    assert malformed.status_code == 422


async def test_cancel_of_a_completed_request_is_already_completed(stack: Stack) -> None:
    await stack.register("echo")
    request_id = (await _queue(stack, "echo"))["request_id"]
    await stack.wait_for_status("echo", request_id)

    response = await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")

    assert (response.status_code, response.json()["status"]) == (400, "ALREADY_COMPLETED")
    assert response.json()["detail"]


async def test_eta_comes_from_recent_run_times_position_and_concurrency(stack: Stack) -> None:
    await stack.occupy()
    first = (await _queue(stack, "busy"))["request_id"]
    second = (await _queue(stack, "busy"))["request_id"]
    assert (await stack.status("busy", second))["eta_seconds"] is None, "no run seen yet"

    stack.functions.release("/busy")  # the held request completes; `first` starts
    await stack.wait_for_status("busy", first, "IN_PROGRESS")
    status = await stack.status("busy", second)

    assert status["queue_position"] == 0
    assert status["eta_seconds"] > 0
    stack.functions.release("/busy", 2)


async def test_eta_spreads_the_wait_over_every_workers_calls(stack: Stack) -> None:
    """`concurrency` holds per worker process: with two workers running a call each, the estimate
    was twice the wait (found by a load audit)."""
    second = Worker(stack.settings)
    await second.start()
    try:
        await stack.register("busy", concurrency=1)
        stack.functions.hold("/busy")
        seeding = (await _queue(stack, "busy"))["request_id"]
        await stack.functions.wait_for("/busy", 1)
        stack.functions.release("/busy")  # one run seen: the mean run time is known
        await stack.wait_for_status("busy", seeding)
        running = [(await _queue(stack, "busy"))["request_id"] for _ in range(2)]
        for request_id in running:  # one on each worker
            await stack.wait_for_status("busy", request_id, "IN_PROGRESS")
        waiting = (await _queue(stack, "busy"))["request_id"]

        status = await stack.status("busy", waiting)
        mean_s = stack.app.state.gateway.metrics.run_times["busy"]
    finally:
        stack.functions.release("/busy", 3)
        await second.stop()

    assert status["queue_position"] == 0
    assert status["eta_seconds"] == round(mean_s / 2, 3), "one run's time, over the two calls under way"


async def test_a_stored_request_is_answered_with_its_id_when_its_position_cannot_be_read(tmp_path: Path) -> None:
    """Found by a chaos run: nats-server killed just after a submit's message was stored made the
    position read time out, and the submit answered 503 although the request was queued (it then
    ran; a client told 503 would have submitted it again). Here the position read is refused for
    good, so the answer comes once the gateway stops waiting for it."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=_BLIND_GATEWAY)
    server.start()
    try:
        stack = await start_stack(server, worker=False, overrides=as_user("gateway"))
        try:
            await stack.register("echo")
            answer = await stack.client.post("/queue/echo", json={"n": 1})
        finally:
            await stack.close()
        admin = await connect(NatsSettings(url=server.url, user="admin", password=PASSWORD), "test")
        try:
            stored = (await admin.js.stream_info(names.QUEUE_STREAM)).state.messages
        finally:
            await admin.close()
    finally:
        server.stop()

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["queue_position"] is None
    assert answer.headers["X-Request-Id"] == body["request_id"]
    assert stored == 1
