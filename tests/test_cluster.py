"""jetspool on a 3-node NATS JetStream cluster with `nats.replicas: 3`: two gateways and two
workers as separate processes ride through the loss of a NATS node and of a worker, and every
accepted request completes exactly once."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httpx
import nats
import pytest
import yaml

from jetspool.cluster import LocalCluster
from jetspool.cluster import main as cluster_main
from jetspool.domain import ids, names
from jetspool.domain.errors import ConfigError
from jetspool.jetstream import ridethrough
from jetspool.jetstream.connection import Nats, connect
from jetspool.jetstream.provision import provision
from jetspool.jetstream.ridethrough import ride_through
from jetspool.settings import validate
from tests.support.faults import CountingEcho, check_every_result, report, stats, submit_all
from tests.support.processes import JetspoolProcess, alive, descendants, local_tcp_ports, sigkill, start_part
from tests.support.servers import AsgiServer, eventually_true, free_port, wait_until_ready
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from nats.js.api import StreamInfo

_REQUESTS = 2000
_MAX_ATTEMPTS = 5
_LOST_QUORUM_S = 8.0


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
class Outcome:
    """What a load run left: the accepted requests, their final status objects and the totals."""

    accepted: dict[str, bytes]
    statuses: dict[str, dict[str, Any]]
    totals: dict[str, Any]

    def completed_at(self, request_id: str) -> datetime:
        return datetime.fromisoformat(self.statuses[request_id]["completed_at"])

    def longest_pause_s(self) -> float:
        """The longest time between two consecutive completions (by their `completed_at`)."""
        times = sorted(self.completed_at(request_id) for request_id in self.accepted)
        return max(((b - a).total_seconds() for a, b in itertools.pairwise(times)), default=0.0)


def _config(path: Path, function_url: str) -> Path:
    settings = {
        "nats": {"replicas": 3},
        "worker": {"ack_wait": 2.0, "poll_interval": 0.2, "shutdown_grace": 1.0},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.2},
        "functions": [{"name": "echo", "url": function_url, "concurrency": 16, "max_attempts": _MAX_ATTEMPTS}],
    }
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


async def _leader(cluster: LocalCluster, stream: str = names.QUEUE_STREAM) -> int:
    """The index of the node leading `stream` (by default the queue, whose loss hurts most)."""
    nc = await nats.connect(servers=cluster.urls)
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.cluster is not None
    assert info.cluster.leader is not None
    return [node.server_name for node in cluster.nodes].index(info.cluster.leader)


async def _run_load(parts: Parts, app: CountingEcho, fault: Any) -> Outcome:
    """Submit `_REQUESTS` through both gateways while `fault(accepted)` strikes; wait for every one
    to complete, and check each completed once, with its own result."""
    refused: list[str] = []
    async with (
        httpx.AsyncClient(base_url=parts.urls[0], timeout=60) as first,
        httpx.AsyncClient(base_url=parts.urls[1], timeout=60) as second,
    ):
        accepted = await submit_all([first, second], _REQUESTS, on_accepted=fault, refused=refused)
        try:
            await check_every_result(first, accepted, timeout_s=180)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await _diagnose(parts.nats_url, first, accepted)}") from None
        gate = asyncio.Semaphore(32)

        async def status(request_id: str) -> tuple[str, dict[str, Any]]:
            async with gate:
                return request_id, (await second.get(f"/queue/echo/requests/{request_id}/status")).json()

        statuses = dict(await asyncio.gather(*(status(request_id) for request_id in accepted)))
        totals = await stats(second)
    assert len(accepted) == _REQUESTS, f"both gateways accepted every submit; refused: {refused}"
    assert all(s["status"] == "COMPLETED" and "error_type" not in s for s in statuses.values())
    assert all(app.calls[request_id] >= 1 for request_id in accepted)
    assert max(app.calls[request_id] for request_id in accepted) <= _MAX_ATTEMPTS
    assert (totals["completed"], totals["failed"]) == (_REQUESTS, 0), "each counted once"
    return Outcome(accepted, statuses, totals)


async def _diagnose(nats_url: str, client: httpx.AsyncClient, accepted: dict[str, bytes]) -> str:
    """Where the requests that did not complete are, as JetStream itself has them: the status
    record from the leader and from any replica, the queue message, and the queue's consumers."""
    unfinished = []
    for request_id in accepted:
        shown = (await client.get(f"/queue/echo/requests/{request_id}/status")).json()
        if shown.get("status") != "COMPLETED":
            unfinished.append((request_id, shown))
    nc = await nats.connect(servers=nats_url.split(","))
    js = nc.jetstream()
    lines = [f"{len(unfinished)} not completed as the gateway shows them"]
    try:
        for request_id, shown in unfinished[:5]:
            subject = f"$KV.{names.STATUS_BUCKET}.{request_id}"
            lines.append(f"{request_id}: gateway shows {shown}")
            queue_seq = (ids.parse_derived(request_id) or (0, ""))[0]  # a derived id names its message
            for direct in (False, True, True, True):
                try:
                    msg = await js.get_msg(f"KV_{names.STATUS_BUCKET}", subject=subject, direct=direct)
                    lines.append(f"  status {'direct' if direct else 'leader'} get: seq {msg.seq} {msg.data!r}")
                    queue_seq = queue_seq or int(json.loads(msg.data or b"{}").get("queue_seq") or 0)
                except Exception as exc:  # noqa: BLE001 - a diagnosis reports whatever it meets
                    lines.append(f"  status {'direct' if direct else 'leader'} get: {exc!r}")
            try:
                msg = await js.get_msg(names.QUEUE_STREAM, seq=int(queue_seq))
                lines.append(f"  queue message {queue_seq}: still stored, subject {msg.subject}")
            except Exception as exc:  # noqa: BLE001
                lines.append(f"  queue message {queue_seq}: {exc!r}")
        info = await js.stream_info(names.QUEUE_STREAM)
        lines.append(f"queue stream: {info.state} leader {info.cluster.leader if info.cluster else None}")
        for consumer in await js.consumers_info(names.QUEUE_STREAM):
            lines.append(
                f"consumer {consumer.name}: pending {consumer.num_pending} ack pending {consumer.num_ack_pending} "
                f"redelivered {consumer.num_redelivered} delivered {consumer.delivered} ack floor {consumer.ack_floor} "
                f"leader {consumer.cluster.leader if consumer.cluster else None}"
            )
    finally:
        await nc.close()
    return "\n".join(lines)


