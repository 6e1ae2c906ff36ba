"""`jetspool up`: the whole stack on one machine.

Starts an embedded nats-server (unless a NATS URL is configured), then the gateway and the
worker process(es) (each a `jetspool gateway` / `jetspool worker` child), and with `--demo`
the demo functions. Prints the gateway URL once it is ready. On SIGINT or SIGTERM, or when a
part dies (a child or the embedded nats-server), it stops the children and then the NATS
server, last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import msgspec

from jetspool.aio import stop_task
from jetspool.domain import names
from jetspool.domain.errors import ConfigError
from jetspool.domain.functions import masked
from jetspool.embedded import EmbeddedNats, die_with_parent
from jetspool.jetstream.connection import check_key_files, connect
from jetspool.jetstream.provision import drop_idle_function_consumers
from jetspool.jetstream.registry import FunctionRegistry
from jetspool.jetstream.startup import check_durability, open_jetstream
from jetspool.settings import check_listen, check_tls_files, load, url_host

if TYPE_CHECKING:
    from pathlib import Path

    from jetspool.domain.functions import Function
    from jetspool.settings import NatsSettings, Settings

_READY_TIMEOUT_S = 60.0
_WITHDRAW_TIMEOUT_S = 5.0
"""How long a stop waits to unregister the demo functions (from a NATS that does not answer)."""
_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class UpOptions:
    config: str | None
    data_dir: Path
    workers: int
    demo: bool
    log_level: str = "INFO"
    log_format: str = "text"
    """Handed on to every process `up` starts."""


_ACCEPT_SINGLE_REPLICA = "JETSPOOL_NATS__ACCEPT_SINGLE_REPLICA"
_PUBLIC_URL = "JETSPOOL_GATEWAY__PUBLIC_URL"
_NATS_URL = "JETSPOOL_NATS__URL"
_NATS_SERVER = "nats-server"
"""The embedded server's name in `up`'s messages, beside the children's ("gateway", "worker 1", ...)."""


