"""jetspool on a 3-node NATS JetStream cluster with `nats.replicas: 3`: two gateways and two
workers as separate processes ride through the loss of a NATS node and of a worker, and every
accepted request completes exactly once."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import nats
import pytest
import yaml

from jetspool.cluster import LocalCluster
from jetspool.domain import names
from jetspool.domain.errors import ConfigError
from jetspool.domain.status import State, decode_status
from jetspool.jetstream.connection import Nats, connect
from jetspool.jetstream.provision import provision
from jetspool.settings import validate
from tests.support.faults import CountingEcho, check_every_result, report, stats, submit_all
from tests.support.processes import JetspoolProcess, local_tcp_ports, sigkill, start_part
from tests.support.servers import AsgiServer, eventually, free_port, wait_until_ready

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from nats.aio.msg import Msg
    from nats.js.api import StreamInfo

_REQUESTS = 2000
_MAX_ATTEMPTS = 5


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    ports = _free_ports(6)
    running = LocalCluster(tmp_path / "cluster", client_ports=ports[:3], route_ports=ports[3:])
    try:
        running.start()
        yield running
    finally:
        running.stop()


@dataclass
class Parts:
    """Two gateways and two workers as `jetspool` processes on the cluster's server list."""

    config: Path
    nats_url: str
    gateway_ports: list[int] = field(default_factory=lambda: _free_ports(2))
    processes: dict[str, JetspoolProcess] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.gateway_ports]

    async def start(self) -> None:
        for index, port in enumerate(self.gateway_ports):
            self.processes[f"gateway-{index + 1}"] = start_part("gateway", self.config, self.nats_url, port)
        for index in range(2):
            self.processes[f"worker-{index + 1}"] = start_part("worker", self.config, self.nats_url)
        for url in self.urls:
            await wait_until_ready(url, timeout_s=60)
        for index in range(2):
            await asyncio.to_thread(self.processes[f"worker-{index + 1}"].wait_for_text, "worker ready", 60)

    def stop(self) -> None:
        """Kill what still runs; each part's output stays beside the config, for a failure's diagnosis."""
        for name, process in self.processes.items():
            process.kill_tree()
            (self.config.parent / f"{name}.log").write_text(process.output, encoding="utf-8")


@pytest.fixture
async def parts(cluster: LocalCluster, echo: tuple[CountingEcho, AsgiServer], tmp_path: Path) -> AsyncIterator[Parts]:
    """Two gateways and two workers on `cluster`, calling the `echo` function; stopped after the test."""
    _, server = echo
    running = Parts(_config(tmp_path / "jetspool.yaml", f"{server.url}/echo"), cluster.url)
    try:
        await running.start()
        yield running
    finally:
        running.stop()


@dataclass
class Completions:
    """When each request was first seen COMPLETED, from the status bucket's change subjects."""

    at: dict[str, float] = field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    async def on_change(self, msg: Msg) -> None:
        record = decode_status(msg.data)
        if record.status is State.COMPLETED:
            self.at.setdefault(record.request_id, time.monotonic())
            seen = self.records.setdefault(record.request_id, [])
            summary = {"attempts": record.attempts, "completed_at": record.completed_at, "error": record.error_type}
            if summary not in seen:
                seen.append(summary)

    def longest_pause_s(self) -> float:
        times = sorted(self.at.values())
        return max((later - earlier for earlier, later in itertools.pairwise(times)), default=0.0)


def _config(path: Path, function_url: str) -> Path:
    settings = {
        "nats": {"replicas": 3},
        "worker": {"ack_wait": 2.0, "poll_interval": 0.2, "shutdown_grace": 1.0},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.2},
        "functions": [{"name": "echo", "url": function_url, "concurrency": 16, "max_attempts": _MAX_ATTEMPTS}],
    }
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


async def _queue_leader(cluster: LocalCluster) -> int:
    """The index of the node leading the queue stream (the one whose loss hurts most)."""
    nc = await nats.connect(servers=cluster.urls)
    try:
        info = await nc.jetstream().stream_info(names.QUEUE_STREAM)
    finally:
        await nc.close()
    assert info.cluster is not None
    assert info.cluster.leader is not None
    return [node.server_name for node in cluster.nodes].index(info.cluster.leader)


async def _run_load(
    cluster: LocalCluster,
    parts: Parts,
    app: CountingEcho,
    fault: Any,
    completions: Completions | None = None,
) -> tuple[dict[str, bytes], Completions, dict[str, Any]]:
    """Submit `_REQUESTS` through both gateways while `fault(accepted)` strikes; wait for the end."""
    completions = completions or Completions()
    watcher = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    await watcher.subscribe(names.STATUS_CHANGE_SUBJECTS, cb=completions.on_change)
    try:
        async with (
            httpx.AsyncClient(base_url=parts.urls[0], timeout=60) as first,
            httpx.AsyncClient(base_url=parts.urls[1], timeout=60) as second,
        ):
            accepted = await submit_all([first, second], _REQUESTS, on_accepted=fault)
            await check_every_result(first, accepted, timeout_s=180)
            await eventually(lambda: set(accepted) <= set(completions.at), timeout_s=30)
            totals = await stats(second)
    finally:
        await watcher.close()
    assert all(app.calls[request_id] >= 1 for request_id in accepted)
    assert max(app.calls[request_id] for request_id in accepted) <= _MAX_ATTEMPTS
    assert all(len(completions.records[request_id]) == 1 for request_id in accepted), "one outcome each"
    return accepted, completions, totals


