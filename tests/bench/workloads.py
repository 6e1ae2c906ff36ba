"""The benchmark workloads of `python -m tests.bench`, each returning one JSON-able record.

Times that cross processes (submitted, invoked, completed) are Unix wall-clock times taken on
this one machine; the status object carries the gateway's and worker's own timestamps.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
import nats
import orjson

from jetspool.domain import ids, names
from jetspool.domain.messages import QueuedRequest, encode
from jetspool.domain.status import utcnow
from tests.bench.load import BODY_1KIB, paced, wrk
from tests.bench.parts import Helper, Stack, cpu_seconds
from tests.support.servers import eventually, eventually_true

if TYPE_CHECKING:
    from pathlib import Path

_CONNECTIONS = 64
_FILL_CHUNK = 2000


def unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of `values` (milliseconds in, milliseconds out, rounded)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"n": len(ordered), "p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": at(1.0)}


class Completions:
    """Follows `jetspool.events.<function>.succeeded` (core NATS), noting when each arrived.

    An event's `at` is stamped after the completion's status write was acknowledged: it is when
    the result was stored, without the event's way to this client."""

    def __init__(self, nats_url: str, function: str) -> None:
        self._url, self._function = nats_url, function
        self.seen: dict[str, tuple[float, dict[str, Any]]] = {}
        self.stored_at: dict[str, float] = {}
        self._nc: Any = None

    async def __aenter__(self) -> Completions:
        self._nc = await nats.connect(self._url)

        async def arrived(msg: Any) -> None:
            now = time.time()
            event = orjson.loads(msg.data)
            self.seen.setdefault(event["request_id"], (now, event["status"]))
            self.stored_at.setdefault(event["request_id"], unix(event["at"]))

        await self._nc.subscribe(names.event_subject(self._function, "succeeded"), cb=arrived)
        await self._nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._nc.close()

    async def wait_for(self, count: int, timeout_s: float) -> None:
        """Until `count` completions were seen (arrival times are taken as they come, not here)."""
        try:
            await eventually(lambda: len(self.seen) >= count, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{len(self.seen)} of {count} completions seen") from None


# --- 1. submit --------------------------------------------------------------------------------


async def raw_publish(nats_url: str, seconds: float, concurrency: int = _CONNECTIONS) -> dict[str, Any]:
    """nats-py JetStream publish-with-ack of 1 KiB, `concurrency` publishers, on a file stream."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH_RAW", subjects=["bench.raw"], storage="file")
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def publisher() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await js.publish("bench.raw", BODY_1KIB)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await js.delete_stream("BENCH_RAW")
    await nc.close()
    return {"requests": len(latencies), "rps": round(len(latencies) / elapsed, 1), **percentiles(latencies)}


async def submit(root: Path, sync_interval: str, seconds: float) -> dict[str, Any]:
    """Workload 1: submit throughput and latency of the gateway, and its two baselines, one after
    the other on the same machine. No worker runs: the submits only queue."""
    plain = await Helper("plain").start()
    try:
        baseline = await wrk(f"{plain.url}/submit", connections=_CONNECTIONS, seconds=seconds)
    finally:
        plain.stop()
    stack = await Stack(root, [{"name": "noop", "url": "http://127.0.0.1:9/"}], sync_interval).start(worker=False)
    try:
        gateway = await _loaded(f"{stack.url}/async-function/noop", stack.pid("gateway"), seconds)
        raw = await raw_publish(stack.nats_url, seconds)
        floor = await _publish_floor(stack.nats_url, seconds)
    finally:
        stack.close()
    return {
        "workload": "submit",
        "sync_interval": sync_interval,
        "connections": _CONNECTIONS,
        "body_bytes": len(BODY_1KIB),
        "gateway": gateway,
        "plain_litestar": baseline.record(),
        "raw_nats_publish": raw,
        "http_publish_floor": floor,
        "ratio_gateway_over_plain": round(gateway["rps"] / baseline.rps, 3),
        "ratio_gateway_over_raw_publish": round(gateway["rps"] / raw["rps"], 3),
        "ratio_floor_over_plain": round(floor["rps"] / baseline.rps, 3),
        "ratio_gateway_over_floor": round(gateway["rps"] / floor["rps"], 3),
    }


async def _publish_floor(nats_url: str, seconds: float) -> dict[str, Any]:
    """The floor of a submit over HTTP (`tests.bench.apps.Publisher`: uvicorn, no framework, one
    publish-with-ack per request) under the same load as the gateway, on the same NATS server."""
    floor = await Helper("publish", "--nats-url", nats_url).start()
    try:
        return await _loaded(f"{floor.url}/submit", floor.process.pid, seconds)
    finally:
        floor.stop()


async def _loaded(url: str, pid: int, seconds: float) -> dict[str, Any]:
    """wrk's figures for `url` after a 2 s warm-up, with the CPU the server `pid` spent per request."""
    await wrk(url, seconds=2)
    cpu_before = cpu_seconds(pid)
    measured = await wrk(url, connections=_CONNECTIONS, seconds=seconds)
    cpu = cpu_seconds(pid) - cpu_before
    return measured.record() | {"cpu_ms_per_request": round(cpu * 1000 / measured.requests, 3)}


# --- 2. end to end ----------------------------------------------------------------------------


def _latencies(
    completions: Completions, invoked: dict[str, float], sent: dict[str, float] | None = None
) -> dict[str, Any]:
    """Queue overhead (invoked - submitted), result stored (- submitted) and total (completion
    seen - submitted), in ms."""
    overhead, stored, total, from_send = [], [], [], []
    for request_id, (seen_at, status) in completions.seen.items():
        if sent is not None and request_id not in sent:
            continue  # a straggler of an earlier run
        submitted = unix(status["submitted_at"])
        if request_id in invoked:
            overhead.append((invoked[request_id] - submitted) * 1000)
        stored.append((completions.stored_at[request_id] - submitted) * 1000)
        total.append((seen_at - submitted) * 1000)
        if sent is not None:
            from_send.append((seen_at - sent[request_id]) * 1000)
    record = {"queue_overhead": percentiles(overhead), "stored": percentiles(stored), "total": percentiles(total)}
    if sent is not None:
        record["client_submit_to_completed"] = percentiles(from_send)
    return record


async def _paced_run(stack: Stack, noop: Helper, rate: float, seconds: float) -> dict[str, Any]:
    count = max(50, round(rate * seconds))
    async with Completions(stack.nats_url, "noop") as completions:
        sent = await paced(f"{stack.url}/async-function/noop", rate, count)
        await completions.wait_for(len(sent), timeout_s=60)
    invoked = await noop.seen()
    return {"rate_per_s": round(rate, 1), "requests": len(sent)} | _latencies(
        completions, invoked, {request_id: at for at, request_id in sent}
    )


async def end_to_end(root: Path, sync_interval: str, seconds: float, paced_s: float) -> dict[str, Any]:
    """Workload 2: requests to a no-op function through the queue, as fast as wrk submits them
    for `seconds`; then open-loop runs at half the measured rate and at 100/s. Baseline: wrk
    calling the function directly."""
    noop = await Helper("noop").start()
    try:
        direct = await wrk(f"{noop.url}/", connections=_CONNECTIONS, seconds=seconds)
        function = {"name": "noop", "url": f"{noop.url}/", "concurrency": 64}
        stack = await Stack(root, [function], sync_interval).start()
        try:
            async with Completions(stack.nats_url, "noop") as warm:  # warm-up
                warm_up = await wrk(f"{stack.url}/async-function/noop", seconds=2)
                await warm.wait_for(warm_up.requests - warm_up.non_2xx, timeout_s=120)
            async with Completions(stack.nats_url, "noop") as completions:
                cpu_before = stack.cpu_seconds()
                submitted = await wrk(f"{stack.url}/async-function/noop", connections=_CONNECTIONS, seconds=seconds)
                accepted = submitted.requests - submitted.non_2xx
                await completions.wait_for(accepted, timeout_s=300)
                cpu = {part: used - cpu_before[part] for part, used in stack.cpu_seconds().items()}
            invoked = await noop.seen()
            first = min(unix(status["submitted_at"]) for _, status in completions.seen.values())
            last = max(seen_at for seen_at, _ in completions.seen.values())
            rate = len(completions.seen) / (last - first)
            burst = _latencies(completions, invoked)
            half = await _paced_run(stack, noop, rate / 2, paced_s)
            light = await _paced_run(stack, noop, 100, paced_s)
        finally:
            stack.close()
    finally:
        noop.stop()
    return {
        "workload": "end_to_end",
        "sync_interval": sync_interval,
        "requests": len(completions.seen),
        "completions_per_s": round(rate, 1),
        "submit_rps_during": round(submitted.rps, 1),
        "cpu_ms_per_completion": {part: round(used * 1000 / len(completions.seen), 3) for part, used in cpu.items()},
        "burst": burst,
        "at_half_max": half,
        "at_100_per_s": light,
        "direct_http": direct.record(),
        "ratio_completions_over_direct": round(rate / direct.rps, 3),
    }


# --- 3. backlog --------------------------------------------------------------------------------


async def _status_latency(client: httpx.AsyncClient, ids: list[str], samples: int) -> dict[str, Any]:
    rng = random.Random(7)  # noqa: S311 - sampling, not cryptography
    chosen = [rng.choice(ids) for _ in range(samples)]
    latencies = []
    for request_id in chosen:
        started = time.perf_counter()
        response = await client.get(f"/queue/waiting/requests/{request_id}/status")
        latencies.append((time.perf_counter() - started) * 1000)
        if response.status_code != 202 or "queue_position" not in response.json():
            raise RuntimeError(f"unexpected status answer {response.status_code}: {response.text}")
    return percentiles(latencies)


async def _submit_some(client: httpx.AsyncClient, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = await client.post("/async-function/waiting", content=b"{}")
        ids.append(response.headers["X-Call-Id"])
    return ids


async def _fill(nats_url: str, function: str, count: int) -> float:
    """Queue `count` requests of `function` as the gateway's intake stores them (one queue message
    each, its id derived from where it lands), pipelined on one connection: through HTTP a million
    would take most of an hour on two cores. Returns the rate."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    subject = names.queue_subject(function, "normal")
    started = time.perf_counter()
    done = 0
    while done < count:
        chunk = [
            QueuedRequest(
                id_nonce=ids.new_nonce(),
                function=function,
                priority="normal",
                method="POST",
                headers=[("content-type", "application/json")],
                body=b"{}",
                submitted_at=utcnow(),
            )
            for _ in range(min(_FILL_CHUNK, count - done))
        ]
        await asyncio.gather(
            *(js.publish(subject, encode(r), headers={names.NATS_MSG_ID: f"n{r.id_nonce}"}) for r in chunk)
        )
        done += len(chunk)
    await nc.close()
    return count / (time.perf_counter() - started)


async def _settled(stack: Stack, timeout_s: float = 120.0) -> None:
    """Let the machine settle after a burst of writes before a measurement: write back the
    kernel's dirty pages (a fill of a million messages leaves about a gigabyte, which the kernel
    would otherwise write in the middle of the next measurement), then wait until nats-server has
    used under 5 % of a core for a second."""
    await asyncio.to_thread(os.sync)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = stack.cpu_seconds()["nats"]
        await asyncio.sleep(1.0)
        if stack.cpu_seconds()["nats"] - before < 0.05:
            return


async def backlog(root: Path, size: int, samples: int) -> dict[str, Any]:
    """Workload 3: `size` waiting requests (the function takes one at a time and never answers):
    RSS of gateway and worker, status latency at 100 waiting and at `size` waiting.

    The figure at 100 is taken twice, bracketing the backlog in time: before the fill, and after
    the backlog is purged back to the last 100. The ratio is the backlog's p50 over the mean of
    the two, so a machine that speeds up or slows down over the run does not pass for growth.
    Every measurement starts on a settled machine (see `_settled`), with the same processes up."""
    hold = await Helper("hold").start()
    function = {"name": "waiting", "url": f"{hold.url}/", "concurrency": 1, "timeout": 3600}
    stack = await Stack(root, [function], "2m").start()
    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            early = await _submit_some(client, 101)
            await _running(client, early[0])  # the worker holds the first one; the other 100 wait
            early = early[1:]
            await _status_latency(client, early, 50)  # warm-up
            await _settled(stack)
            small = await _status_latency(client, early, samples)
            rss_gateway_small = stack.rss_mb("gateway")
            started = time.perf_counter()
            fill_rps = await _fill(stack.nats_url, "waiting", size - 200)
            fill_s = time.perf_counter() - started
            late = await _submit_some(client, 100)
            await _settled(stack)
            large = await _status_latency(client, early + late, samples)
            last = (await client.get(f"/queue/waiting/requests/{late[-1]}/status")).json()
            rss = {"gateway": round(stack.rss_mb("gateway"), 1), "worker": round(stack.rss_mb("worker0"), 1)}
            await _keep_last(stack.nats_url, "waiting", len(late))
            await _settled(stack)
            small_after = await _status_latency(client, late, samples)
    finally:
        stack.close()
        hold.stop()
    at_100 = (small["p50_ms"] + small_after["p50_ms"]) / 2
    return {
        "workload": "backlog",
        "waiting": size,
        "last_queue_position": last.get("queue_position"),
        "fill_rps": round(fill_rps, 1),
        "fill_s": round(fill_s, 1),
        "status_at_100": small,
        "status_at_backlog": large,
        "status_at_100_after": small_after,
        "p50_ratio_backlog_over_100": round(large["p50_ms"] / at_100, 3),
        "rss_mb": rss,
        "gateway_rss_mb_at_100": round(rss_gateway_small, 1),
    }


async def _running(client: httpx.AsyncClient, request_id: str) -> None:
    async def started() -> bool:
        response = await client.get(f"/queue/waiting/requests/{request_id}/status")
        return bool(response.json().get("status") == "IN_PROGRESS")

    await eventually_true(started, timeout_s=60)


async def _keep_last(nats_url: str, function: str, keep: int) -> None:
    """Drop all but the newest `keep` waiting requests of `function` (one stream purge)."""
    nc = await nats.connect(nats_url)
    try:
        subject = names.queue_subject(function, "normal")
        await nc.jetstream().purge_stream(names.QUEUE_STREAM, subject=subject, keep=keep)
    finally:
        await nc.close()


# --- 4. SSE fan-out -----------------------------------------------------------------------------


async def sse_fanout(root: Path, streams: int) -> dict[str, Any]:
    """Workload 4: `streams` open status streams, one per waiting request; then a worker starts and
    every request goes IN_PROGRESS and COMPLETED. Delay: stream event arrival - the change's own
    timestamp in the status object (started_at / completed_at, taken by the worker)."""
    noop = await Helper("noop").start()
    function = {"name": "sse", "url": f"{noop.url}/", "concurrency": 16}
    settings = {"gateway": {"max_streams": streams + 100}}
    stack = Stack(root, [function], "always", settings=settings)
    await stack.start(worker=False)
    delays: dict[str, list[float]] = {"IN_PROGRESS": [], "COMPLETED": []}
    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            ids = [(await client.post("/queue/sse", content=b"{}")).json()["request_id"] for _ in range(streams)]
        opened = 0
        all_open = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=streams + 10)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

            async def follow(request_id: str) -> None:
                nonlocal opened
                url = f"{stack.url}/queue/sse/requests/{request_id}/status/stream"
                async with session.get(url) as response:
                    opened += 1
                    if opened == streams:
                        all_open.set()
                    async for line in response.content:  # one SSE field per line
                        if not line.startswith(b"data:"):
                            continue
                        now = time.time()
                        status = orjson.loads(line[5:])
                        stamp = {"IN_PROGRESS": "started_at", "COMPLETED": "completed_at"}.get(status["status"])
                        if stamp is not None and status.get(stamp):
                            delays[status["status"]].append((now - unix(status[stamp])) * 1000)
                        if status["status"] == "COMPLETED":
                            return

            followers = [asyncio.create_task(follow(request_id)) for request_id in ids]
            await asyncio.wait_for(all_open.wait(), 60)
            started = time.perf_counter()
            await stack.start_workers()
            await asyncio.wait_for(asyncio.gather(*followers), 180)
            drained_s = time.perf_counter() - started
    finally:
        stack.close()
        noop.stop()
    return {
        "workload": "sse_fanout",
        "streams": streams,
        "drained_s": round(drained_s, 2),
        "in_progress_delay": percentiles(delays["IN_PROGRESS"]),
        "completed_delay": percentiles(delays["COMPLETED"]),
    }


# --- 5. callbacks ------------------------------------------------------------------------------


async def callback_delay(root: Path, count: int, rate: float) -> dict[str, Any]:
    """Workload 5: OpenFaaS callbacks at `rate`/s: receiver arrival - completed_at of the status."""
    noop, receiver = await Helper("noop").start(), await Helper("receiver").start()
    stack = await Stack(root, [{"name": "noop", "url": f"{noop.url}/", "concurrency": 64}], "always").start()
    try:
        url = f"{stack.url}/async-function/noop"
        async with Completions(stack.nats_url, "noop") as completions, httpx.AsyncClient(timeout=30) as client:
            start = time.perf_counter()
            for n in range(count):
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await client.post(url, content=BODY_1KIB, headers={names.H_CALLBACK_URL: f"{receiver.url}/hook"})
            await completions.wait_for(count, timeout_s=60)
        deadline = time.monotonic() + 60
        arrived = await receiver.seen()
        while len(arrived) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            arrived = await receiver.seen()
    finally:
        stack.close()
        noop.stop()
        receiver.stop()
    delays = [
        (arrived[request_id] - unix(status["completed_at"])) * 1000
        for request_id, (_, status) in completions.seen.items()
        if request_id in arrived
    ]
    return {"workload": "callback_delay", "rate_per_s": rate, "callbacks": len(arrived), "delay": percentiles(delays)}
