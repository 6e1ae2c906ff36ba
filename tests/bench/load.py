"""Load generators: wrk for closed-loop load (it is not the bottleneck: C, two threads), and a
paced asyncio client (aiohttp: far cheaper per request than httpx) for open-loop load."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

BODY_1KIB = orjson.dumps({"input": "x" * 1000, "n": 1})  # 1 KiB of JSON
assert 1000 < len(BODY_1KIB) <= 1024

_SCRIPT = """
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def record(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rps": round(self.rps, 1),
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "errors": self.non_2xx + self.socket_errors,
        }


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed: `just bench` installs it (apt-get install wrk)")
    return found


async def wrk(url: str, *, connections: int = 64, seconds: float = 10, body: bytes = BODY_1KIB) -> WrkResult:
    """POST `body` to `url` over `connections` keep-alive connections for `seconds`, from two wrk
    threads (in a thread of ours: the event loop goes on, e.g. taking events)."""
    return await asyncio.to_thread(_wrk, url, connections, seconds, body)


def _wrk(url: str, connections: int, seconds: float, body: bytes) -> WrkResult:
    threads = 2
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_SCRIPT)
    try:
        env = {**os.environ, "BENCH_BODY": body.decode()}
        args = [wrk_path(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
        completed = subprocess.run(
            [*args, "-s", script.name, url], env=env, capture_output=True, text=True, check=True, timeout=seconds + 120
        )
    finally:
        Path(script.name).unlink()
    line = next((x for x in completed.stdout.splitlines() if x.startswith("WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{completed.stdout}\n{completed.stderr}")
    raw = orjson.loads(line[4:])
    return WrkResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        non_2xx=raw["non_2xx"],
        socket_errors=raw["socket_errors"],
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


async def paced(url: str, rate: float, count: int, body: bytes = BODY_1KIB) -> list[tuple[float, str]]:
    """Submit `count` requests at `rate` per second (open loop: a slow answer does not delay the
    next send); returns (Unix time sent, request id) per accepted request."""
    sent: list[tuple[float, str]] = []
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as client:

        async def one(at: float) -> None:
            async with client.post(url, data=body, headers={"content-type": "application/json"}) as response:
                answer = await response.read()
                if response.status == 202:
                    sent.append((at, response.headers.get("X-Call-Id") or orjson.loads(answer)["request_id"]))

        start = time.perf_counter()
        tasks = []
        for n in range(count):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(time.time())))
        await asyncio.gather(*tasks)
    return sent