async def test_replicas_3_puts_every_stream_bucket_and_object_store_on_three_nodes(cluster: LocalCluster) -> None:
    conn = await connect(validate({"nats": {"url": cluster.url, "replicas": 3}}).nats, "test")
    try:
        await provision(conn, replicas=3)
        replicas = {info.config.name: info.config.num_replicas async for info in _streams(conn)}
        leaders = {info.config.name: info.cluster.leader async for info in _streams(conn) if info.cluster}
    finally:
        await conn.close()

    assert {f"KV_{names.STATUS_BUCKET}", names.QUEUE_STREAM, f"OBJ_{names.BLOB_STORE}"} <= set(replicas)
    assert set(replicas.values()) == {3}, replicas
    assert all(leaders.values()), "each stream has a leader"


async def test_streams_of_one_server_are_replicated_or_named_when_jetstream_cannot(cluster: LocalCluster) -> None:
    """From `replicas: 1` to 3: the streams are scaled up in place, except the ones flushed
    asynchronously on one server (history only), which JetStream cannot replicate: start-up
    names the first and how to have it recreated."""
    conn = await connect(validate({"nats": {"url": cluster.url, "replicas": 3}}).nats, "test")
    try:
        await provision(conn, replicas=1)
        refused = r"nats\.replicas: 3: stream JETSPOOL_EVENTS .*\(nats stream rm JETSPOOL_EVENTS\)"
        with pytest.raises(ConfigError, match=refused):
            await provision(conn, replicas=3)
        for stream in (names.EVENT_STREAM, names.LOG_STREAM, names.COUNTER_STREAM):
            await conn.js.delete_stream(stream)
        await provision(conn, replicas=3)
        replicas = {info.config.name: info.config.num_replicas async for info in _streams(conn)}
    finally:
        await conn.close()

    assert set(replicas.values()) == {3}, replicas


async def _streams(conn: Nats) -> AsyncIterator[StreamInfo]:
    for info in await conn.js.streams_info():
        yield info


def test_replicas_the_cluster_cannot_place_stop_startup_naming_the_setting(cluster: LocalCluster) -> None:
    worker = JetspoolProcess(["worker", "--nats-url", cluster.url], env={"JETSPOOL_NATS__REPLICAS": "5"})
    code = worker.wait(60)

    assert code == 2
    assert "nats.replicas: 5 needs a JetStream cluster with at least 5 servers up" in worker.output
    assert "Traceback" not in worker.output


@pytest.mark.timeout(300)
async def test_2000_requests_ride_through_a_nats_node_sigkilled_and_restarted(
    cluster: LocalCluster, echo: tuple[CountingEcho, AsgiServer], parts: Parts, capsys: pytest.CaptureFixture[str]
) -> None:
    app, _ = echo
    victim = await _queue_leader(cluster)
    node = cluster.nodes[victim]
    killed_at = restarted_at = 0.0

    async def strike(accepted: int) -> None:
        nonlocal killed_at, restarted_at
        if accepted == 400 and not killed_at:
            killed_at = time.monotonic()
            node.kill()
        elif accepted == 1400 and not restarted_at:
            restarted_at = time.monotonic()
            await asyncio.to_thread(node.start)

    accepted, completions, totals = await _run_load(cluster, parts, app, strike)

    calls = sum(app.calls[request_id] for request_id in accepted)
    report(
        capsys,
        f"\n{_REQUESTS} requests, NATS node {victim + 1} (queue leader) SIGKILLed and restarted "
        f"{restarted_at - killed_at:.1f} s later: {len(accepted)} accepted, {calls} invocations, "
        f"longest pause in completions {completions.longest_pause_s():.2f} s",
    )
    assert killed_at
    assert restarted_at
    assert len(accepted) == _REQUESTS, "both gateways rode through the node loss: every submit was accepted"
    assert (totals["completed"], totals["failed"]) == (_REQUESTS, 0), "each counted once"


@pytest.mark.timeout(300)
async def test_2000_requests_complete_when_one_of_two_workers_is_sigkilled(
    cluster: LocalCluster, echo: tuple[CountingEcho, AsgiServer], parts: Parts, capsys: pytest.CaptureFixture[str]
) -> None:
    app, _ = echo
    app.delay_s = 0.1  # each worker has calls running at any moment of the load
    completions = Completions()
    completed_at_kill: set[str] = set()
    running_at_kill: set[str] = set()
    victim = parts.processes["worker-1"]

    async def strike(accepted: int) -> None:
        """Past 600 acceptances, kill worker-1 at the first moment it has calls running."""
        if accepted < 600 or running_at_kill:
            return
        ports = local_tcp_ports(victim.process.pid)
        running_at_kill.update(request_id for request_id, port in app.running.items() if port in ports)
        if running_at_kill:
            completed_at_kill.update(completions.at)
            sigkill(victim)

    accepted, completions, totals = await _run_load(cluster, parts, app, strike, completions)

    repeated = {request_id for request_id in accepted if app.calls[request_id] > 1}
    report(
        capsys,
        f"\n{_REQUESTS} requests on the cluster, one of two workers SIGKILLed with {len(running_at_kill)} calls "
        f"running: all completed, called again by the other worker ({len(repeated)} requests called twice in all); "
        f"longest pause in completions {completions.longest_pause_s():.2f} s",
    )
    assert victim.process.returncode == -9, "worker-1 was killed while it ran calls"
    assert running_at_kill <= repeated, "what the killed worker ran was run again, by the other"
    assert not repeated & completed_at_kill, "no request that had completed ran again"
    assert len(accepted) == _REQUESTS
    assert (totals["completed"], totals["failed"]) == (_REQUESTS, 0), "each counted once"
