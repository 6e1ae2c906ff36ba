"""Crash safety on real processes (SPEC §4): workers, gateways and the NATS server are killed
mid-load with SIGKILL (or paused with SIGSTOP), and no accepted request is lost or run beyond
its attempts, and a late worker changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest
import yaml

from jetspool.embedded import EmbeddedNats
from tests.support.faults import CountingEcho, check_every_result, report, stats, submit_all
from tests.support.processes import JetspoolProcess, sigkill, start_part
from tests.support.servers import (
    AsgiServer,
    RecordingApp,
    eventually_true,
    free_port,
    wait_until_ready,
)

if TYPE_CHECKING:
    from pathlib import Path

_MAX_ATTEMPTS = 5


@dataclass
class Parts:
    """A gateway and a worker as separate `jetspool` processes, against one NATS server."""

    config: Path
    nats_url: str
    port: int = field(default_factory=free_port)
    processes: dict[str, JetspoolProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *kinds: str) -> None:
        for kind in kinds:
            self.processes[kind] = start_part(
                kind, self.config, self.nats_url, self.port if kind == "gateway" else None
            )
        if "gateway" in kinds:
            await wait_until_ready(self.url)

    def kill(self, kind: str) -> None:
        sigkill(self.processes.pop(kind))

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill_tree()


def _outcome(status: dict[str, Any]) -> dict[str, Any]:
    """The status object without its callbacks' delivery state, which goes on changing."""
    return {key: value for key, value in status.items() if key != "callbacks"}


def _config(path: Path, function_url: str, **worker: Any) -> Path:
    settings = {
        "worker": {"poll_interval": 0.2, "shutdown_grace": 1.0, **worker},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.2},
        "functions": [
            {"name": "echo", "url": function_url, "concurrency": 16, "max_attempts": _MAX_ATTEMPTS},
        ],
    }
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


async def _accepts(client: httpx.AsyncClient) -> bool:
    """Whether the gateway accepts a request again (after NATS came back)."""
    try:
        response = await client.post("/async-function/echo", content=b"probe")
    except httpx.HTTPError:
        return False
    return response.status_code == 202


