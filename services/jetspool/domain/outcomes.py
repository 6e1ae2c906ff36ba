"""What a completed request answers (SPEC §5), shared by the result route and callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

import orjson

from jetspool.domain import names
from jetspool.domain.status import ErrorType, StatusRecord

if TYPE_CHECKING:
    from jetspool.domain.messages import StoredResult

JSON = "application/json"

_STATUS_BY_ERROR: dict[ErrorType, int] = {
    ErrorType.RUNNER_UNAVAILABLE: 503,
    ErrorType.FUNCTION_TIMEOUT: 504,
    ErrorType.REQUEST_TIMEOUT: 504,
    ErrorType.CANCELLED: 400,
}
_CLIENTS_RETRY: Final = frozenset({408, 409, 429})
"""Codes clients retry: SPEC §2's 409, and fal-client's others (it retries 408, 409 and 429)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer: status, body, content type and extra headers."""

    status_code: int
    body: bytes
    content_type: str | None
    headers: dict[str, str] = field(default_factory=dict)
    """jetspool's own."""
    relayed: list[tuple[str, str]] = field(default_factory=list)
    """The function's, as its result kept them (read off the wire: see `functions.kept_headers`)."""


def completed_answer(record: StatusRecord, result: StoredResult | None) -> Answer:
    """The answer for a COMPLETED request: the function's response, or the JSON error of its outcome."""
    headers = {names.H_REQUEST_ID: record.request_id, names.H_FAL_REQUEST_ID: record.request_id}
    error_type = record.error_type
    if error_type is None or error_type is ErrorType.FUNCTION_ERROR:
        if result is None:
            return _json_error(503, "the result of this request is no longer stored", None, headers)
        if error_type is not None:
            headers[names.H_ERROR_TYPE] = headers[names.H_FAL_ERROR_TYPE] = error_type.value
        return Answer(result.status_code, result.body, result.content_type, headers, result.headers)
    if error_type is ErrorType.REQUEST_TIMEOUT:
        # fal's name too: fal's clients retry a 504 without it, taking the user's deadline for an outage.
        headers["X-Request-Timeout-Type"] = headers["X-Fal-Request-Timeout-Type"] = "user"
    return _json_error(_STATUS_BY_ERROR[error_type], record.error or error_type.value, error_type, headers)


def result_answer(record: StatusRecord, result: StoredResult | None) -> Answer:
    """What the result route answers: `completed_answer`, except that a function's own code that
    clients retry (409, 408, 429) goes out as 400, with the function's code in `X-Function-Status`
    (its body and content type kept). Clients retry a 409 (SPEC §2), fal-client a 408 and a 429 too
    (for 55 s, found by a dialect audit), and a completed request's answer never changes: a client
    polling for it would never stop. Callbacks carry the function's code as it was."""
    answer = completed_answer(record, result)
    if answer.status_code not in _CLIENTS_RETRY:
        return answer
    headers = {**answer.headers, names.H_FUNCTION_STATUS: str(answer.status_code)}
    return replace(answer, status_code=400, headers=headers)


def _json_error(status: int, detail: str, error_type: ErrorType | None, headers: dict[str, str]) -> Answer:
    body: dict[str, str] = {"detail": detail}
    if error_type is not None:
        body["error_type"] = error_type.value
        headers[names.H_ERROR_TYPE] = headers[names.H_FAL_ERROR_TYPE] = error_type.value
    return Answer(status, orjson.dumps(body), JSON, headers)