class StopRequest:
    """Whether a stop was asked for: set by the signal handlers, waited on by the main thread.

    A plain flag, no lock: a handler runs in the main thread between two of its bytecodes, possibly
    while that thread holds a lock. With `threading.Event`, a SIGTERM that came while `up` waited
    on the event hung it for good: the handler's `set` waited for the event's lock, which its own
    thread held inside `wait`."""

    def __init__(self) -> None:
        self._asked = False

    def set(self) -> None:
        self._asked = True

    def is_set(self) -> bool:
        return self._asked

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s` unless a stop was asked for; whether one was."""
        if not self._asked:
            time.sleep(timeout_s)
        return self._asked


class Supervisor:
    def __init__(self, settings: Settings, options: UpOptions) -> None:
        self._settings = settings
        self._options = options
        self._nats: EmbeddedNats | None = None
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._child_env: dict[str, str] = {}
        self._stop = StopRequest()
        self._demo: list[Function] = []
        """The demo functions registered, unregistered again at the stop."""

    def run(self) -> int:
        """Run until a signal or a child's death; 0 on a requested stop, 1 when a child died."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            check_listen(self._settings.gateway)  # before anything starts
            nats_url = self._start_nats()
            self._start_children(nats_url)
            self._wait_ready()
            if self._stop.is_set():
                return 0  # stopped before the stack was up: nothing to announce
            self._announce(self._settings.gateway.base_url, nats_url)
            return self._watch()
        finally:
            self._stop_children()
            nats_gone = self._nats is not None and self._nats.exit_code() is not None
            if self._demo and not nats_gone:  # with the server gone, so is any way to unregister
                self._withdraw_demo()
            if self._nats is not None:
                self._nats.stop()

    def _start_nats(self) -> str:
        servers = self._settings.nats.servers
        if servers:
            return ",".join(servers)
        self._nats = EmbeddedNats(
            self._options.data_dir, self._settings.nats.sync_interval, extra_config=_authorization(self._settings.nats)
        )
        # The server is ours, with the configured fsync policy: a single replica is what it has.
        self._settings = msgspec.structs.replace(
            self._settings, nats=msgspec.structs.replace(self._settings.nats, accept_single_replica=True)
        )
        self._child_env[_ACCEPT_SINGLE_REPLICA] = "true"
        return self._nats.start()

    def _start_children(self, nats_url: str) -> None:
        # In the environment, not on the command line: a password in the URL was there for every
        # local user to read in `ps` (found by an outside audit).
        self._child_env[_NATS_URL] = nats_url
        common = ["--log-level", self._options.log_level]
        common += ["--log-format", self._options.log_format]
        if self._options.config:
            common += ["--config", self._options.config]
        if self._options.demo:
            port = _free_port()
            self._spawn("demo functions", ["demo-functions", "--port", str(port)])
            demo_url = f"http://127.0.0.1:{port}"
            self._wait_http(f"{demo_url}/healthz", "demo functions")
            from jetspool import demo  # noqa: PLC0415 - only `--demo` needs it

            functions = demo.functions(demo_url)
            asyncio.run(self._register_demo(nats_url, functions))
            self._demo = functions
            if self._stop.is_set():
                return
        gateway = self._settings.gateway
        # Workers hand functions URLs of the gateway (X-Logs-Url, the URLs in events): the one
        # `up` starts, with whatever flags chose its address, not the config file's default.
        self._child_env[_PUBLIC_URL] = gateway.base_url
        self._spawn("gateway", ["gateway", *common, "--host", gateway.host, "--port", str(gateway.port)])
        for index in range(self._options.workers):
            self._spawn(f"worker {index + 1}", ["worker", *common])

    def _spawn(self, name: str, args: list[str]) -> None:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            # -P: no module of the working directory shadows one of the parts' (a `queue.py` there
            # broke the start-up, and would run as the gateway; found by an outside audit).
            [sys.executable, "-P", "-m", "jetspool", *args],
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only sets the death signal
            start_new_session=True,  # Ctrl-C reaches the supervisor alone; it stops NATS last
            env={**os.environ, **self._child_env},
        )
        self._children.append((name, process))

    async def _register_demo(self, nats_url: str, functions: list[Function]) -> None:
        """Register `functions`, waiting as for a part to be ready: until a stop is asked for, a part
        ends or time runs out. Waited on alone, a NATS that did not answer held `up` here for good,
        deaf to SIGTERM (its handler only notes the request)."""
        registering = asyncio.create_task(_register(self._settings, nats_url, functions))
        deadline = time.monotonic() + _READY_TIMEOUT_S
        try:
            while not registering.done():
                if self._stop.is_set():
                    return
                self._check_parts()
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"the demo functions were not registered within {_READY_TIMEOUT_S:g} s{self._nats_hint()}"
                    )
                await asyncio.wait({registering}, timeout=_POLL_S)
        finally:
            if not registering.done():
                await stop_task(registering)
        registering.result()  # its error, if any

    def _withdraw_demo(self) -> None:
        """Unregister the demo functions, which stop with `up`: left registered, at the port of demo
        functions no longer served, the next `up` without `--demo` took their requests and failed
        every attempt (found by an audit). Requests still waiting for them run when `up --demo`
        registers them again."""
        nats_url = self._child_env[_NATS_URL]
        try:
            asyncio.run(asyncio.wait_for(_withdraw(self._settings, nats_url, self._demo), _WITHDRAW_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - stopping: told, and the stop goes on
            listed = ", ".join(function.name for function in self._demo)
            sys.stderr.write(f"jetspool: the demo functions ({listed}) could not be unregistered: {exc!r}\n")
        self._demo = []

    def _nats_hint(self) -> str:
        """What to check when a part waiting for a NATS server we did not start is not ready."""
        return "" if self._nats else f"; is NATS at {','.join(self._settings.nats.servers)} reachable?"

    def _wait_ready(self) -> None:
        """Wait for the gateway `up` started, asked where it listens (its public URL may be a proxy's)."""
        gateway = self._settings.gateway
        scheme = "https" if gateway.serves_https else "http"
        self._wait_http(f"{scheme}://{url_host(gateway.host)}:{gateway.port}/readyz", "gateway", self._nats_hint())

    def _wait_http(self, url: str, what: str, hint: str = "") -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        # Our own child on this machine: its certificate (often self-signed) is not what is checked here.
        with httpx.Client(timeout=1.0, verify=False) as client:  # noqa: S501
            while time.monotonic() < deadline and not self._stop.is_set():
                self._check_parts()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:  # noqa: PLR2004
                        return
                self._stop.wait(_POLL_S)
        if not self._stop.is_set():
            raise ConfigError(f"the {what} did not become ready within {_READY_TIMEOUT_S:g} s ({url}){hint}")

    def _announce(self, base_url: str, nats_url: str) -> None:
        lines = [f"jetspool is up: {base_url}"]
        where = f"embedded, data in {self._options.data_dir.resolve()}" if self._nats else "external"
        shown_url = ",".join(masked(url) for url in nats_url.split(","))  # no password on the screen
        lines.append(f"  nats:    {shown_url} ({where})")
        lines.append(f"  workers: {self._options.workers}")
        if self._options.demo:
            lines.append("  demo functions: echo, sleep, flaky")
        lines.append("Press Ctrl-C to stop.")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def _watch(self) -> int:
        while not self._stop.wait(_POLL_S):
            ended = self._ended_part()
            if ended is not None:
                name, code = ended
                sys.stderr.write(
                    f"jetspool: {name} stopped unexpectedly ({self._how(name, code)}); stopping everything\n"
                )
                return 1
        return 0

    def _check_parts(self) -> None:
        """During start-up: a part that has ended is an error (exit code 2)."""
        ended = self._ended_part()
        if ended is not None:
            name, code = ended
            raise ConfigError(f"the {name} stopped during start-up ({self._how(name, code)})")

    def _ended_part(self) -> tuple[str, int] | None:
        """The first part found ended, with its exit code: the embedded nats-server, then the children.

        The server is a part like the others: killed, it left `up` running for good, its gateway
        and workers retrying and /readyz answering 503 (found by an external audit)."""
        if self._nats is not None and (code := self._nats.exit_code()) is not None:
            return _NATS_SERVER, code
        for name, process in self._children:
            if (code := process.poll()) is not None:
                return name, code
        return None

    def _how(self, name: str, code: int) -> str:
        """How a part ended, for its message; the embedded server's own output is in its log file."""
        how = _exit_status(code)
        if name == _NATS_SERVER and self._nats is not None:
            how += f"; its log: {self._nats.log_path}"
        return how

    def _stop_children(self) -> None:
        for _, process in self._children:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._settings.worker.shutdown_grace + 10
        for _, process in self._children:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._children.clear()


def _authorization(nats: NatsSettings) -> str:
    """The embedded server's `authorization` block: the user and password, or the token, that the
    parts are configured to connect with. It took anyone on the machine without them, and they
    could read the registry (the functions' own headers) past the admin key (found by an outside
    audit). Without any, the server is open to local connections, as the README says."""
    if nats.user is not None and nats.password is not None:
        fields = (
            f"user: {_conf_string('nats.user', nats.user)}\n  password: {_conf_string('nats.password', nats.password)}"
        )
    elif nats.token is not None:
        fields = f"token: {_conf_string('nats.token', nats.token)}"
    else:
        return ""
    return f"authorization {{\n  {fields}\n}}\n"


def _conf_string(key: str, value: str) -> str:
    """`value` as a quoted string of nats-server's configuration. Its parser takes the escapes
    `\\"`, `\\\\`, `\\t`, `\\n` and `\\r` only: JSON's `\\uXXXX` for a letter beyond ASCII
    stopped it from starting (found by a review). Other control characters have no escape there."""
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in value):
        raise ConfigError(f"{key}: control characters cannot be given to the embedded nats-server")
    if key == "nats.password" and value.startswith("$2"):  # nats-server reads it as a bcrypt hash (a review)
        raise ConfigError(f"{key}: one beginning with `$2` is taken by nats-server for a bcrypt hash; choose another")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


async def _register(settings: Settings, nats_url: str, functions: list[Function]) -> None:
    """Register the demo functions (and provision everything, so children start on a ready layout)."""
    settings = msgspec.structs.replace(settings, nats=msgspec.structs.replace(settings.nats, url=nats_url))
    async with contextlib.AsyncExitStack() as started:
        await open_jetstream(settings, "jetspool-up", started, functions)


async def _withdraw(settings: Settings, nats_url: str, functions: list[Function]) -> None:
    """Unregister `functions` where the registry still holds them as registered (not replaced
    since), and drop their consumers when no request waits."""
    settings = msgspec.structs.replace(settings, nats=msgspec.structs.replace(settings.nats, url=nats_url))
    conn = await connect(settings.nats, "jetspool-up")
    try:
        registry = FunctionRegistry(await conn.js.key_value(names.FUNCTIONS_BUCKET))
        for function in functions:
            if await registry.withdraw(function):
                await drop_idle_function_consumers(conn.js, function.name)
    finally:
        await conn.close()


def _exit_status(code: int) -> str:
    """A `Popen.returncode` in words: "exit code 3", "killed by SIGKILL"."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a signal with no name (a real-time one)
        return f"killed by signal {-code}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_up(settings: Settings, options: UpOptions) -> int:
    """Run the stack; a ConfigError (exit 2) for settings any part would refuse, before anything starts."""
    # The children read the same file and environment, but only the gateway gets --host/--port: a
    # value those flags override here would still stop a worker.
    load(options.config, flags={"nats.url": None})
    check_durability(settings)
    check_tls_files(settings.gateway)
    check_key_files(settings.nats)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return Supervisor(settings, options).run()
