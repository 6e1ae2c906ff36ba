"""Benchmark: status route latency with 100 and with 100,000 waiting requests (issue 3).

Real parts: a nats-server process, the uvicorn-served gateway, no worker (requests stay
waiting). The backlog is filled through the gateway's own intake (the code behind the submit
routes), then the status of requests spread over the whole backlog is fetched over HTTP.
Prints one JSON record; the figure that matters is the ratio of the two medians.

    python -m tests.bench.status_latency [--large 100000] [--samples 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jetspool.embedded import EmbeddedNats
from jetspool.gateway.intake import Submission
from tests.support.stack import Stack, start_stack

_FILL_CONCURRENCY = 256


async def _fill(stack: Stack, count: int, ids: list[str]) -> None:
    gateway = stack.app.state.gateway
    function = gateway.view.get("waiting")
    submission = Submission(
        function, "POST", "", "", [("content-type", "application/json")], b"{}", None, None, "normal", False
    )
    remaining = count

    async def one_worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            ids.append((await gateway.intake.submit(submission)).request_id)

    await asyncio.gather(*(one_worker() for _ in range(_FILL_CONCURRENCY)))


async def _measure(stack: Stack, ids: list[str], samples: int) -> dict[str, float]:
    rng = random.Random(7)  # noqa: S311 - sampling, not cryptography
    chosen = [rng.choice(ids) for _ in range(samples)]
    for request_id in chosen[:20]:  # warm-up
        await stack.client.get(f"/queue/waiting/requests/{request_id}/status")
    latencies = []
    for request_id in chosen:
        started = time.perf_counter()
        response = await stack.client.get(f"/queue/waiting/requests/{request_id}/status")
        latencies.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 202
        assert response.json()["queue_position"] >= 0
    latencies.sort()
    return {
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
    }


async def run(small: int, large: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as data:
        nats = EmbeddedNats(Path(data), sync_interval="2m")
        nats.start()
        try:
            stack = await start_stack(nats, worker=False)
            try:
                await stack.register("waiting")
                ids: list[str] = []
                await _fill(stack, small, ids)
                at_small = await _measure(stack, ids, samples)
                started = time.perf_counter()
                await _fill(stack, large - small, ids)
                fill_s = time.perf_counter() - started
                at_large = await _measure(stack, ids, samples)
            finally:
                await stack.close()
        finally:
            nats.stop()
    return {
        "benchmark": "status_latency",
        "waiting_small": small,
        "waiting_large": large,
        "samples": samples,
        "small": at_small,
        "large": at_large,
        "p50_ratio_large_over_small": round(at_large["p50_ms"] / at_small["p50_ms"], 3),
        "fill_rate_per_s": round((large - small) / fill_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args()
    record = asyncio.run(run(args.small, args.large, args.samples))
    sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
