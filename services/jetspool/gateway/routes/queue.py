"""The fal queue dialect: status and result of a request."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.params import FromPath, FromQuery

from jetspool.domain import names
from jetspool.domain.errors import InvalidInput, NotFound
from jetspool.domain.outcomes import completed_answer
from jetspool.domain.status import State, StatusRecord, public_status
from jetspool.gateway.intake import parse_request_id
from jetspool.gateway.state import Gateway, GatewayDep

_FLAGS = {"1": True, "true": True, "0": False, "false": False}


async def _record(gateway: Gateway, name: str, request_id: str) -> StatusRecord:
    """The status record of `request_id` under function `name`; 422 malformed id, 404 unknown."""
    request_id = parse_request_id(request_id)
    current = await gateway.status.get(request_id)
    if current is None or current.record.function != name:
        raise NotFound(f"request {request_id} not found for function {name!r}")
    return current.record


def _flag(name: FromPath[str], value: str | None) -> bool:
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
    body = public_status(record, gateway.base_url, logs=[] if with_logs else None)
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
    answer = completed_answer(record, await gateway.results.get(record.request_id))
    content_type = answer.content_type or "application/octet-stream"
    return Response(
        answer.body,
        status_code=answer.status_code,
        media_type=content_type,
        headers={**answer.headers, "content-type": content_type},  # exactly the function's, no charset added
    )
