"""A callback survives its gateway and worker (which runs callback delivery) being SIGKILLed
between the request's completion and the callback's delivery."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

from tests.support.processes import sigkill, start_part
from tests.support.servers import AsgiServer, RecordingApp, eventually_true, free_port, wait_until_ready

if TYPE_CHECKING:
    from pathlib import Path

    from jetspool.embedded import EmbeddedNats


@pytest.mark.timeout(150)
async def test_a_pending_callback_arrives_after_gateway_and_worker_were_killed(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    functions = RecordingApp()
    function_server = AsgiServer(functions)
    await function_server.start()
    receiver = RecordingApp(default=None)
    receiver_port = free_port()  # nothing listens here until the end: every attempt is refused
    receiver_server = AsgiServer(receiver, port=receiver_port)
    config = tmp_path / "jetspool.yaml"
    settings: dict[str, Any] = {
        "worker": {"poll_interval": 0.2, "shutdown_grace": 1.0},
        "callbacks": {"initial_backoff": 0.2, "max_backoff": 0.5, "max_attempts": 1000},
        "functions": [{"name": "echo", "url": f"{function_server.url}/echo"}],
    }
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes = [start_part("gateway", config, nats_server.url, port), start_part("worker", config, nats_server.url)]
    try:
        await wait_until_ready(url)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            hook = f"http://127.0.0.1:{receiver_port}/hook"
            submitted = await client.post("/async-function/echo", content=b"outlive", headers={"X-Callback-Url": hook})
            request_id = submitted.headers["x-call-id"]

            async def completed_and_refused() -> bool:
                status = (await client.get(f"/queue/echo/requests/{request_id}/status")).json()
                return bool(status["status"] == "COMPLETED" and status["callbacks"][0]["attempts"] >= 1)

            await eventually_true(completed_and_refused, timeout_s=30)
        for process in processes:
            sigkill(process)
        await receiver_server.start()
        processes = [
            start_part("gateway", config, nats_server.url, port),
            start_part("worker", config, nats_server.url),
        ]
        await wait_until_ready(url)
        # A job in flight at the kill comes back after the callback consumer's ack wait (60 s).
        [seen] = await receiver.wait_for("/hook", timeout_s=90)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:

            async def delivered() -> bool:
                status = (await client.get(f"/queue/echo/requests/{request_id}/status")).json()
                return bool(status["callbacks"][0]["state"] == "delivered")

            await eventually_true(delivered, timeout_s=10)
    finally:
        for process in processes:
            process.kill_tree()
        await receiver_server.stop()
        await function_server.stop()

    assert seen.body == b"outlive"
    assert seen.header("x-call-id") == request_id
    assert [s.body for s in functions.on("/echo")] == [b"outlive"], "the function ran once"