async def test_replicas_3_puts_every_stream_bucket_and_object_store_on_three_nodes(cluster: LocalCluster) -> None:
    conn = await connect(validate({"nats": {"url": cluster.url, "replicas": 3}}).nats, "test")
    try:
        await provision(conn, replicas=3)
        replicas = {info.config.name: info.config.num_replicas async for info in _streams(conn)}
        leaders = {info.config.name: info.cluster.leader async for info in _streams(conn) if info.cluster}
        allow_direct = {info.config.name: info.config.allow_direct async for info in _streams(conn)}
    finally:
        await conn.close()

    assert {f"KV_{names.STATUS_BUCKET}", names.QUEUE_STREAM, f"OBJ_{names.BLOB_STORE}"} <= set(replicas)
    assert set(replicas.values()) == {3}, replicas
    assert all(leaders.values()), "each stream has a leader"
    assert not any(direct for name, direct in allow_direct.items() if (name or "").startswith("KV_")), allow_direct


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--client-ports", "5001,5002"], "expected 3 different ports from 1 to 65535; got '5001,5002'"),
        (["--route-ports", "5001,5001,5002"], "expected 3 different ports"),
        (["--client-ports", "5001,x,5003"], "expected 3 port numbers separated by commas"),
        (["--client-ports", "0,5002,5003"], "from 1 to 65535"),
        (["--client-ports", "5001,5002,5003", "--route-ports", "5003,5004,5005"], "must not share a port"),
    ],
)
def test_the_cluster_command_refuses_ports_it_cannot_use(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        cluster_main(["--data-dir", str(tmp_path / "cluster"), *args])

    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cluster").exists(), "nothing started"


@pytest.mark.timeout(120)
async def test_the_cluster_command_runs_three_nodes_on_the_ports_it_is_given(tmp_path: Path) -> None:
    """`python -m jetspool.cluster --client-ports ... --route-ports ...` (`just cluster`): three routed
    nodes that place a stream of three replicas, and SIGTERM stops them all."""
    ports = _free_ports(6)
    args = ["--data-dir", str(tmp_path / "cluster"), "--client-ports", ",".join(map(str, ports[:3]))]
    process = JetspoolProcess([*args, "--route-ports", ",".join(map(str, ports[3:]))], module="jetspool.cluster")
    try:
        ready = await asyncio.to_thread(process.wait_for_line, "NATS cluster ready:")
        servers = [f"nats://127.0.0.1:{port}" for port in ports[:3]]
        assert ready == f"NATS cluster ready: {','.join(servers)}"
        nodes = descendants(process.process.pid)
        nc = await nats.connect(servers=servers[2:])
        try:
            created = await nc.jetstream().add_stream(name="THREE", subjects=["three"], num_replicas=3)
        finally:
            await nc.close()
        code = await asyncio.to_thread(process.terminate)
    finally:
        process.kill_tree()

    assert created.cluster is not None
    assert len(created.cluster.replicas or []) == 2, "a leader and two replicas"
    assert code == 0
    assert len(nodes) == 3
    assert not [pid for pid in nodes if alive(pid)]


async def test_a_read_after_a_write_sees_it_while_a_node_restarts(cluster: LocalCluster) -> None:
    """Status reads on a cluster come from the stream leader: a write acknowledged is what the
    next read returns, also while a replica is down or catching up (a replica answering a direct
    get may not have applied it yet)."""
    conn = await connect(validate({"nats": {"url": cluster.url, "replicas": 3}}).nats, "test")
    try:
        stores = await provision(conn, replicas=3)
        info = await conn.js.stream_info(f"KV_{names.STATUS_BUCKET}")
        assert info.cluster is not None
        follower = next(i for i, node in enumerate(cluster.nodes) if node.server_name != info.cluster.leader)
        stale = []
        for n in range(600):
            key = f"k{n % 20}"
            revision = await ride_through(partial(stores.status.put, key, str(n).encode()), "put")
            entry = await ride_through(partial(stores.status.get, key), "get")
            if entry.revision != revision:
                stale.append((n, revision, entry.revision))
            if n == 150:
                cluster.nodes[follower].kill()
            elif n == 300:
                await asyncio.to_thread(cluster.nodes[follower].start)
    finally:
        await conn.close()

    assert not stale, f"{len(stale)} of 600 reads missed the write before them, e.g. {stale[:3]}"


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
        status = await conn.js.stream_info(f"KV_{names.STATUS_BUCKET}")
    finally:
        await conn.close()

    assert set(replicas.values()) == {3}, replicas
    assert not status.config.allow_direct, "reads of the status bucket now go to its leader"


async def _streams(conn: Nats) -> AsyncIterator[StreamInfo]:
    for info in await conn.js.streams_info():
        yield info


def test_replicas_the_cluster_cannot_place_stop_startup_naming_the_setting(cluster: LocalCluster) -> None:
    worker = JetspoolProcess(["worker", "--nats-url", cluster.url], env={"JETSPOOL_NATS__REPLICAS": "5"})
    code = worker.wait(60)

    assert code == 2
    assert "nats.replicas: 5 needs a JetStream cluster with at least 5 servers up" in worker.output
    assert "Traceback" not in worker.output


@pytest.mark.timeout(120)
def test_a_cluster_short_of_its_quorum_at_start_stops_startup_naming_the_setting(cluster: LocalCluster) -> None:
    """Two of three nodes down at the first start: JetStream stays unavailable, and once the
    ride-through was spent start-up ended in a traceback, exit code 1 (found by a cluster audit)."""
    for node in cluster.nodes[1:]:
        node.kill()
    worker = JetspoolProcess(["worker", "--nats-url", cluster.urls[0]], env={"JETSPOOL_NATS__REPLICAS": "3"})
    code = worker.wait(90)

    assert code == 2, worker.output
    assert "nats.replicas: 3 needs a JetStream cluster with at least 3 servers up" in worker.output
    assert "Traceback" not in worker.output


@pytest.mark.timeout(300)
async def test_2000_requests_ride_through_a_nats_node_sigkilled_and_restarted(
    cluster: LocalCluster, echo: tuple[CountingEcho, AsgiServer], parts: Parts, capsys: pytest.CaptureFixture[str]
) -> None:
    app, _ = echo
    victim = await _leader(cluster)
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

    outcome = await _run_load(parts, app, strike)

    calls = sum(app.calls[request_id] for request_id in outcome.accepted)
    report(
        capsys,
        f"\n{_REQUESTS} requests, NATS node {victim + 1} (queue leader) SIGKILLed and restarted "
        f"{restarted_at - killed_at:.1f} s later: {len(outcome.accepted)} accepted, {calls} invocations, "
        f"longest pause in completions {outcome.longest_pause_s():.2f} s",
    )
    assert killed_at
    assert restarted_at


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("stream", "headers"),
    [(names.QUEUE_STREAM, {}), (f"KV_{names.IDEMPOTENCY_BUCKET}", {"Idempotency-Key": "through-the-outage"})],
    ids=["queue write", "key claim"],
)
async def test_a_submit_waits_out_a_lost_quorum_and_is_answered_with_its_id(
    cluster: LocalCluster, echo: tuple[CountingEcho, AsgiServer], parts: Parts, stream: str, headers: dict[str, str]
) -> None:
    """Found by chaos runs: with the two nodes that do not lead a stream SIGKILLed, the leader
    holds a write until its quorum is back, and answers a repeat of it with an error. The queue
    write's repeat was told "duplicate message id is in process" (10158), taken for a refusal:
    503 after 5 s, and the request ran once the nodes were back (a client told 503 submits again,
    and it runs twice). The key claim's repeat was refused as the key taken, which nats-py turned
    into "key not found": 503. The repeats now go on until the write is settled."""
    app, _ = echo
    leader = await _leader(cluster, stream)
    followers = [node for index, node in enumerate(cluster.nodes) if index != leader]
    for node in followers:
        node.kill()
    async with httpx.AsyncClient(base_url=parts.urls[0], timeout=60) as client:
        submit = asyncio.create_task(client.post("/async-function/echo", content=b"through", headers=headers))
        # Past the first write's 5 s time-out and a repeat: the old code had answered by then.
        await asyncio.wait({submit}, timeout=_LOST_QUORUM_S)
        answered_in_outage = submit.done()
        for node in followers:
            await asyncio.to_thread(node.start)
        answer = await submit
        request_id = answer.headers.get("x-call-id", "")

        async def completed() -> bool:
            status = await client.get(f"/queue/echo/requests/{request_id}/status")
            return bool(status.json()["status"] == "COMPLETED")

        if answer.status_code == HTTPStatus.ACCEPTED:
            await eventually_true(completed, timeout_s=60)

    assert not answered_in_outage, answer.text
    assert answer.status_code == HTTPStatus.ACCEPTED, answer.text
    assert dict(app.calls) == {request_id: 1}


