"""The measured system as real processes on 127.0.0.1: nats-server, `jetspool gateway`,
`jetspool worker`, and the helper servers of `tests.bench.apps`."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from jetspool.embedded import EmbeddedNats
from tests.support.processes import JetspoolProcess, start_part
from tests.support.servers import free_port, wait_until_ready


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # clock ticks: 100 per second on Linux


def stop_process(process: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended after `grace_s`; reaped either way."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class Helper:
    """One `tests.bench.apps` server in its own process."""

    def __init__(self, kind: str, *args: str) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "tests.bench.apps", kind, "--port", str(self.port), *args]
        self.process = subprocess.Popen(command)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Helper:
        await wait_until_ready(self.url)  # /readyz: any path answers 200 but in `plain`
        return self

    async def seen(self) -> dict[str, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            return orjson.loads((await client.get(f"{self.url}/_seen")).content)  # type: ignore[no-any-return]

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class Stack:
    """NATS (with `sync_interval`), a gateway and `workers` worker processes, functions from `functions`."""

    root: Path
    functions: list[dict[str, Any]]
    sync_interval: str = "always"
    workers: int = 1
    settings: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    nats: EmbeddedNats | None = None
    parts: dict[str, JetspoolProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return self.nats.url

    async def start(self, *, worker: bool = True) -> Stack:
        self.root.mkdir(parents=True, exist_ok=True)
        self.nats = EmbeddedNats(self.root / "nats", sync_interval=self.sync_interval)
        self.nats.start()
        config = self.root / "jetspool.yaml"
        settings = {"functions": self.functions, "worker": {"poll_interval": 1.0}, **self.settings}
        config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        self.parts["gateway"] = start_part("gateway", config, self.nats_url, self.port)
        await wait_until_ready(self.url, timeout_s=60)
        if worker:
            await self.start_workers(config)
        return self

    async def start_workers(self, config: Path | None = None) -> None:
        config = config or self.root / "jetspool.yaml"
        for n in range(self.workers):
            part = start_part("worker", config, self.nats_url)
            self.parts[f"worker{n}"] = part
            await asyncio.to_thread(part.wait_for_text, "worker ready", 60)

    def pid(self, part: str) -> int:
        return self.parts[part].process.pid

    def rss_mb(self, part: str) -> float:
        return rss_mb(self.pid(part))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by nats-server and each jetspool part."""
        assert self.nats is not None
        used = {name: cpu_seconds(part.process.pid) for name, part in self.parts.items()}
        return {"nats": cpu_seconds(self.nats.pid), **used}

    def close(self) -> None:
        for part in self.parts.values():
            with contextlib.suppress(Exception):
                part.terminate(15)
            part.kill_tree()
        if self.nats is not None:
            self.nats.stop()
