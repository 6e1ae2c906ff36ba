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
