"""Wire messages and status records: versioned encodings, transitions and the public status object (SPEC §3)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from jetspool.domain.errors import DecodeError
from jetspool.domain.messages import WIRE_VERSION, CallbackJob, QueuedRequest, StoredResult, decode, encode
from jetspool.domain.status import ErrorType, State, StatusRecord, decode_status, public_status

REQUEST_ID = "0b8f6f9e-8c1a-4a53-9d5e-3f1f6f4b2c10"
BASE_URL = "https://queue.example.com"
SUBMITTED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
STARTED = SUBMITTED + timedelta(seconds=2)
DONE = STARTED + timedelta(seconds=1, microseconds=500_000)
PREFIX = f"{BASE_URL}/queue/echo/requests/{REQUEST_ID}"


def _queued(**changes: str | None) -> QueuedRequest:
    request = QueuedRequest(request_id=REQUEST_ID, function="echo", submitted_at=SUBMITTED)
    return msgspec.structs.replace(request, **changes)


def _record() -> StatusRecord:
    return StatusRecord(request_id=REQUEST_ID, function="echo", submitted_at=SUBMITTED)


# --- encode / decode -----------------------------------------------------------------------


def test_queued_request_round_trips_with_a_binary_body() -> None:
    request = QueuedRequest(
        request_id=REQUEST_ID,
        function="echo",
        priority="high",
        method="PUT",
        path="models/a/predict",
        query="x=1&y=%20",
        headers=[("content-type", "application/octet-stream"), ("x-multi", "a"), ("x-multi", "b")],
        body=bytes(range(256)),
        submitted_at=SUBMITTED,
        callback_url="https://cb.example.com/done",
        webhook_url="https://hooks.example.com/fal",
        no_retry=True,
    )
    decoded = decode(encode(request), QueuedRequest)
    assert decoded == request
    assert decoded.body == bytes(range(256))
    assert decoded.submitted_at == SUBMITTED


def test_queued_request_is_versioned_json_with_a_base64_body() -> None:
    request = msgspec.structs.replace(_queued(), body=bytes(range(256)))
    wire = msgspec.json.decode(encode(request))
    assert wire["v"] == WIRE_VERSION == 1
    assert base64.b64decode(wire["body"]) == bytes(range(256))
    assert wire["submitted_at"] == "2024-01-02T03:04:05Z"


def test_queued_request_defaults_after_decoding_a_minimal_message() -> None:
    data = b'{"v": 1, "request_id": "r", "function": "echo", "submitted_at": "2024-01-02T03:04:05Z"}'
    request = decode(data, QueuedRequest)
    assert request.priority == "normal"
    assert request.method == "POST"
    assert request.path == ""
    assert request.headers == []
    assert request.body == b""
    assert request.body_ref is None
    assert request.no_retry is False


def test_queued_request_with_out_of_line_body_round_trips() -> None:
    request = msgspec.structs.replace(_queued(), body_ref=f"body-{REQUEST_ID}")
    assert decode(encode(request), QueuedRequest).body_ref == f"body-{REQUEST_ID}"


@pytest.mark.parametrize("kind", ["openfaas", "fal"])
def test_callback_job_round_trips(kind: str) -> None:
    job = msgspec.convert(
        {"request_id": REQUEST_ID, "function": "echo", "kind": kind, "url": "https://cb.example.com/x"}, CallbackJob
    )
    assert decode(encode(job), CallbackJob) == job
    assert msgspec.json.decode(encode(job))["v"] == 1


def test_stored_result_round_trips_with_a_binary_body() -> None:
    result = StoredResult(status_code=201, content_type="application/octet-stream", body=bytes(range(256)))
    decoded = decode(encode(result), StoredResult)
    assert decoded == result
    assert decoded.body == bytes(range(256))
    assert decoded.v == 1


def test_stored_result_with_out_of_line_body_round_trips() -> None:
    result = StoredResult(status_code=200, body_ref=f"result-{REQUEST_ID}")
    assert decode(encode(result), StoredResult) == result


def test_stored_result_is_msgpack() -> None:
    result = StoredResult(status_code=200, content_type="text/plain", body=b"hi", headers=[("Location", "/x")])
    assert msgspec.msgpack.decode(encode(result)) == {
        "v": 1,
        "status_code": 200,
        "content_type": "text/plain",
        "body": b"hi",
        "body_ref": None,
        "headers": [["Location", "/x"]],
    }
    assert decode(encode(result), StoredResult) == result


def test_a_stored_result_written_before_headers_were_kept_reads_with_none() -> None:
    earlier = msgspec.msgpack.encode({"v": 1, "status_code": 200, "content_type": None, "body": b"", "body_ref": None})
    assert decode(earlier, StoredResult).headers == []


def test_status_record_round_trips() -> None:
    record = (
        _record()
        .started(3, STARTED)
        .completed(
            DONE,
            keep_s=60,
            function_status=502,
            inference_time=1.5,
            error="gave up",
            error_type=ErrorType.RUNNER_UNAVAILABLE,
        )
    )
    decoded = decode_status(record.encode())
    assert decoded == record
    assert decoded.status is State.COMPLETED
    assert decoded.error_type is ErrorType.RUNNER_UNAVAILABLE


def test_new_status_record_round_trips() -> None:
    assert decode_status(_record().encode()) == _record()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b"{}",
        b'{"v": 1, "request_id": "r", "function": "echo"}',
        b'{"v": 1, "request_id": "r", "function": "echo", "submitted_at": "yesterday"}',
        b'{"v": 1, "request_id": "r", "function": "echo", "submitted_at": "2024-01-02T03:04:05Z", "priority": "x"}',
        b'{"v": 1, "request_id": "r", "function": "echo", "submitted_at": "2024-01-02T03:04:05Z", "body": "%%%"}',
    ],
)
def test_unreadable_queued_request_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="QueuedRequest"):
        decode(data, QueuedRequest)


@pytest.mark.parametrize(
    "data",
    [b"garbage", b"{}", b'{"v": 1, "request_id": "r", "function": "echo", "kind": "email", "url": "https://x"}'],
)
def test_unreadable_callback_job_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="CallbackJob"):
        decode(data, CallbackJob)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"not msgpack at all", msgspec.msgpack.encode({"body": b"x"})])
def test_unreadable_stored_result_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="StoredResult"):
        decode(data, StoredResult)


@pytest.mark.parametrize("data", [b"", b"garbage", b"{}", b'{"request_id": "r", "function": "echo", "status": "DONE"}'])
def test_unreadable_status_record_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_status(data)


def test_queued_request_of_another_version_raises_decode_error() -> None:
    wire = msgspec.json.decode(encode(_queued()))
    wire["v"] = 2
    with pytest.raises(DecodeError, match="version 2"):
        decode(msgspec.json.encode(wire), QueuedRequest)


def test_callback_job_of_another_version_raises_decode_error() -> None:
    data = b'{"v": 2, "request_id": "r", "function": "echo", "kind": "fal", "url": "https://x"}'
    with pytest.raises(DecodeError, match="version 2"):
        decode(data, CallbackJob)


def test_stored_result_of_another_version_raises_decode_error() -> None:
    data = msgspec.msgpack.encode({"v": 2, "status_code": 200, "body": b"x"})
    with pytest.raises(DecodeError, match="version 2"):
        decode(data, StoredResult)


def test_status_record_of_another_version_raises_decode_error() -> None:
    wire = msgspec.json.decode(_record().encode())
    wire["v"] = 2
    with pytest.raises(DecodeError):
        decode_status(msgspec.json.encode(wire))


# --- callback targets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("callback_url", "webhook_url", "targets"),
    [
        (None, None, []),
        ("", "", []),
        ("https://cb/x", None, [("openfaas", "https://cb/x")]),
        (None, "https://hook/y", [("fal", "https://hook/y")]),
        ("https://cb/x", "https://hook/y", [("openfaas", "https://cb/x"), ("fal", "https://hook/y")]),
    ],
)
def test_callbacks_lists_every_target_with_its_kind(
    callback_url: str | None, webhook_url: str | None, targets: list[tuple[str, str]]
) -> None:
    assert _queued(callback_url=callback_url, webhook_url=webhook_url).callbacks() == targets


# --- status transitions --------------------------------------------------------------------


def test_new_status_record_is_in_queue_with_no_attempts() -> None:
    record = _record()
    assert record.status is State.IN_QUEUE
    assert record.attempts == 0
    assert record.priority == "normal"
    assert not record.is_completed
    assert record.v == 1


def test_started_moves_to_in_progress_and_counts_the_attempt() -> None:
    record = _record()
    started = record.started(1, STARTED)
    assert started.status is State.IN_PROGRESS
    assert started.attempts == 1
    assert started.started_at == STARTED
    assert record.status is State.IN_QUEUE


def test_requeued_goes_back_in_queue_keeping_attempts_and_the_reason() -> None:
    requeued = _record().started(2, STARTED).requeued("function answered 503")
    assert requeued.status is State.IN_QUEUE
    assert requeued.attempts == 2
    assert requeued.error == "function answered 503"
    assert requeued.error_type is None
    assert not requeued.is_completed


def test_completed_records_the_final_outcome() -> None:
    completed = (
        _record()
        .started(1, STARTED)
        .completed(
            DONE,
            keep_s=60,
            function_status=504,
            inference_time=1.5,
            error="timed out",
            error_type=ErrorType.FUNCTION_TIMEOUT,
        )
    )
    assert completed.status is State.COMPLETED
    assert completed.is_completed
    assert completed.completed_at == DONE
    assert completed.function_status == 504
    assert completed.inference_time == 1.5
    assert completed.error == "timed out"
    assert completed.error_type is ErrorType.FUNCTION_TIMEOUT
    assert completed.started_at == STARTED
    assert completed.attempts == 1


def test_an_outcome_of_no_attempt_keeps_the_run_time_of_the_attempt_before() -> None:
    """SPEC §3: `inference_time` is the final attempt's, also when the request then ends while it
    waits (cancelled, or its start deadline passed); null only when no attempt ran."""

    def cancelled(record: StatusRecord) -> StatusRecord:
        return record.completed(
            DONE, keep_s=60, function_status=None, inference_time=None, error_type=ErrorType.CANCELLED
        )

    retried = _record().started(1, STARTED).requeued("function answered 503", 0.25)

    assert retried.status is State.IN_QUEUE
    assert cancelled(retried).inference_time == 0.25
    assert retried.started(2, STARTED).requeued("again").inference_time == 0.25, "a hand-back keeps it"
    assert cancelled(_record()).inference_time is None


def test_successful_completion_clears_the_error_of_an_earlier_retry() -> None:
    completed = (
        _record()
        .started(1, STARTED)
        .requeued("function answered 503")
        .started(2, STARTED)
        .completed(DONE, keep_s=60, function_status=200, inference_time=0.5)
    )
    assert completed.error is None
    assert completed.error_type is None
    assert completed.attempts == 2


# --- the public status object --------------------------------------------------------------


def test_public_status_has_absolute_urls_under_the_base_url() -> None:
    view = public_status(_record(), BASE_URL)
    assert view["request_id"] == REQUEST_ID
    assert view["response_url"] == PREFIX
    assert view["status_url"] == f"{PREFIX}/status"
    assert view["cancel_url"] == f"{PREFIX}/cancel"


def test_public_status_in_queue_has_no_metrics_or_error() -> None:
    view = public_status(_record().started(1, STARTED).requeued("function answered 503"), BASE_URL)
    assert view["status"] == "IN_QUEUE"
    assert "metrics" not in view
    assert "error" not in view
    assert "error_type" not in view


def test_public_status_in_progress_has_no_metrics_or_error() -> None:
    view = public_status(_record().started(1, STARTED), BASE_URL)
    assert view["status"] == "IN_PROGRESS"
    assert view["attempts"] == 1
    assert "metrics" not in view
    assert "error" not in view


def test_public_status_of_a_success_has_metrics_and_no_error() -> None:
    record = _record().started(1, STARTED).completed(DONE, keep_s=60, function_status=200, inference_time=1.5)
    view = public_status(record, BASE_URL)
    assert view["status"] == "COMPLETED"
    assert view["metrics"] == {"inference_time": 1.5}
    assert "error" not in view
    assert "error_type" not in view


def test_public_status_of_a_failure_has_metrics_error_and_error_type() -> None:
    record = (
        _record()
        .started(10, STARTED)
        .completed(
            DONE,
            keep_s=60,
            function_status=503,
            inference_time=0.25,
            error="gave up",
            error_type=ErrorType.RUNNER_UNAVAILABLE,
        )
    )
    view = public_status(record, BASE_URL)
    assert view["metrics"] == {"inference_time": 0.25}
    assert view["error"] == "gave up"
    assert view["error_type"] == "runner_unavailable"


def test_public_status_times_are_rfc3339_utc_with_z() -> None:
    record = _record().started(1, STARTED).completed(DONE, keep_s=60, function_status=200, inference_time=1.5)
    view = public_status(record, BASE_URL)
    assert view["submitted_at"] == "2024-01-02T03:04:05Z"
    assert view["started_at"] == "2024-01-02T03:04:07Z"
    assert view["completed_at"] == "2024-01-02T03:04:08.500000Z"


def test_public_status_converts_other_time_zones_to_utc() -> None:
    local = datetime(2024, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    record = StatusRecord(request_id=REQUEST_ID, function="echo", submitted_at=local)
    assert public_status(record, BASE_URL)["submitted_at"] == "2024-01-02T03:04:05Z"


def test_public_status_times_not_yet_reached_are_null() -> None:
    view = public_status(_record(), BASE_URL)
    assert view["started_at"] is None
    assert view["completed_at"] is None


def test_public_status_logs_are_null_unless_asked_for() -> None:
    view = public_status(_record(), BASE_URL)
    assert "logs" in view
    assert view["logs"] is None


def test_public_status_carries_the_logs_it_is_given() -> None:
    logs: list[dict[str, object]] = [
        {"message": "attempt 1", "level": "INFO", "source": "worker", "timestamp": "2024-01-02T03:04:07Z"}
    ]
    assert public_status(_record(), BASE_URL, logs=logs)["logs"] == logs
    assert public_status(_record(), BASE_URL, logs=[])["logs"] == []


def test_public_status_carries_the_extension_fields() -> None:
    record = msgspec.structs.replace(_record(), priority="low")
    view = public_status(record, BASE_URL)
    assert view["function"] == "echo"
    assert view["priority"] == "low"
    assert view["attempts"] == 0


def test_a_callback_job_of_the_previous_version_reads_as_one_of_the_first_round() -> None:
    """Jobs queued before rounds were kept carry `again` instead: they deliver in round 0."""
    earlier = b'{"v":1,"request_id":"r","function":"echo","kind":"openfaas","url":"http://h/","run":0,"again":true}'
    assert decode(earlier, CallbackJob).round == 0