@pytest.mark.timeout(120)
async def test_the_retry_route_rides_through_an_election_of_the_envelopes_leader(cluster: LocalCluster) -> None:
    """Its read of the kept request was not ridden through: with the node leading the envelopes
    bucket killed, the retry route answered 503 after 5 s (found by a cluster audit)."""
    stack = await start_stack(cluster, worker=False, overrides={"nats": {"replicas": 3}})
    try:
        await stack.register("echo")
        request_id = await stack.submit("echo", content=b"again")
        assert (await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")).status_code == HTTPStatus.ACCEPTED
        leader = cluster.nodes[await _leader(cluster, f"KV_{names.ENVELOPE_BUCKET}")]
        leader.kill()
        retried = await stack.client.post(f"/queue/echo/requests/{request_id}/retry")
        await asyncio.to_thread(leader.start)
        await stack.start_worker()
        final = await stack.wait_for_status("echo", request_id, timeout_s=60)
    finally:
        await stack.close()

    assert retried.status_code == HTTPStatus.ACCEPTED, retried.text
    assert (final["attempts"], "error_type" in final) == (1, False)


@pytest.mark.timeout(120)
async def test_a_key_claim_held_past_the_ride_through_is_refused_and_its_repeat_runs_once(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim waits for its held create no longer than the ride-through (lowered here to 6 s, past
    the first create's 5 s time-out): then 503, with nothing queued. The create lands once the
    quorum is back; the client's repeat with the key finds it and queues under its id: one run."""
    monkeypatch.setattr(ridethrough, "RIDE_THROUGH_S", 6.0)
    stack = await start_stack(cluster, overrides={"nats": {"replicas": 3}})
    try:
        await stack.register("echo")
        leader = await _leader(cluster, f"KV_{names.IDEMPOTENCY_BUCKET}")
        followers = [node for index, node in enumerate(cluster.nodes) if index != leader]
        for node in followers:
            node.kill()
        refused = await stack.client.post("/queue/echo", json={"n": 1}, headers={"Idempotency-Key": "held"})
        for node in followers:
            await asyncio.to_thread(node.start)
        repeats: list[httpx.Response] = []

        async def accepted() -> bool:  # as a client repeats a 503 with its key, until the cluster answers
            repeats.append(await stack.client.post("/queue/echo", json={"n": 1}, headers={"Idempotency-Key": "held"}))
            return repeats[-1].status_code == HTTPStatus.OK

        await eventually_true(accepted, timeout_s=60, interval_s=0.5)
        request_id = repeats[-1].json()["request_id"]
        await stack.wait_for_status("echo", request_id, timeout_s=60)
    finally:
        await stack.close()

    assert refused.status_code == HTTPStatus.SERVICE_UNAVAILABLE, refused.text
    detail = refused.json()["detail"]  # a time-out, or no answer from a stream without a leader by then
    assert detail.startswith("the queue is unavailable: nats:"), detail
    assert "key not found" not in detail
    assert [seen.body for seen in stack.functions.on("/echo")] == [b'{"n":1}'], "one request, run once"


@pytest.mark.timeout(300)
async def test_2000_requests_complete_when_one_of_two_workers_is_sigkilled(
    cluster: LocalCluster, echo: tuple[CountingEcho, AsgiServer], parts: Parts, capsys: pytest.CaptureFixture[str]
) -> None:
    app, _ = echo
    app.delay_s = 0.1  # each worker has calls running at any moment of the load
    running_at_kill: set[str] = set()
    killed_at: list[datetime] = []
    victim = parts.processes["worker-1"]

    async def strike(accepted: int) -> None:
        """Past 600 acceptances, kill worker-1 at the first moment it has calls running."""
        if accepted < 600 or running_at_kill:
            return
        ports = local_tcp_ports(victim.process.pid)
        running_at_kill.update(request_id for request_id, port in app.running.items() if port in ports)
        if running_at_kill:
            killed_at.append(datetime.now(UTC))
            sigkill(victim)

    outcome = await _run_load(parts, app, strike)

    repeated = {request_id for request_id in outcome.accepted if app.calls[request_id] > 1}
    completed_before = {r for r in outcome.accepted if outcome.completed_at(r) < killed_at[0]}
    report(
        capsys,
        f"\n{_REQUESTS} requests on the cluster, one of two workers SIGKILLed with {len(running_at_kill)} calls "
        f"running: all completed, called again by the other worker ({len(repeated)} requests called twice in all); "
        f"longest pause in completions {outcome.longest_pause_s():.2f} s",
    )
    assert victim.process.returncode == -9, "worker-1 was killed while it ran calls"
    assert running_at_kill <= repeated, "what the killed worker ran was run again, by the other"
    assert completed_before, "some had completed before the kill"
    assert not repeated & completed_before, "no request that had completed ran again"
