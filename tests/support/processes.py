"""Running `jetspool` as real processes, and finding what they left behind."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

_PROC = Path("/proc")
ACCEPT_SINGLE_REPLICA = "JETSPOOL_NATS__ACCEPT_SINGLE_REPLICA"
FAST_STOP = {"JETSPOOL_WORKER__SHUTDOWN_GRACE": "1", "JETSPOOL_WORKER__POLL_INTERVAL": "0.2"}
"""Workers that stop and look for work quickly, for tests that stop a stack."""


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (_PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def local_tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process `pid` holds (Linux /proc)."""
    inodes: set[str] = set()
    for fd in (_PROC / str(pid) / "fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (_PROC / str(pid) / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


class JetspoolProcess:
    """`python -m jetspool ARGS` (or another `module`) with its output read line by line in a thread."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, module: str = "jetspool"
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, prefix: str, timeout_s: float = 60.0) -> str:
        """The first output line starting with `prefix`; fails if the process ends or time runs out."""
        return self._wait_for(lambda line: line.startswith(prefix), f"starting {prefix!r}", timeout_s)

    def wait_for_text(self, text: str, timeout_s: float = 60.0) -> str:
        """The first output line (from now on) containing `text`; fails if the process ends or time runs out.

        It blocks: from a test's event loop, call it through `asyncio.to_thread`."""
        return self._wait_for(lambda line: text in line, f"with {text!r}", timeout_s)

    def _wait_for(self, match: Callable[[str], bool], what: str, timeout_s: float) -> str:
        while True:
            try:
                line = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no line {what}; output so far:\n{self.output}") from None
            if line is None:
                raise RuntimeError(f"process ended before a line {what}; output:\n{self.output}")
            self.lines.append(line)
            if match(line):
                return line.strip()

    @property
    def output(self) -> str:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)

    def wait(self, timeout_s: float = 60.0) -> int:
        """Wait for the process to end, then release its output pipe."""
        code = self.process.wait(timeout_s)
        self._reader.join(timeout_s)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill_tree(self) -> None:
        """Last-resort cleanup: SIGKILL the process and everything below it."""
        for pid in descendants(self.process.pid) | {self.process.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(10)


def start_part(kind: str, config: Path, nats_url: str, port: int | None = None, **env: str) -> JetspoolProcess:
    """`jetspool gateway` (on `port`) or `jetspool worker`, with `config` and `nats_url` (a single local
    test server, fsyncing every write: one replica is accepted)."""
    args = [kind, "--config", str(config), "--nats-url", nats_url]
    if port is not None:
        args += ["--port", str(port)]
    return JetspoolProcess(args, env={ACCEPT_SINGLE_REPLICA: "true", **env})


def sigkill(process: JetspoolProcess) -> None:
    """Kill the process at once, as a crash would, and reap it."""
    os.kill(process.process.pid, signal.SIGKILL)
    process.wait(10)


def stopped_while_waiting_for_nats(args: list[str], env: dict[str, str]) -> tuple[int, JetspoolProcess]:
    """Run `jetspool <args>` (its NATS URL one where nothing listens), SIGTERM it once it waits for
    the server, and return its exit code and the ended process."""
    proc = JetspoolProcess(args, env=env)
    try:
        proc.wait_for_text("Connection refused", 30)
        return proc.terminate(10), proc
    finally:
        proc.kill_tree()


class Up:
    """`jetspool up --demo` as a real process tree on `port`, announced ready."""

    def __init__(self, data_dir: Path, port: int, *flags: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = JetspoolProcess(
            ["up", "--demo", "--port", str(port), "--data-dir", str(data_dir), *flags],
            env=FAST_STOP,
            cwd=data_dir.parent,
        )
        self.announced = self.proc.wait_for_line("jetspool is up:")

    def stop(self) -> int:
        return self.proc.terminate()
