"""Optional comparison (`--celery`): the same end-to-end job on FastAPI + Celery + Redis.

Redis runs with its defaults (no append-only file: it does not fsync each task, unlike
jetspool's default); the Celery worker is prefork with four processes, as is usual on two cores.
Completions per second: what wrk submits in `seconds`, until Redis holds every task's result.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import redis

from tests.bench.load import wrk
from tests.bench.parts import Helper, stop_process
from tests.support.servers import free_port, wait_until_ready

if TYPE_CHECKING:
    from pathlib import Path

_WORKER_PROCESSES = 4


def _results(
    client: redis.Redis,
) -> int:
    return sum(1 for _ in client.scan_iter(match="celery-task-meta-*", count=10_000))


def run(root: Path, seconds: float) -> dict[str, Any]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed: `just bench` installs it (apt-get install redis-server)")
    root.mkdir(parents=True, exist_ok=True)
    redis_port, api_port = free_port(), free_port()
    noop = asyncio.run(Helper("noop").start())
    env = {
        **os.environ,
        "BENCH_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "BENCH_FUNCTION_URL": f"{noop.url}/",
    }
    processes = [
        subprocess.Popen(
            [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(root)],
            stdout=subprocess.DEVNULL,
        )
    ]
    try:
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "tests.bench.celery_app:api",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                env=env,
            )
        )
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "tests.bench.celery_app:queue",
                    "worker",
                    "--pool",
                    "prefork",
                    "--concurrency",
                    str(_WORKER_PROCESSES),
                    "--loglevel",
                    "warning",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
            )
        )
        url = f"http://127.0.0.1:{api_port}"
        asyncio.run(wait_until_ready(url, timeout_s=60))
        client = redis.Redis(port=redis_port)
        warm_up = asyncio.run(wrk(f"{url}/submit", seconds=1))  # also proves the worker runs
        deadline = time.monotonic() + 60
        while _results(client) < warm_up.requests - warm_up.non_2xx and time.monotonic() < deadline:
            time.sleep(0.2)
        client.flushdb()
        started = time.time()
        submitted = asyncio.run(wrk(f"{url}/submit", seconds=seconds))
        accepted = submitted.requests - submitted.non_2xx
        deadline = time.monotonic() + 600
        done = 0
        while done < accepted and time.monotonic() < deadline:
            time.sleep(0.25)
            done = _results(client)
        finished = time.time()
    finally:
        for process in reversed(processes):  # the worker and the API first, Redis last
            stop_process(process, grace_s=20)
        noop.stop()
    return {
        "workload": "celery",
        "worker_processes": _WORKER_PROCESSES,
        "requests": done,
        "completions_per_s": round(done / (finished - started), 1),
        "submit_rps_during": round(submitted.rps, 1),
        "submit": submitted.record(),
    }
