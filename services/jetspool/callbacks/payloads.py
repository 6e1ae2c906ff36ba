"""What a callback carries, per kind (SPEC §6): OpenFaaS raw response + headers (jetspool's and the
function's own), or fal webhook JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import orjson

from jetspool.domain import names
from jetspool.domain.functions import as_utf8
from jetspool.domain.outcomes import JSON, completed_answer

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

if TYPE_CHECKING:
    from jetspool.domain.messages import CallbackKind, StoredResult
    from jetspool.domain.status import StatusRecord


@dataclass(frozen=True, slots=True)
class CallbackRequest:
    body: bytes
    headers: dict[str, str]
    relayed: list[tuple[str, str]] = field(default_factory=list)
    """The function's own headers, as its result kept them (read off the wire)."""


def build(kind: CallbackKind, record: StatusRecord, result: StoredResult | None) -> CallbackRequest:
    if kind == "fal":
        return _fal(record, result)
    return _openfaas(record, result)


def _openfaas(record: StatusRecord, result: StoredResult | None) -> CallbackRequest:
    answer = completed_answer(record, result)
    started = record.started_at or record.submitted_at
    headers = {
        **answer.headers,
        names.H_CALL_ID: record.request_id,
        names.H_FUNCTION_NAME: record.function,
        names.H_FUNCTION_STATUS: str(answer.status_code),
        names.H_DURATION_SECONDS: f"{record.inference_time or 0.0:.6f}",
        names.H_START_TIME: str(_unix_ns(started)),
    }
    if answer.content_type:
        headers["Content-Type"] = as_utf8(answer.content_type)  # read off the wire; aiohttp sends UTF-8
    # With the function's own headers, as OpenFaaS's queue-worker sends them (a 3xx its Location).
    return CallbackRequest(answer.body, headers, answer.relayed)


def _fal(record: StatusRecord, result: StoredResult | None) -> CallbackRequest:
    ok = record.error_type is None
    body: dict[str, object] = {"request_id": record.request_id, "gateway_request_id": record.request_id}
    body["status"] = "OK" if ok else "ERROR"
    output = result.body if result is not None else b""
    try:
        body["payload"] = orjson.loads(output) if output else None
    except orjson.JSONDecodeError:
        body["payload"] = None
        body["payload_error"] = "the function's output is not JSON"
    if not ok:
        body["error"] = record.error or (record.error_type.value if record.error_type else "error")
    return CallbackRequest(orjson.dumps(body), {"Content-Type": JSON, names.H_REQUEST_ID: record.request_id})


def _unix_ns(at: datetime) -> int:
    """Exact Unix time in nanoseconds (a float timestamp would lose the last digits)."""
    return (at - _EPOCH) // timedelta(microseconds=1) * 1000