@pytest.mark.timeout(240)
async def test_2000_requests_survive_three_worker_kills(
    nats_server: EmbeddedNats, echo: tuple[CountingEcho, AsgiServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app, server = echo
    parts = Parts(_config(tmp_path / "jetspool.yaml", f"{server.url}/echo", ack_wait=2.0), nats_server.url)
    kills = 0
    try:
        await parts.start("gateway", "worker")
        async with httpx.AsyncClient(base_url=parts.url, timeout=30) as client:

            async def kill_three_times() -> None:
                nonlocal kills
                for round_ in range(1, 4):
                    await app.wait_for_calls(400 * round_)
                    parts.kill("worker")
                    kills += 1
                    await parts.start("worker")

            killer = asyncio.create_task(kill_three_times())
            accepted = await submit_all([client], 2000)
            await killer
            await check_every_result(client, accepted, timeout_s=150)
            totals = await stats(client)
    finally:
        parts.stop()

    calls = sum(app.calls[request_id] for request_id in accepted)
    duplicates = calls - len(accepted)
    report(capsys, f"\n2000 requests, worker SIGKILLed {kills} times: {calls} invocations, {duplicates} duplicates")
    assert kills == 3
    assert len(accepted) == 2000, "the gateway stayed up: every submit was accepted"
    assert all(app.calls[request_id] >= 1 for request_id in accepted)
    assert max(app.calls[request_id] for request_id in accepted) <= _MAX_ATTEMPTS
    assert (totals["completed"], totals["failed"]) == (2000, 0), "each counted once, crashes or not"


@pytest.mark.timeout(180)
async def test_every_request_accepted_before_the_gateway_was_killed_completes(
    nats_server: EmbeddedNats, echo: tuple[CountingEcho, AsgiServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, server = echo
    parts = Parts(_config(tmp_path / "jetspool.yaml", f"{server.url}/echo"), nats_server.url)
    try:
        await parts.start("gateway", "worker")
        async with httpx.AsyncClient(base_url=parts.url, timeout=30) as client:

            async def kill_gateway_at(accepted: int) -> None:
                if accepted == 200 and "gateway" in parts.processes:
                    parts.kill("gateway")

            accepted = await submit_all([client], 600, on_accepted=kill_gateway_at)
            await parts.start("gateway")
            await check_every_result(client, accepted, timeout_s=120)
    finally:
        parts.stop()

    report(capsys, f"\ngateway SIGKILLed after 200 acceptances: {len(accepted)} of 600 submits accepted in all")
    assert 200 <= len(accepted) < 600, "the kill cut the load short"


@pytest.mark.timeout(180)
async def test_nothing_acknowledged_is_lost_when_nats_restarts(
    echo: tuple[CountingEcho, AsgiServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, server = echo
    nats = EmbeddedNats(tmp_path / "nats", port=free_port())
    nats.start()
    parts = Parts(_config(tmp_path / "jetspool.yaml", f"{server.url}/echo"), nats.url)
    try:
        await parts.start("gateway", "worker")
        async with httpx.AsyncClient(base_url=parts.url, timeout=30) as client:
            restarted = asyncio.Event()

            async def restart_nats_at(accepted: int) -> None:
                if accepted == 200 and not restarted.is_set():
                    restarted.set()
                    nats.kill()
                    nats.start()

            accepted = await submit_all([client], 600, on_accepted=restart_nats_at)
            await eventually_true(lambda: _accepts(client), timeout_s=60, interval_s=0.5)
            after = await submit_all([client], 100)
            await check_every_result(client, accepted | after, timeout_s=150)
    finally:
        parts.stop()
        nats.stop()

    report(
        capsys,
        f"\nnats-server SIGKILLed and restarted mid-load: {len(accepted)} of 600 accepted, then {len(after)} of 100",
    )
    assert restarted.is_set()
    assert len(after) == 100, "the gateway reconnected by itself"


@pytest.mark.timeout(150)
async def test_a_request_cancelled_while_its_worker_is_dead_tells_the_function(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """SPEC §4: cancelling a running request POSTs the function's cancel_path. When the worker
    that ran it was killed, the redelivery completed it as cancelled and told the function nothing,
    which ran the call on to its end (found by a fault audit)."""
    function = RecordingApp(default=None)
    function.hold("/echo")
    function_server = AsgiServer(function)
    await function_server.start()
    config = _config(tmp_path / "jetspool.yaml", f"{function_server.url}/echo", ack_wait=1.0)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["functions"][0]["cancel_path"] = "/cancel"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    parts = Parts(config, nats_server.url)
    try:
        await parts.start("gateway", "worker")
        async with httpx.AsyncClient(base_url=parts.url, timeout=30) as client:
            request_id = (await client.post("/async-function/echo", content=b"x")).headers["x-call-id"]
            await function.wait_for("/echo")
            parts.kill("worker")
            cancelled = await client.put(f"/queue/echo/requests/{request_id}/cancel")
            await parts.start("worker")  # gets the message back once the ack wait has passed
            [notice] = await function.wait_for("/echo/cancel", timeout_s=30)

            async def completed() -> bool:
                status = (await client.get(f"/queue/echo/requests/{request_id}/status")).json()
                return bool(status["status"] == "COMPLETED")

            await eventually_true(completed)
            final = (await client.get(f"/queue/echo/requests/{request_id}/status")).json()
    finally:
        function.release("/echo")
        parts.stop()
        await function_server.stop()

    assert cancelled.json()["status"] == "CANCELLATION_REQUESTED"
    assert (final["error_type"], final["error"]) == ("cancelled", "cancelled while running")
    assert orjson.loads(notice.body) == {"request_id": request_id}
    assert notice.header("x-call-id") == request_id
    assert len(function.on("/echo")) == 1, "never called again"


@pytest.mark.timeout(150)  # the callback may wait out its consumer's 60 s ack wait (below)
async def test_a_worker_paused_past_its_ack_wait_changes_nothing_when_it_resumes(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    function, receiver = RecordingApp(default=None), RecordingApp(default=None)
    function.hold("/echo")
    function_server, receiver_server = AsgiServer(function), AsgiServer(receiver)
    await function_server.start()
    await receiver_server.start()
    parts = Parts(_config(tmp_path / "jetspool.yaml", f"{function_server.url}/echo", ack_wait=1.5), nats_server.url)
    try:
        await parts.start("gateway", "worker")
        late = parts.processes.pop("worker")
        async with httpx.AsyncClient(base_url=parts.url, timeout=30) as client:
            submitted = await client.post(
                "/async-function/echo", content=b"once", headers={"X-Callback-Url": f"{receiver_server.url}/hook"}
            )
            request_id = submitted.headers["x-call-id"]
            await function.wait_for("/echo")
            os.kill(late.process.pid, signal.SIGSTOP)
            await parts.start("worker")  # takes the request over once the paused worker's ack wait passes
            await function.wait_for("/echo", 2, timeout_s=20)
            # Answer both calls: the paused worker's answer waits in its socket until it resumes.
            function.release("/echo", 2)

            async def completed() -> bool:
                status = (await client.get(f"/queue/echo/requests/{request_id}/status")).json()
                return bool(status["status"] == "COMPLETED")

            await eventually_true(completed)
            before = _outcome((await client.get(f"/queue/echo/requests/{request_id}/status")).json())

            os.kill(late.process.pid, signal.SIGCONT)
            await asyncio.to_thread(late.wait_for_text, f"request {request_id}: outcome of attempt 1 dropped", 30)
            # The callback may have gone to a pull request the paused worker had open; either delivers it.
            await receiver.wait_for("/hook", timeout_s=70)
            after = _outcome((await client.get(f"/queue/echo/requests/{request_id}/status")).json())
            result = await client.get(f"/queue/echo/requests/{request_id}")
    finally:
        late.kill_tree()
        parts.stop()
        await function_server.stop()
        await receiver_server.stop()

    assert [s.header("x-attempt") for s in function.on("/echo")] == ["1", "2"]
    assert (before["status"], before["attempts"]) == ("COMPLETED", 2)
    assert "error_type" not in before
    assert after == before, "the late worker changed nothing"
    assert result.content == b"once"
    assert len(receiver.on("/hook")) == 1, "exactly one outcome was called back"
