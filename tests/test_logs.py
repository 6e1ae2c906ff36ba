"""Request logs: the worker's own steps and lines a running function POSTs to its X-Logs-Url (SPEC §3)."""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING, Any

import nats
import pytest

from jetspool.domain import names
from tests.support.servers import Reply, eventually_true

if TYPE_CHECKING:
    from tests.support.stack import Stack


async def _running(stack: Stack) -> tuple[str, str]:
    """A request whose function call is held open; its id and X-Logs-Url."""
    await stack.register("busy")
    stack.functions.hold("/busy")
    request_id = (await stack.client.post("/queue/busy", json={})).json()["request_id"]
    [seen] = await stack.functions.wait_for("/busy")
    logs_url = seen.header("x-logs-url")
    assert logs_url is not None
    assert logs_url.startswith(f"{stack.url}/queue/busy/requests/{request_id}/logs?token=")
    return request_id, logs_url


async def _logs(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    response = await stack.client.get(f"/queue/busy/requests/{request_id}/status", params={"logs": "1"})
    lines: list[dict[str, Any]] = response.json()["logs"]
    return lines


async def test_a_running_function_appends_lines_in_every_accepted_form(stack: Stack) -> None:
    request_id, logs_url = await _running(stack)

    one = await stack.client.post(logs_url, json={"message": "loading model", "level": "DEBUG"})
    many = await stack.client.post(logs_url, json=[{"message": "step 1"}, {"message": "oops", "level": "STDERR"}])
    plain = await stack.client.post(
        logs_url, content=b"line a\nline b\n", headers={"Content-Type": "text/plain; charset=utf-8"}
    )

    assert [r.status_code for r in (one, many, plain)] == [202, 202, 202]
    assert many.json() == {"accepted": 2}
    lines = await _logs(stack, request_id)
    worker = [line for line in lines if line["source"] == "worker"]
    posted = [(line["message"], line["level"]) for line in lines if line["source"] == "function"]
    assert worker[0]["message"] == "attempt 1 of 10 started"
    assert posted == [
        ("loading model", "DEBUG"),
        ("step 1", "INFO"),
        ("oops", "STDERR"),
        ("line a", "INFO"),
        ("line b", "INFO"),
    ]
    assert all(line["timestamp"].endswith("Z") for line in lines)
    stack.functions.release("/busy")


async def test_plain_lines_are_read_in_their_declared_charset(stack: Stack) -> None:
    """A declared charset was ignored: Latin-1 text came out with its accented letters replaced
    (found by an outside audit). A charset Python does not know is refused."""
    request_id, logs_url = await _running(stack)

    latin = await stack.client.post(
        logs_url, content=b"caf\xe9\n", headers={"Content-Type": "text/plain; charset=latin-1"}
    )
    quoted = await stack.client.post(
        logs_url, content="naïve\n".encode("utf-16"), headers={"Content-Type": 'text/plain; charset="utf-16"'}
    )
    refused = [
        await stack.client.post(logs_url, content=b"x\n", headers={"Content-Type": f"text/plain; charset={charset}"})
        for charset in ("klingon", "base64", "rot13", "undefined")  # codecs that are no text encoding gave a 500
    ]

    assert [r.status_code for r in (latin, quoted, *refused)] == [202, 202, 422, 422, 422, 422]
    assert "klingon" in refused[0].json()["detail"]
    posted = [line["message"] for line in await _logs(stack, request_id) if line["source"] == "function"]
    assert posted == ["café", "naïve"]
    stack.functions.release("/busy")


async def test_the_worker_logs_retries_and_the_outcome(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(503)])
    request_id = (await stack.client.post("/queue/echo", json={})).json()["request_id"]
    await stack.wait_for_status("echo", request_id)
    response = await stack.client.get(f"/queue/echo/requests/{request_id}/status", params={"logs": "true"})
    messages = [line["message"] for line in response.json()["logs"]]  # the last line comes before COMPLETED

    assert messages[0] == "attempt 1 of 10 started"
    assert messages[1].startswith("attempt 1: function answered 503; retrying in")
    assert messages[2] == "attempt 2 of 10 started"
    assert messages[-1] == "completed, succeeded"


async def test_a_request_that_ends_while_it_waits_says_why_in_its_logs(stack: Stack) -> None:
    """Cancelled, or past its start deadline, before any attempt: its logs were empty (found by an audit)."""
    await stack.occupy()
    cancelled = (await stack.client.post("/queue/busy", json={})).json()["request_id"]
    late = (await stack.client.post("/queue/busy", json={}, headers={"X-Request-Timeout": "0.5"})).json()["request_id"]
    await stack.client.put(f"/queue/busy/requests/{cancelled}/cancel")

    ended = {request_id: await stack.wait_for_status("busy", request_id) for request_id in (cancelled, late)}

    for request_id in ended:  # the line is written after the status (a start may still win the write)
        await eventually_true(partial(_has_lines, stack, request_id))
    [cancel_line], [late_line] = [await _logs(stack, request_id) for request_id in (cancelled, late)]
    stack.functions.release("/busy")

    assert ended[cancelled]["error_type"] == "cancelled"
    assert ended[late]["error_type"] == "request_timeout"
    assert (cancel_line["message"], cancel_line["level"]) == ("completed, failed: cancelled", "ERROR")
    assert late_line["message"] == f"completed, failed: {ended[late]['error']}"


async def _has_lines(stack: Stack, request_id: str) -> bool:
    return bool(await _logs(stack, request_id))


async def test_logs_are_null_unless_asked_for(stack: Stack) -> None:
    request_id, _ = await _running(stack)

    assert (await stack.status("busy", request_id))["logs"] is None
    stack.functions.release("/busy")


async def test_a_line_jetspool_did_not_write_shows_with_the_time_it_was_stored(stack: Stack) -> None:
    """Text some other client published on a request's log subject is shown as a line of its own,
    timestamped when the stream stored it (it had a null timestamp, which the schema forbids)."""
    request_id, _ = await _running(stack)
    nc = await nats.connect(stack.nats.url)
    try:
        await nc.jetstream().publish(names.log_subject(request_id), b"written by hand")
    finally:
        await nc.close()

    lines = await _logs(stack, request_id)
    stack.functions.release("/busy")

    [foreign] = [line for line in lines if line["message"] == "written by hand"]
    assert (foreign["level"], foreign["source"]) == ("INFO", "unknown")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", foreign["timestamp"])


_UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(("case", "status"), [("no token", 401), ("wrong token", 401), ("unknown request", 404)])
async def test_log_url_needs_its_token_and_a_known_request(stack: Stack, case: str, status: int) -> None:
    request_id, logs_url = await _running(stack)
    url = {
        "no token": logs_url.split("?")[0],
        "wrong token": logs_url + "x",
        "unknown request": logs_url.replace(request_id, _UNKNOWN),
    }[case]

    response = await stack.client.post(url, json={"message": "x"})

    assert response.status_code == status
    assert response.json()["detail"]
    assert not [line for line in await _logs(stack, request_id) if line["source"] == "function"]
    stack.functions.release("/busy")


@pytest.mark.parametrize("body", [{"message": "x", "level": "LOUD"}, {"text": "x"}, [1, 2]])
async def test_invalid_log_lines_are_refused_and_nothing_is_stored(stack: Stack, body: Any) -> None:
    request_id, logs_url = await _running(stack)

    response = await stack.client.post(logs_url, json=body)

    assert response.status_code == 422
    assert response.json()["detail"]
    assert not [line for line in await _logs(stack, request_id) if line["source"] == "function"]
    stack.functions.release("/busy")
