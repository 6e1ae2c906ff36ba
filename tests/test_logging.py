"""Structured logs: with `--log-format json` (or JETSPOOL_LOG_FORMAT=json) every line is a JSON
object, and lines about a request carry its request id and trace id."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

import orjson

from tests.support.processes import ACCEPT_SINGLE_REPLICA, JetspoolProcess

if TYPE_CHECKING:
    from tests.support.stack import Stack


async def test_a_json_log_line_names_its_request_and_trace(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    worker = JetspoolProcess(
        ["worker", "--nats-url", stack.nats.url],
        env={"JETSPOOL_LOG_FORMAT": "json", "JETSPOOL_WORKER__POLL_INTERVAL": "0.2", ACCEPT_SINGLE_REPLICA: "true"},
    )
    try:
        request_id = await stack.submit("echo", content=b"x", headers={"X-Callback-Url": stack.callback_url("/hook")})
        delivered = await asyncio.to_thread(worker.wait_for_text, f"callback for {request_id} delivered", 30)
    finally:
        worker.kill_tree()

    line = orjson.loads(delivered)
    assert line["level"] == "INFO"
    assert line["logger"] == "jetspool.callbacks.delivery"
    assert line["request_id"] == request_id
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert line["time"].endswith("Z")
    for text in worker.output.splitlines():
        orjson.loads(text)  # every line is JSON


def test_a_log_format_from_the_environment_is_checked_as_the_flag_is() -> None:
    """`JETSPOOL_LOG_FORMAT=xml` was ignored (text logs) while `--log-format xml` exits 2."""
    bad = JetspoolProcess(["worker", "--nats-url", "nats://127.0.0.1:1"], env={"JETSPOOL_LOG_FORMAT": "xml"})
    flag = JetspoolProcess(["worker", "--log-format", "xml", "--nats-url", "nats://127.0.0.1:1"])
    try:
        codes = bad.wait(30), flag.wait(30)
    finally:
        bad.kill_tree()
        flag.kill_tree()

    assert codes == (2, 2)
    assert "JETSPOOL_LOG_FORMAT: 'xml' is not one of text, json" in bad.output
    assert "--log-format" in flag.output


async def test_a_cancel_and_a_missed_start_deadline_log_lines_naming_their_request(
    stack_without_worker: Stack,
) -> None:
    """Handled in a NATS subscription's task, these two named no request (found by an outside
    audit)."""
    stack = stack_without_worker
    await stack.register("busy", concurrency=1)
    stack.functions.hold("/busy")
    worker = JetspoolProcess(
        ["worker", "--nats-url", stack.nats.url],
        env={"JETSPOOL_LOG_FORMAT": "json", "JETSPOOL_WORKER__POLL_INTERVAL": "0.2", ACCEPT_SINGLE_REPLICA: "true"},
    )
    try:
        running = await stack.submit("busy", content=b"x")
        await stack.functions.wait_for("/busy")
        late = await stack.submit("busy", content=b"y", headers={"X-Request-Timeout": "0.5"})
        expired = await asyncio.to_thread(worker.wait_for_text, f"request {late} passed its start deadline", 30)
        await stack.client.put(f"/queue/busy/requests/{running}/cancel")
        aborting = await asyncio.to_thread(worker.wait_for_text, f"aborting {running}", 30)
    finally:
        worker.kill_tree()
        stack.functions.release("/busy", 2)

    assert orjson.loads(expired)["request_id"] == late
    assert orjson.loads(aborting)["request_id"] == running
