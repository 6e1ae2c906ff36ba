"""A submit stores one thing, the queue message: the request id names the message (its stream
sequence and a nonce), and the status of a request no worker has taken reads from the message."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import nats
import pytest
from nats.js.errors import KeyNotFoundError, NotFoundError

from jetspool.domain import ids, names
from jetspool.domain.status import ErrorType, StatusRecord, utcnow
from tests.support.servers import eventually_true

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.kv import KeyValue

    from tests.support.stack import Stack


def test_a_derived_id_is_a_version_8_uuid_carrying_sequence_and_nonce() -> None:
    nonce = ids.new_nonce()
    request_id = ids.derived_id(123_456, nonce)

    parsed = uuid.UUID(request_id)
    assert str(parsed) == request_id
    assert parsed.version == 8
    assert parsed.variant == uuid.RFC_4122
    assert ids.parse_derived(request_id) == (123_456, nonce)


@pytest.mark.parametrize("seq", [1, ids.MAX_SEQ])
def test_the_whole_sequence_range_round_trips(seq: int) -> None:
    for nonce in ("0" * 19, f"{(1 << 74) - 1:019x}"):
        assert ids.parse_derived(ids.derived_id(seq, nonce)) == (seq, nonce)


def test_other_ids_are_not_derived() -> None:
    assert ids.parse_derived(str(uuid.uuid4())) is None
    assert ids.parse_derived(str(uuid.UUID(int=(8 << 76) | (0b10 << 62)))) is None  # sequence 0
    with pytest.raises(ValueError, match="does not fit"):
        ids.derived_id(ids.MAX_SEQ + 1, ids.new_nonce())


async def _status_kv(stack: Stack) -> tuple[Client, KeyValue]:
    nc = await nats.connect(stack.nats.url)
    return nc, await nc.jetstream().key_value(names.STATUS_BUCKET)


async def test_a_waiting_request_has_no_record_yet_its_status_reads_from_its_message(
    stack_without_worker: Stack,
) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    first = await stack.submit("echo")
    second = await stack.submit("echo", content=b"{}")
    nc, kv = await _status_kv(stack)
    try:
        for request_id in (first, second):
            assert ids.parse_derived(request_id) is not None
            with pytest.raises(KeyNotFoundError):
                await kv.get(request_id)
        status = await stack.status("echo", second)
        assert status["status"] == "IN_QUEUE"
        assert status["request_id"] == second
        assert status["queue_position"] == 1
        assert (await stack.client.get(f"/fal/queue/{second}/get")).json()["queue_position"] == 1  # by id alone
    finally:
        await nc.close()


async def _queue_one(stack: Stack) -> tuple[str, int, str]:
    """Register `echo` and submit one request to it: (request id, stream sequence, nonce)."""
    await stack.register("echo")
    request_id = await stack.submit("echo")
    parsed = ids.parse_derived(request_id)
    assert parsed is not None
    return request_id, *parsed


async def test_an_id_naming_a_message_with_another_nonce_is_unknown(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    request_id, seq, nonce = await _queue_one(stack)
    forged = ids.derived_id(seq, f"{int(nonce, 16) ^ 1:019x}")
    elsewhere = ids.derived_id(seq + 1, nonce)

    for unknown in (forged, elsewhere):
        response = await stack.client.get(f"/queue/echo/requests/{unknown}/status")
        assert response.status_code == 404, response.text
        assert response.headers["x-request-id"] == unknown
    assert (await stack.client.get(f"/queue/other/requests/{request_id}/status")).status_code == 404


async def test_cancelling_a_waiting_request_writes_its_first_record(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    request_id, seq, _ = await _queue_one(stack)

    response = await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")

    assert response.status_code == 202, response.text
    status = await stack.status("echo", request_id)
    assert (status["status"], status["error_type"]) == ("COMPLETED", "cancelled")
    nc, kv = await _status_kv(stack)
    try:
        assert (await kv.get(request_id)).revision is not None
        with pytest.raises(NotFoundError):
            await nc.jetstream().get_msg(names.QUEUE_STREAM, seq=seq)
    finally:
        await nc.close()


async def test_a_delete_marker_in_place_of_a_waiting_requests_record_is_written_over(
    stack_without_worker: Stack,
) -> None:
    """A delete marker under a waiting request's key (left by an operator, say) is not a record: the
    status still reads from the message, and the first write names the marker's revision. Naming
    revision 0, as for no record, it was refused over and over: a cancel never answered."""
    stack = stack_without_worker
    request_id, _, _ = await _queue_one(stack)
    nc, kv = await _status_kv(stack)
    try:
        await kv.delete(request_id)
        waiting = await stack.status("echo", request_id)
        cancelled = await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")
    finally:
        await nc.close()

    assert waiting["status"] == "IN_QUEUE"
    assert cancelled.status_code == 202, cancelled.text
    assert (await stack.status("echo", request_id))["error_type"] == "cancelled"


async def test_a_delete_marker_in_place_of_a_queued_requests_own_record_is_written_over(
    stack_without_worker: Stack,
) -> None:
    """The same for a request with an id of its own (keyed, here): a worker taking it found no
    record, could not create one over the marker, and read and tried again without end (found by a
    review). It runs."""
    stack = stack_without_worker
    await stack.register("echo")
    request_id = await stack.submit("echo", content=b"x", headers={"Idempotency-Key": "marked"})
    nc, kv = await _status_kv(stack)
    try:
        await kv.delete(request_id)
    finally:
        await nc.close()
    await stack.start_worker()

    await stack.functions.wait_for("/echo")  # the worker's record is written before the call
    final = await stack.wait_for_status("echo", request_id, timeout_s=15)

    assert (final["status"], final.get("error_type")) == ("COMPLETED", None)
    assert [seen.body for seen in stack.functions.on("/echo")] == [b"x"]


@pytest.mark.parametrize(
    "submit",
    [{"headers": {"Idempotency-Key": "k-1"}}, {"content": b"x" * (5 * 1024 * 1024)}],
    ids=["keyed", "body-out-of-line"],
)
async def test_a_request_needing_its_id_first_records_its_status_at_once(
    stack_without_worker: Stack, submit: dict[str, Any]
) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    request_id = await stack.submit("echo", **submit)

    assert ids.parse_derived(request_id) is None
    nc, kv = await _status_kv(stack)
    try:
        assert (await kv.get(request_id)).value
    finally:
        await nc.close()
    assert (await stack.status("echo", request_id))["status"] == "IN_QUEUE"


async def test_a_worker_taking_a_derived_request_records_it_once(stack: Stack) -> None:
    await stack.register("echo")
    request_id = await stack.submit("echo", content=b'{"n": 1}')

    done = await stack.wait_for_status("echo", request_id)

    assert (done["status"], done.get("error_type"), done["attempts"]) == ("COMPLETED", None, 1)
    seen = stack.functions.on("/echo")
    assert [call.header("x-call-id") for call in seen] == [request_id]


async def _record_before_the_worker(stack: Stack, record: StatusRecord) -> None:
    nc, kv = await _status_kv(stack)
    try:
        await kv.create(record.request_id, record.encode())
    finally:
        await nc.close()


async def test_a_request_completed_before_any_worker_took_it_is_not_called(stack_without_worker: Stack) -> None:
    """A cancel that wrote its record but died before withdrawing the message: the worker's first
    write, a create, fails, and the message is dropped without a call, after what follows a
    completion (the totals here; callbacks and events too), which that cancel may not have done."""
    stack = stack_without_worker
    request_id, seq, _ = await _queue_one(stack)
    waiting = StatusRecord(request_id=request_id, function="echo", submitted_at=utcnow(), queue_seq=seq)
    cancelled = waiting.completed(
        utcnow(), keep_s=60, function_status=None, inference_time=None, error="x", error_type=ErrorType.CANCELLED
    )
    await _record_before_the_worker(stack, cancelled)

    await stack.start_worker()

    async def taken() -> bool:
        async with await nats.connect(stack.nats.url) as nc:
            try:
                await nc.jetstream().get_msg(names.QUEUE_STREAM, seq=seq)
            except NotFoundError:
                return True
            return False

    async def counted() -> bool:
        figures = (await stack.client.get("/system/functions/echo")).json()["stats"]
        return bool(figures["failed"] == 1)

    await eventually_true(taken, timeout_s=10)
    assert stack.functions.on("/echo") == []
    assert (await stack.status("echo", request_id))["error_type"] == "cancelled"
    await eventually_true(counted, timeout_s=10)


async def test_a_first_delivery_finding_its_request_started_is_left_for_a_redelivery_not_dropped(
    stack_without_worker: Stack,
) -> None:
    """The create of a first delivery fails on a record that another attempt moved on: the message
    is left alone (that attempt's worker may still hold it), and its redelivery after the ack wait
    reads the record and runs the next attempt."""
    stack = stack_without_worker
    request_id, seq, _ = await _queue_one(stack)
    waiting = StatusRecord(request_id=request_id, function="echo", submitted_at=utcnow(), queue_seq=seq)
    await _record_before_the_worker(stack, waiting.started(1, utcnow()))

    await stack.start_worker()

    done = await stack.wait_for_status("echo", request_id)
    assert (done.get("error_type"), done["attempts"]) == (None, 2)
    assert [call.header("x-attempt") for call in stack.functions.on("/echo")] == ["2"]
