"""The fal queue dialect: submit, status, result and cancel of a request (SPEC §2, §3, §5)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post, put
from litestar.params import FromPath, FromQuery

from jetspool.domain import names
from jetspool.domain.errors import InvalidInput, NotFound
from jetspool.domain.outcomes import completed_answer
from jetspool.domain.status import State, StatusRecord, public_status, request_urls
from jetspool.gateway.intake import function_for, parse_request_id, read_submission
from jetspool.gateway.state import Gateway, GatewayDep
from jetspool.jetstream.cancel import CancelOutcome
from jetspool.jetstream.status_store import Versioned

_FLAGS = {"1": True, "true": True, "0": False, "false": False}


@post("/queue/{name:str}", status_code=200)
async def submit(request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str]) -> Response[Any]:
    """Queue a request; 200 with its id, absolute URLs and queue position."""
    return await _submit(request, gateway, name, "")


@post("/queue/{name:str}/{path:path}", status_code=200)
async def submit_path(
    request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str], path: FromPath[str]
) -> Response[Any]:
    """Queue a request for the function's sub-path `path`."""
    return await _submit(request, gateway, name, path)


async def _submit(request: Request[Any, Any, Any], gateway: Gateway, name: str, path: str) -> Response[Any]:
    function = function_for(gateway.view, name)
    record = await gateway.intake.submit(await read_submission(request, function, path))
    body = {
        "request_id": record.request_id,
        **request_urls(gateway.base_url, record.function, record.request_id),
        "queue_position": await gateway.positions.position(record),
    }
    return Response(body, headers={names.H_REQUEST_ID: record.request_id})


async def _current(gateway: Gateway, name: str, request_id: str) -> Versioned | None:
    """The status of `request_id` under function `name` (None when unknown); 422 for a malformed id."""
    request_id = parse_request_id(request_id)
    current = await gateway.status.get(request_id)
    if current is None or current.record.function != name:
        return None
    return current


async def _record(gateway: Gateway, name: str, request_id: str) -> StatusRecord:
    current = await _current(gateway, name, request_id)
    if current is None:
        raise NotFound(f"request {request_id} not found for function {name!r}")
    return current.record


def _flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    try:
        return _FLAGS[value.strip().lower()]
    except KeyError as exc:
        raise InvalidInput(f"{name} must be one of 1, 0, true, false; got {value!r}") from exc


@get("/queue/{name:str}/requests/{request_id:str}/status")
async def request_status(
    gateway: GatewayDep, name: FromPath[str], request_id: FromPath[str], logs: FromQuery[str | None] = None
) -> Response[dict[str, Any]]:
    """The status object (SPEC §3): 202 while waiting or running, 200 once completed."""
    with_logs = _flag("logs", logs)
    record = await _record(gateway, name, request_id)
    position = await gateway.positions.position(record) if record.status is State.IN_QUEUE else None
    body = public_status(record, gateway.base_url, logs=[] if with_logs else None, queue_position=position)
    return Response(
        body,
        status_code=200 if record.status is State.COMPLETED else 202,
        headers={names.H_REQUEST_ID: record.request_id},
    )


@get("/queue/{name:str}/requests/{request_id:str}")
async def request_result(gateway: GatewayDep, name: FromPath[str], request_id: FromPath[str]) -> Response[Any]:
    """The function's response once completed; 400 with the status while it is not."""
    record = await _record(gateway, name, request_id)
    if record.status is not State.COMPLETED:
        return Response(
            {"detail": f"request is {record.status.value}, not completed yet", "status": record.status.value},
            status_code=400,
            headers={names.H_REQUEST_ID: record.request_id},
        )
    answer = completed_answer(record, await gateway.results.get(record.request_id, record.attempts))
    content_type = answer.content_type or "application/octet-stream"
    return Response(
        answer.body,
        status_code=answer.status_code,
        media_type=content_type,
        headers={**answer.headers, "content-type": content_type},  # exactly the function's, no charset added
    )


_CANCEL_ANSWERS = {
    CancelOutcome.CANCELLED: (202, "CANCELLATION_REQUESTED", "the request was removed from the queue"),
    CancelOutcome.SIGNALLED: (202, "CANCELLATION_REQUESTED", "the worker running the request was told to stop"),
    CancelOutcome.ALREADY_COMPLETED: (400, "ALREADY_COMPLETED", "the request had already completed"),
    CancelOutcome.NOT_FOUND: (404, "NOT_FOUND", "no such request"),
}


@put("/queue/{name:str}/requests/{request_id:str}/cancel", status_code=202)
async def cancel_request(
    gateway: GatewayDep, name: FromPath[str], request_id: FromPath[str]
) -> Response[dict[str, str]]:
    """202 CANCELLATION_REQUESTED · 400 ALREADY_COMPLETED · 404 NOT_FOUND (SPEC §2)."""
    current = await _current(gateway, name, request_id)
    if current is None:
        outcome = CancelOutcome.NOT_FOUND
    else:
        outcome = await gateway.canceller.cancel(current, gateway.view.get(current.record.function))
    status_code, status, detail = _CANCEL_ANSWERS[outcome]
    headers = {names.H_REQUEST_ID: parse_request_id(request_id)}
    return Response({"status": status, "detail": detail}, status_code=status_code, headers=headers)
