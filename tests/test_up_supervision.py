"""`jetspool up` watches every part it started, its embedded nats-server too: one that dies stops the rest."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.processes import ACCEPT_SINGLE_REPLICA, FAST_STOP, JetspoolProcess, Up, alive, descendants
from tests.support.servers import free_port

_EXIT_TIMEOUT_S = 30.0
_KILLED_AFTER_S = 11.0
"""`up` SIGKILLs a child still running `shutdown_grace` (1 s here) plus 10 s after its SIGTERM."""


def _exit_code(proc: JetspoolProcess, timeout_s: float) -> int | None:
    """Its exit code, or None if it still runs after `timeout_s`."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _running(pids: set[int], *argv: str) -> list[int]:
    """The processes among `pids` whose command line (Linux /proc) holds `argv`, in that order."""
    wanted = "\0".join(argv).encode()
    found = []
    for pid in pids:
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if wanted in command:
            found.append(pid)
    return found


@pytest.mark.timeout(120)
def test_up_stops_everything_with_exit_code_1_when_its_nats_server_is_killed(up: Up) -> None:
    """Found by an external audit: `up` went on with nats-server `<defunct>`, its gateway and worker
    retrying for good and /readyz answering 503, until a SIGTERM, which it answered with exit code 0."""
    tree = descendants(up.proc.process.pid)
    servers = _running(tree, "nats-server", "-c")
    assert len(servers) == 1, f"one embedded nats-server among {tree}"
    assert len(tree) >= 4, "embedded nats-server, demo functions, gateway and a worker run as children"

    os.kill(servers[0], signal.SIGKILL)
    killed_at = time.monotonic()
    code = _exit_code(up.proc, _EXIT_TIMEOUT_S)
    took_s = time.monotonic() - killed_at

    assert code == 1, f"exit code {code} after {took_s:.1f} s; output ends:\n{up.proc.output[-3000:]}"
    _, said, after = up.proc.output.partition("jetspool: nats-server stopped unexpectedly (killed by SIGKILL")
    assert said, up.proc.output[-3000:]
    assert "worker stopping" in after, "the worker got its normal stop"
    assert took_s < _KILLED_AFTER_S, "no part waited out its grace and was killed"
    assert [pid for pid in tree if alive(pid)] == []
    # No part ends in a traceback: a worker stopped while its NATS was away did, with uvloop's
    # RuntimeError out of nats-py's close.
    assert "Traceback" not in up.proc.output, up.proc.output[-3000:]


@pytest.mark.timeout(120)
def test_up_stops_everything_with_exit_code_1_when_a_worker_is_killed(up: Up) -> None:
    tree = descendants(up.proc.process.pid)
    workers = _running(tree, "-m", "jetspool", "worker")
    assert len(workers) == 1, f"one worker among {tree}"

    os.kill(workers[0], signal.SIGKILL)
    code = _exit_code(up.proc, _EXIT_TIMEOUT_S)

    assert code == 1, up.proc.output[-3000:]
    assert "jetspool: worker 1 stopped unexpectedly (killed by SIGKILL); stopping everything" in up.proc.output
    assert [pid for pid in tree if alive(pid)] == []
    assert "Traceback" not in up.proc.output


@pytest.mark.timeout(90)
def test_sigterm_stops_up_while_it_registers_the_demo_functions(tmp_path: Path) -> None:
    """`up --demo` registers the demo functions itself before it starts the gateway. A NATS that did
    not answer held it there for good, and a SIGTERM was noted but never looked at."""
    with socket.socket() as silent:  # a NATS that accepts connections and never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        args = ["up", "--demo", "--nats-url", f"nats://127.0.0.1:{silent.getsockname()[1]}", "--port", str(free_port())]
        env = {ACCEPT_SINGLE_REPLICA: "true", **FAST_STOP}
        proc = JetspoolProcess([*args, "--data-dir", str(tmp_path / "data")], env=env, cwd=tmp_path)
        try:
            connection, _ = silent.accept()  # `up` itself, registering: nothing else of it uses NATS yet
            with connection:
                tree = descendants(proc.process.pid)
                proc.process.send_signal(signal.SIGTERM)
                code = _exit_code(proc, _EXIT_TIMEOUT_S)
        finally:
            proc.kill_tree()

    assert code == 0, proc.output[-3000:]
    assert "jetspool is up" not in proc.output
    assert [pid for pid in tree if alive(pid)] == []
    assert "Traceback" not in proc.output
