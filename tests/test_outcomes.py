"""What a completed request answers (SPEC §5) and what its callbacks carry (SPEC §6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from jetspool.callbacks.payloads import build
from jetspool.domain.messages import StoredResult
from jetspool.domain.outcomes import completed_answer
from jetspool.domain.status import ErrorType, StatusRecord

REQUEST_ID = "0b8f6f9e-8c1a-4a53-9d5e-3f1f6f4b2c10"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SUBMITTED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
STARTED = SUBMITTED + timedelta(seconds=2)
DONE = STARTED + timedelta(seconds=1.5)

ERROR_STATUS = [
    (ErrorType.RUNNER_UNAVAILABLE, 503),
    (ErrorType.FUNCTION_TIMEOUT, 504),
    (ErrorType.REQUEST_TIMEOUT, 504),
    (ErrorType.CANCELLED, 400),
]
ERROR_OUTCOMES = [error_type for error_type, _ in ERROR_STATUS]


def _record(
    error_type: ErrorType | None = None,
    error: str | None = None,
    *,
    function_status: int | None = 200,
    inference_time: float | None = 1.5,
    started_at: datetime | None = STARTED,
) -> StatusRecord:
    record = StatusRecord(request_id=REQUEST_ID, function="echo", submitted_at=SUBMITTED)
    if started_at is not None:
        record = record.started(1, started_at)
    return record.completed(
        DONE,
        keep_s=60,
        function_status=function_status,
        inference_time=inference_time,
        error=error,
        error_type=error_type,
    )


def _nanoseconds(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1) * 1000


# --- the result route's answer -------------------------------------------------------------


def test_success_answers_the_functions_status_body_and_content_type() -> None:
    result = StoredResult(status_code=201, content_type="text/plain; charset=utf-8", body=b"made it")
    answer = completed_answer(_record(function_status=201), result)
    assert answer.status_code == 201
    assert answer.body == b"made it"
    assert answer.content_type == "text/plain; charset=utf-8"
    assert answer.headers == {"X-Request-Id": REQUEST_ID, "X-Fal-Request-Id": REQUEST_ID}


def test_success_answers_binary_bodies_unchanged() -> None:
    body = bytes(range(256))
    result = StoredResult(status_code=200, content_type="application/octet-stream", body=body)
    assert completed_answer(_record(), result).body == body


def test_function_error_answers_the_functions_status_and_body_with_error_type_header() -> None:
    result = StoredResult(status_code=422, content_type="application/json", body=b'{"detail": "no prompt"}')
    record = _record(ErrorType.FUNCTION_ERROR, "function answered 422", function_status=422)
    answer = completed_answer(record, result)
    assert answer.status_code == 422
    assert answer.body == b'{"detail": "no prompt"}'
    assert answer.content_type == "application/json"
    assert answer.headers == {
        "X-Request-Id": REQUEST_ID,
        "X-Fal-Request-Id": REQUEST_ID,  # the server's answer, to fal-client: not retried
        "X-Error-Type": "function_error",
        "X-Fal-Error-Type": "function_error",  # what fal's clients read when the body is the function's
    }


@pytest.mark.parametrize(("error_type", "status_code"), ERROR_STATUS)
def test_error_outcome_answers_json_with_detail_and_error_type(error_type: ErrorType, status_code: int) -> None:
    answer = completed_answer(_record(error_type, "what went wrong", function_status=None), None)
    assert answer.status_code == status_code
    assert answer.content_type == "application/json"
    assert orjson.loads(answer.body) == {"detail": "what went wrong", "error_type": error_type.value}
    assert answer.headers["X-Error-Type"] == answer.headers["X-Fal-Error-Type"] == error_type.value


@pytest.mark.parametrize(("error_type", "status_code"), ERROR_STATUS)
def test_error_outcome_ignores_any_stored_response(error_type: ErrorType, status_code: int) -> None:
    result = StoredResult(status_code=200, content_type="text/plain", body=b"partial")
    answer = completed_answer(_record(error_type, "gave up"), result)
    assert answer.status_code == status_code
    assert orjson.loads(answer.body)["error_type"] == error_type.value


def test_error_outcome_without_a_message_uses_its_error_type_as_detail() -> None:
    answer = completed_answer(_record(ErrorType.FUNCTION_TIMEOUT), None)
    assert orjson.loads(answer.body)["detail"] == "function_timeout"


def test_request_timeout_is_marked_as_the_users_timeout() -> None:
    answer = completed_answer(_record(ErrorType.REQUEST_TIMEOUT, "not started within 5 s", started_at=None), None)
    assert answer.status_code == 504
    assert answer.headers["X-Request-Timeout-Type"] == "user"
    assert answer.headers["X-Fal-Request-Timeout-Type"] == "user", "fal's clients retry a 504 without it"


@pytest.mark.parametrize("error_type", [ErrorType.RUNNER_UNAVAILABLE, ErrorType.FUNCTION_TIMEOUT, ErrorType.CANCELLED])
def test_only_request_timeout_carries_the_timeout_type_header(error_type: ErrorType) -> None:
    headers = completed_answer(_record(error_type, "x"), None).headers
    assert "X-Request-Timeout-Type" not in headers
    assert "X-Fal-Request-Timeout-Type" not in headers


@pytest.mark.parametrize("error_type", [None, *ErrorType])
def test_every_answer_carries_the_request_id(error_type: ErrorType | None) -> None:
    result = StoredResult(status_code=200, content_type="application/json", body=b"{}")
    assert completed_answer(_record(error_type, "x"), result).headers["X-Request-Id"] == REQUEST_ID


@pytest.mark.parametrize("error_type", [None, ErrorType.FUNCTION_ERROR])
def test_response_no_longer_stored_answers_503_json(error_type: ErrorType | None) -> None:
    answer = completed_answer(_record(error_type), None)
    assert answer.status_code == 503
    assert answer.content_type == "application/json"
    assert "detail" in orjson.loads(answer.body)
    assert answer.headers["X-Request-Id"] == REQUEST_ID


# --- OpenFaaS callbacks --------------------------------------------------------------------


def test_openfaas_callback_posts_the_raw_response_with_openfaas_headers() -> None:
    result = StoredResult(status_code=201, content_type="text/plain", body=b"\x00raw\xff")
    callback = build("openfaas", _record(function_status=201, inference_time=1.5), result)
    assert callback.body == b"\x00raw\xff"
    assert callback.headers["X-Call-Id"] == REQUEST_ID
    assert callback.headers["X-Function-Name"] == "echo"
    assert callback.headers["X-Function-Status"] == "201"
    assert callback.headers["X-Duration-Seconds"] == "1.500000"
    assert callback.headers["X-Start-Time"] == str(_nanoseconds(STARTED))
    assert callback.headers["Content-Type"] == "text/plain"
    assert callback.headers["X-Request-Id"] == REQUEST_ID
    assert "X-Error-Type" not in callback.headers


@pytest.mark.parametrize(
    ("inference_time", "text"), [(0.1234567, "0.123457"), (2.0, "2.000000"), (0.0, "0.000000"), (None, "0.000000")]
)
def test_openfaas_duration_has_six_decimals(inference_time: float | None, text: str) -> None:
    result = StoredResult(status_code=200, body=b"")
    callback = build("openfaas", _record(inference_time=inference_time), result)
    assert callback.headers["X-Duration-Seconds"] == text


def test_openfaas_start_time_is_integer_unix_nanoseconds() -> None:
    callback = build("openfaas", _record(), StoredResult(status_code=200))
    start_time = callback.headers["X-Start-Time"]
    assert start_time.isdigit()
    assert int(start_time) == 1_704_164_647_000_000_000


def test_openfaas_start_time_keeps_microsecond_precision() -> None:
    started = STARTED + timedelta(microseconds=7919)
    callback = build("openfaas", _record(started_at=started), StoredResult(status_code=200))
    assert callback.headers["X-Start-Time"] == str(_nanoseconds(started))


def test_openfaas_start_time_of_a_never_started_request_is_its_submission() -> None:
    callback = build("openfaas", _record(ErrorType.CANCELLED, "cancelled", started_at=None), None)
    assert callback.headers["X-Start-Time"] == str(_nanoseconds(SUBMITTED))


def test_openfaas_callback_without_content_type_sends_none() -> None:
    callback = build("openfaas", _record(), StoredResult(status_code=204))
    assert "Content-Type" not in callback.headers
    assert callback.headers["X-Function-Status"] == "204"


def test_openfaas_callback_of_a_function_error_carries_its_status_and_error_type() -> None:
    result = StoredResult(status_code=500, content_type="text/plain", body=b"boom")
    callback = build(
        "openfaas", _record(ErrorType.FUNCTION_ERROR, "function answered 500", function_status=500), result
    )
    assert callback.body == b"boom"
    assert callback.headers["X-Function-Status"] == "500"
    assert callback.headers["X-Error-Type"] == "function_error"


@pytest.mark.parametrize(("error_type", "status_code"), ERROR_STATUS)
def test_openfaas_callback_of_an_error_outcome_posts_the_json_error(error_type: ErrorType, status_code: int) -> None:
    callback = build("openfaas", _record(error_type, "gave up", function_status=None), None)
    assert orjson.loads(callback.body) == {"detail": "gave up", "error_type": error_type.value}
    assert callback.headers["Content-Type"] == "application/json"
    assert callback.headers["X-Function-Status"] == str(status_code)
    assert callback.headers["X-Error-Type"] == error_type.value


# --- fal webhooks --------------------------------------------------------------------------


def test_fal_webhook_of_a_success_carries_the_functions_json_output() -> None:
    result = StoredResult(status_code=200, content_type="application/json", body=b'{"images": [1, 2]}')
    callback = build("fal", _record(), result)
    assert orjson.loads(callback.body) == {
        "request_id": REQUEST_ID,
        "gateway_request_id": REQUEST_ID,
        "status": "OK",
        "payload": {"images": [1, 2]},
    }
    assert callback.headers["Content-Type"] == "application/json"
    assert callback.headers["X-Request-Id"] == REQUEST_ID


def test_fal_webhook_of_output_that_is_not_json_has_null_payload_and_payload_error() -> None:
    result = StoredResult(status_code=200, content_type="text/plain", body=b"plain words")
    body = orjson.loads(build("fal", _record(), result).body)
    assert body["status"] == "OK"
    assert body["payload"] is None
    assert isinstance(body["payload_error"], str)
    assert body["payload_error"]
    assert "error" not in body


def test_fal_webhook_of_an_empty_output_has_null_payload_without_payload_error() -> None:
    body = orjson.loads(build("fal", _record(function_status=204), StoredResult(status_code=204)).body)
    assert body["status"] == "OK"
    assert body["payload"] is None
    assert "payload_error" not in body


def test_fal_webhook_of_a_function_error_carries_its_output_and_error() -> None:
    result = StoredResult(status_code=422, content_type="application/json", body=b'{"detail": "no prompt"}')
    record = _record(ErrorType.FUNCTION_ERROR, "function answered 422", function_status=422)
    assert orjson.loads(build("fal", record, result).body) == {
        "request_id": REQUEST_ID,
        "gateway_request_id": REQUEST_ID,
        "status": "ERROR",
        "payload": {"detail": "no prompt"},
        "error": "function answered 422",
    }


def test_fal_webhook_of_a_function_error_with_text_output_reports_payload_error() -> None:
    result = StoredResult(status_code=500, content_type="text/plain", body=b"Traceback ...")
    body = orjson.loads(build("fal", _record(ErrorType.FUNCTION_ERROR, "function answered 500"), result).body)
    assert body["status"] == "ERROR"
    assert body["payload"] is None
    assert "payload_error" in body
    assert body["error"] == "function answered 500"


@pytest.mark.parametrize("error_type", ERROR_OUTCOMES)
def test_fal_webhook_of_an_error_outcome_has_status_error_and_error(error_type: ErrorType) -> None:
    body = orjson.loads(build("fal", _record(error_type, "gave up after 10 attempts"), None).body)
    assert body["status"] == "ERROR"
    assert body["error"] == "gave up after 10 attempts"
    assert body["request_id"] == REQUEST_ID


def test_fal_webhook_error_without_a_message_uses_the_error_type() -> None:
    body = orjson.loads(build("fal", _record(ErrorType.CANCELLED), None).body)
    assert body["error"] == "cancelled"


@pytest.mark.parametrize("error_type", ERROR_OUTCOMES)
def test_fal_webhook_payload_is_null_when_the_function_gave_no_output(error_type: ErrorType) -> None:
    body = orjson.loads(build("fal", _record(error_type, "gave up", function_status=None), None).body)
    assert body["payload"] is None
