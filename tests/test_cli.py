"""`jetspool` as a user runs it: `up --demo` as a real process tree, the README walkthrough, stop, restart."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from jetspool.cli import _parser
from jetspool.domain.errors import ConfigError
from jetspool.embedded import EmbeddedNats
from jetspool.settings import NatsSettings
from jetspool.supervisor import _authorization
from tests.support.processes import (
    ACCEPT_SINGLE_REPLICA,
    FAST_STOP,
    JetspoolProcess,
    Up,
    alive,
    descendants,
    start_part,
    stopped_while_waiting_for_nats,
)
from tests.support.servers import eventually_true, free_port, wait_until_ready
from tests.support.tls import self_signed

BASH = shutil.which("bash") or "/bin/bash"
README = Path(__file__).resolve().parents[1] / "README.md"


def _walkthrough(port: int) -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert block is not None, "README has a walkthrough block"
    return block.group(1).replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def _wait_completed(client: httpx.Client, name: str, request_id: str, timeout_s: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, object] = client.get(f"/queue/{name}/requests/{request_id}/status").json()
        if status["status"] == "COMPLETED":
            return status
        time.sleep(0.05)
    raise TimeoutError(f"{name} request {request_id} did not complete")


@pytest.mark.timeout(120)
def test_up_prints_the_gateway_url_and_the_readme_walkthrough_works_as_printed(up: Up) -> None:
    assert up.announced == f"jetspool is up: {up.url}"

    result = subprocess.run(
        [BASH, "-eu", "-c", _walkthrough(up.port)], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    assert re.search(r"request id: [0-9a-f-]{36}", out)
    assert '"status":"COMPLETED"' in out
    assert '"path":"/echo/hello"' in out
    assert '"query":"lang=en"' in out
    assert '\\"text\\": \\"hi\\"' in out
    assert '"attempts":3' in out
    assert "HTTP/1.1 202 Accepted" in out
    assert '"name":"mine"' in out
    assert '"concurrency":4' in out
    assert out.rstrip().endswith("204")
    with httpx.Client(base_url=up.url) as client:  # the callback chain: sleep's answer was queued into echo
        deadline = time.monotonic() + 30
        while client.get("/system/functions/echo").json()["stats"]["completed"] < 2:
            assert time.monotonic() < deadline, "the callback from sleep reached echo"
            time.sleep(0.1)


@pytest.mark.timeout(120)
def test_up_workers_hand_functions_the_url_of_the_gateway_it_started(up: Up) -> None:
    """`up --port P`: the X-Logs-Url a function gets points at port P, not the default 8080."""
    with httpx.Client(base_url=up.url, timeout=30) as client:
        request_id = client.post("/async-function/echo", content=b"hi").headers["x-call-id"]
        _wait_completed(client, "echo", request_id)
        seen = client.get(f"/queue/echo/requests/{request_id}").json()

    logs_url = seen["headers"]["x-logs-url"]
    assert logs_url.startswith(f"{up.url}/queue/echo/requests/{request_id}/logs?token="), logs_url


@pytest.mark.timeout(120)
def test_sigterm_stops_every_process_it_started(up: Up) -> None:
    tree = descendants(up.proc.process.pid)
    assert len(tree) >= 4, "embedded nats-server, demo functions, gateway and a worker run as children"

    code = up.stop()

    assert code == 0
    assert [pid for pid in tree if alive(pid)] == []
    assert "Traceback" not in up.proc.output


_PELTED = """
import os, signal, sys, threading, time
from jetspool.supervisor import StopRequest

stop, pelting = StopRequest(), True
signal.signal(signal.SIGUSR1, lambda *_: stop.set())

def pelt():
    while pelting:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.0002)

threading.Thread(target=pelt, daemon=True).start()
end = time.monotonic() + 2
while time.monotonic() < end:
    stop.wait(0.001)
pelting = False
print("stopped" if stop.is_set() else "not stopped")
"""


def test_up_waits_for_a_stop_in_a_way_a_signal_handler_cannot_hang() -> None:
    """Stop signals set what `up` waits on from their handler, thousands of times while it waits.
    With a `threading.Event` this hangs (or overflows the stack) within a second: a handler's
    `set` waits for the lock its own thread holds inside `wait`. Seen once with one SIGTERM."""
    run = subprocess.run([sys.executable, "-c", _PELTED], capture_output=True, text=True, timeout=60, check=False)

    assert (run.returncode, run.stdout.strip()) == (0, "stopped"), run.stderr[-2000:]


@pytest.mark.parametrize(
    ("argv", "level", "log_format"),
    [
        (["worker"], "INFO", "text"),
        (["gateway", "--log-format", "json", "--log-level", "DEBUG"], "DEBUG", "json"),
        (["--log-format", "json", "worker"], "INFO", "json"),
        (["--log-format", "json", "--log-level", "ERROR", "up", "--log-format", "text"], "ERROR", "text"),
        (["up", "--log-level", "debug"], "DEBUG", "text"),  # as logging's level names go, in any case
    ],
)
def test_log_options_go_before_or_after_the_command_and_after_wins(
    argv: list[str], level: str, log_format: str
) -> None:
    args = _parser().parse_args(argv)

    assert (args.log_level, args.log_format) == (level, log_format)


@pytest.mark.timeout(120)
def test_up_hands_its_log_format_to_every_process_it_starts(tmp_path: Path) -> None:
    """`--log-format json` after the command, as after `jetspool`: the gateway's and the workers' lines are JSON too."""
    running = Up(tmp_path / "data", free_port(), "--log-format", "json")
    try:
        if '"message":"worker ready"' not in running.proc.output:  # it may come before the gateway is ready
            running.proc.wait_for_text('"message":"worker ready"')
        code = running.stop()
    finally:
        running.proc.kill_tree()

    assert code == 0
    announcement = ("jetspool is up:", "  ", "Press Ctrl-C")
    lines = [line for line in running.proc.output.splitlines() if not line.startswith(announcement)]
    loggers = {orjson.loads(line)["logger"] for line in lines}  # every line a JSON object
    assert {"jetspool.gateway.app", "jetspool.worker.main", "jetspool.jetstream.provision"} <= loggers


@pytest.mark.timeout(180)
def test_restart_on_the_same_data_dir_keeps_requests_and_statuses(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    first = Up(data_dir, port)
    try:
        with httpx.Client(base_url=first.url, timeout=10) as client:
            done = client.post("/async-function/echo", content=b"before restart").headers["x-call-id"]
            _wait_completed(client, "echo", done)
            waiting = [
                client.post("/async-function/sleep", params={"seconds": "2"}).headers["x-call-id"] for _ in range(6)
            ]
        assert first.stop() == 0
    finally:
        first.proc.kill_tree()

    second = Up(data_dir, port)
    try:
        with httpx.Client(base_url=second.url, timeout=10) as client:
            kept = client.get(f"/queue/echo/requests/{done}/status").json()
            result = client.get(f"/queue/echo/requests/{done}").json()
            finished = [_wait_completed(client, "sleep", request_id, timeout_s=60) for request_id in waiting]
        assert second.stop() == 0
    finally:
        second.proc.kill_tree()

    assert kept["status"] == "COMPLETED"
    assert result["body"] == "before restart"
    assert all("error_type" not in status for status in finished)


@pytest.mark.timeout(180)
def test_the_demo_functions_stop_with_up_and_a_function_registered_in_their_place_stays(tmp_path: Path) -> None:
    """Left registered at the port of demo functions no longer served, they took the requests of
    the next `up` without `--demo` and failed every attempt (found by an audit)."""
    data_dir, port = tmp_path / "data", free_port()
    own = {"name": "flaky", "url": "http://127.0.0.1:9/own"}
    demo = Up(data_dir, port)
    try:
        with httpx.Client(base_url=demo.url, timeout=10) as client:
            shown = {entry["name"] for entry in client.get("/system/functions").json()}
            assert client.put("/system/functions/flaky", json=own).status_code == 200
        assert demo.stop() == 0
    finally:
        demo.proc.kill_tree()

    plain = JetspoolProcess(["up", "--port", str(port), "--data-dir", str(data_dir)], env=FAST_STOP, cwd=tmp_path)
    try:
        plain.wait_for_line("jetspool is up:")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            left = {entry["name"]: entry["url"] for entry in client.get("/system/functions").json()}
        assert plain.terminate() == 0
    finally:
        plain.kill_tree()

    assert shown == {"echo", "sleep", "flaky"}
    assert left == {"flaky": own["url"]}, "the demo's own entries went with it; the one put in their place stayed"


def test_a_bad_config_file_stops_with_the_key_and_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("nats:\n  url: nats://127.0.0.1:4222\n  replicas: many\n", encoding="utf-8")

    proc = JetspoolProcess(["gateway", "--config", str(config)])
    code = proc.wait(30)

    assert code == 2
    assert "nats.replicas" in proc.output
    assert "Traceback" not in proc.output


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["worker"], {}, "nats.url"),
        (["gateway", "--nats-url", "nats://127.0.0.1:1"], {"JETSPOOL_GATEWAY__PORT": "eighty"}, "gateway.port"),
        (["up", "--workers", "0"], {}, "--workers"),
        (["worker", "--nats-url", "nats://127.0.0.1:1"], {}, "nats.accept_single_replica"),
        (["up", "--nats-url", "nats://127.0.0.1:1", "--port", "1"], {}, "nats.accept_single_replica"),
    ],
)
def test_bad_settings_from_flags_or_environment_exit_2_naming_them(
    args: list[str], env: dict[str, str], named: str
) -> None:
    proc = JetspoolProcess(args, env={"JETSPOOL_CONFIG": "", **env})
    code = proc.wait(30)

    assert code == 2
    assert named in proc.output
    assert "Traceback" not in proc.output


@pytest.mark.parametrize("part", ["gateway", "worker"])
def test_sigterm_stops_a_running_part_with_exit_code_0(part: str, nats_server: EmbeddedNats) -> None:
    """Exit code 0 is a stop on request (README). The gateway ended killed by the signal instead
    (-15): uvicorn raises a stop signal again once it has shut down. Found by a chaos run."""
    port = free_port()
    args = [part, "--nats-url", nats_server.url] + (["--port", str(port)] if part == "gateway" else [])
    proc = JetspoolProcess(args, env={"JETSPOOL_CONFIG": "", ACCEPT_SINGLE_REPLICA: "true", **FAST_STOP})
    try:
        if part == "gateway":
            asyncio.run(wait_until_ready(f"http://127.0.0.1:{port}", timeout_s=30))
        proc.wait_for_text(f"{part} ready", 30)  # a gateway logged nothing at all (found by an audit)
        code = proc.terminate(30)
    finally:
        proc.kill_tree()

    assert code == 0, proc.output
    assert "Traceback" not in proc.output
    assert f"{part} stopping" in proc.output


async def test_a_stopping_gateway_ends_its_status_streams_and_answers_its_long_polls(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Found by a rolling-restart audit: the streams stayed open until uvicorn's graceful timeout
    (5 s), which then cut them (a broken chunked body) and answered the long polls 500, with a
    traceback each. A stream that ends can be resumed, with `Last-Event-ID`, on another gateway."""
    config = tmp_path / "jetspool.yaml"  # no worker: the request waits
    functions = "functions:\n  - name: echo\n    url: http://127.0.0.1:9/echo\n"
    config.write_text(f"gateway:\n  max_streams: 2\n{functions}", encoding="utf-8")
    port = free_port()
    proc = start_part("gateway", config, nats_server.url, port)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_until_ready(url, timeout_s=30)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            request_id = (await client.post("/async-function/echo", content=b"waits")).headers["x-call-id"]
            prefix = f"/queue/echo/requests/{request_id}"
            long_poll = asyncio.create_task(client.get(prefix, params={"wait": "30"}))
            async with client.stream("GET", f"{prefix}/status/stream") as stream:
                lines = stream.aiter_lines()
                first = await anext(lines)

                async def both_open() -> bool:  # a third wait is refused: the gateway holds two
                    return (await client.get(prefix, params={"wait": "0.05"})).status_code == 503

                await eventually_true(both_open)
                proc.process.send_signal(signal.SIGTERM)
                rest = [line async for line in lines]  # to the end, not broken
            answered = await long_poll
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        proc.kill_tree()

    assert first.startswith(("data: ", "id: "))
    assert "COMPLETED" not in "".join(rest)
    assert answered.status_code == 400
    assert answered.json()["status"] == "IN_QUEUE"
    assert code == 0
    assert "Traceback" not in proc.output
    assert "timeout graceful shutdown exceeded" not in proc.output


@pytest.mark.parametrize("part", ["gateway", "worker"])
def test_sigterm_stops_a_part_still_waiting_for_nats(part: str) -> None:
    """Start-up waits for an unreachable NATS server as long as it takes; a stop signal ends that
    wait (it used to be ignored until SIGKILL; found by a SPEC probe)."""
    args = [part, "--nats-url", f"nats://127.0.0.1:{free_port()}"] + (
        ["--port", str(free_port())] if part == "gateway" else []
    )
    env = {"JETSPOOL_CONFIG": "", "JETSPOOL_NATS__ACCEPT_SINGLE_REPLICA": "true"}
    code, proc = stopped_while_waiting_for_nats(args, env)

    assert code == 0
    assert "Traceback" not in proc.output


def test_a_gateway_config_error_found_at_start_up_exits_2_without_a_traceback() -> None:
    """Found where NATS is opened: uvicorn's own failed start-up used to make it exit 3 with a traceback."""
    proc = JetspoolProcess(["gateway", "--nats-url", "nats://127.0.0.1:1", "--port", str(free_port())])
    code = proc.wait(30)

    assert code == 2
    assert "nats.accept_single_replica" in proc.output
    assert "Traceback" not in proc.output


def test_a_gateway_whose_tls_key_is_not_its_certificates_exits_2_naming_them(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = self_signed(other)
    env = {"JETSPOOL_GATEWAY__TLS_CERT": str(cert), "JETSPOOL_GATEWAY__TLS_KEY": str(other_key)}
    proc = JetspoolProcess(["gateway", "--nats-url", "nats://127.0.0.1:1", "--port", str(free_port())], env=env)
    code = proc.wait(30)

    assert code == 2
    assert "gateway.tls_cert, gateway.tls_key: cannot use" in proc.output
    assert "Traceback" not in proc.output


def test_a_second_up_on_a_data_dir_in_use_is_refused_and_the_first_keeps_serving(up: Up, tmp_path: Path) -> None:
    """It started a second nats-server on the same store: requests the first had acknowledged were
    lost to the corruption (found by a CLI audit)."""
    second = JetspoolProcess(["up", "--port", str(free_port()), "--data-dir", str(tmp_path / "data")], env=FAST_STOP)
    code = second.wait(60)

    assert code == 2
    assert f"data dir {(tmp_path / 'data').resolve()} is in use by another nats-server" in second.output
    assert "jetspool is up" not in second.output
    assert "Traceback" not in second.output
    with httpx.Client(base_url=up.url) as client:
        request_id = client.post("/queue/echo", json={"after": "refusal"}).json()["request_id"]
        assert _wait_completed(client, "echo", request_id)["status"] == "COMPLETED"


@pytest.mark.parametrize("kind", ["a file", "under /proc"])
def test_a_data_dir_that_cannot_be_made_exits_2_naming_it(tmp_path: Path, kind: str) -> None:
    data_dir = tmp_path / "taken.txt" if kind == "a file" else Path("/proc/no-such-process/data")
    if kind == "a file":
        data_dir.write_text("not a directory\n", encoding="utf-8")
    proc = JetspoolProcess(["up", "--port", str(free_port()), "--data-dir", str(data_dir)], env=FAST_STOP)
    code = proc.wait(30)

    assert code == 2
    assert f"data dir {data_dir}: cannot create it" in proc.output
    assert "Traceback" not in proc.output


def test_a_data_dir_that_takes_no_files_exits_2_naming_it() -> None:
    """`/proc/self` exists but no file can be made in it: a traceback and exit 1 (found by a CLI audit)."""
    proc = JetspoolProcess(["up", "--port", str(free_port()), "--data-dir", "/proc/self"], env=FAST_STOP)
    code = proc.wait(30)

    assert code == 2
    assert re.search(r"data dir /proc/\d+: cannot write to it", proc.output), proc.output  # resolved
    assert "Traceback" not in proc.output


@pytest.mark.parametrize(
    "args",
    [
        ["up", "--data-dir", ""],
        ["up", "--config", " "],
        ["worker", "--nats-url", ""],
        ["gateway", "--host", ""],
        ["status", "echo", "00000000-0000-0000-0000-000000000000", "--url", ""],
    ],
)
def test_an_empty_option_exits_2_naming_it(args: list[str]) -> None:
    """`--data-dir ''` put the data in the working directory, `--url ''` and `--config ''` fell
    back to the defaults (found by a CLI audit)."""
    proc = JetspoolProcess(args, env=FAST_STOP)
    code = proc.wait(30)

    assert code == 2
    assert f"argument {args[-2]}: must not be empty" in proc.output


def test_up_refuses_an_absent_nats_tls_file_before_it_makes_anything(tmp_path: Path) -> None:
    """The data dir was made and nats-server started before the worker refused it (found by a CLI audit)."""
    data_dir = tmp_path / "data"
    env = {**FAST_STOP, "JETSPOOL_NATS__TLS_CA": str(tmp_path / "absent-ca.pem")}
    proc = JetspoolProcess(["up", "--port", str(free_port()), "--data-dir", str(data_dir)], env=env)
    code = proc.wait(30)

    assert code == 2
    assert "nats.tls_ca: cannot use" in proc.output
    assert not data_dir.exists()


@pytest.mark.parametrize("part", ["gateway", "worker", "up"])
def test_a_config_file_that_is_not_utf8_exits_2_naming_it(tmp_path: Path, part: str) -> None:
    """The client commands said so; the servers ended in a traceback with exit 1 (found by a CLI audit)."""
    config = tmp_path / "binary.yaml"
    config.write_bytes(b"\xff\xfe\x00nats: {}\n")
    proc = JetspoolProcess([part, "--config", str(config)], env=FAST_STOP)
    code = proc.wait(30)

    assert code == 2
    assert f"config file {config}: not UTF-8 text" in proc.output
    assert "Traceback" not in proc.output


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path) -> None:
    """Before, the readiness check took the other server's answer for ours and announced the stack."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = JetspoolProcess(["up", "--port", str(port), "--data-dir", str(tmp_path / "data")], env=FAST_STOP)
        code = proc.wait(30)

    assert code == 2
    assert "gateway.port" in proc.output
    assert "jetspool is up" not in proc.output
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_gateway_refuses_a_taken_port_with_a_message(nats_server: EmbeddedNats) -> None:
    """Found by a SPEC probe: uvicorn's failed bind made it exit 3 ("not found") with a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"JETSPOOL_NATS__ACCEPT_SINGLE_REPLICA": "true"}
        proc = JetspoolProcess(["gateway", "--nats-url", nats_server.url, "--port", str(port)], env=env)
        code = proc.wait(30)

    assert code == 2
    assert f"gateway.port: cannot listen on 127.0.0.1:{port}" in proc.output
    assert "Traceback" not in proc.output


def test_up_refuses_settings_a_worker_would_refuse_before_starting_anything(tmp_path: Path) -> None:
    """The --port flag wins over the environment for up and its gateway, but a worker reads the
    environment alone: it used to fail after NATS and the gateway had started."""
    env = {**FAST_STOP, "JETSPOOL_GATEWAY__PORT": "eighty"}
    proc = JetspoolProcess(["up", "--port", str(free_port()), "--data-dir", str(tmp_path / "data")], env=env)
    code = proc.wait(30)

    assert code == 2
    assert "gateway.port" in proc.output
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_up_stopped_before_its_gateway_is_ready_announces_nothing(tmp_path: Path) -> None:
    env = {**FAST_STOP, "JETSPOOL_NATS__ACCEPT_SINGLE_REPLICA": "true"}
    args = ["up", "--nats-url", f"nats://127.0.0.1:{free_port()}", "--port", str(free_port())]
    proc = JetspoolProcess([*args, "--data-dir", str(tmp_path / "data")], env=env)
    try:
        proc.wait_for_text("Connection refused", 60)  # its children wait for NATS
        tree = descendants(proc.process.pid)
        code = proc.terminate(30)
    finally:
        proc.kill_tree()

    assert code == 0
    assert "jetspool is up" not in proc.output
    assert [pid for pid in tree if alive(pid)] == []


@pytest.mark.timeout(120)
def test_up_serves_https_when_tls_is_configured(tmp_path: Path) -> None:
    """The readiness check asked http:// and `up` gave up after 60 s (found by a SPEC probe)."""
    cert, key = self_signed(tmp_path)
    config = tmp_path / "tls.yaml"
    config.write_text(f"gateway:\n  tls_cert: {cert}\n  tls_key: {key}\n", encoding="utf-8")
    port = free_port()
    proc = JetspoolProcess(
        ["up", "--config", str(config), "--port", str(port), "--data-dir", str(tmp_path / "data")], env=FAST_STOP
    )
    try:
        announced = proc.wait_for_line("jetspool is up:")
        trusted = ssl.create_default_context(cafile=str(cert))
        healthy = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trusted, timeout=10)
        code = proc.terminate(30)
    finally:
        proc.kill_tree()

    assert announced.strip() == f"jetspool is up: https://127.0.0.1:{port}"
    assert healthy.status_code == 200
    assert code == 0


@pytest.mark.timeout(120)
def test_up_guards_its_nats_with_the_configured_password_and_shows_it_nowhere(tmp_path: Path) -> None:
    """The embedded server took anyone on the machine, whatever `nats.user` and `nats.password`
    said; a password in `nats.url` was on every part's command line and on the screen; and a
    `queue.py` in the working directory was imported by the parts (found by an outside audit)."""
    config = tmp_path / "guarded.yaml"
    # beyond ASCII, a quote and a backslash: JSON's escapes stopped nats-server (found by a review)
    config.write_text("nats:\n  user: jets\n  password: 's3cret-pw-ä\"q\\b'\n", encoding="utf-8")
    (tmp_path / "queue.py").write_text("raise SystemExit('the working directory was imported')\n", encoding="utf-8")
    up = Up(tmp_path / "data", free_port(), "--config", str(config))
    try:
        nats_url = up.proc.wait_for_line("  nats:").split()[1]
        command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in descendants(up.proc.process.pid)]
        anonymous = _answer_to_connect(nats_url, {})
        with_password = _answer_to_connect(nats_url, {"user": "jets", "pass": 's3cret-pw-ä"q\\b'})
        with httpx.Client(base_url=up.url, timeout=30) as client:
            request_id = client.post("/async-function/echo", content=b"hi").headers["x-call-id"]
            completed = _wait_completed(client, "echo", request_id)
        server_config = (tmp_path / "data" / "nats-server.conf").stat().st_mode & 0o777
    finally:
        up.proc.kill_tree()

    assert "authorization violation" in anonymous.lower()
    assert with_password == "PONG"
    assert "error_type" not in completed
    assert "s3cret-pw" not in up.proc.output
    assert all(b"s3cret-pw" not in line for line in command_lines)
    assert server_config == 0o600


def _answer_to_connect(url: str, connect: dict[str, object]) -> str:
    """What a NATS server at `url` answers a CONNECT with `connect` and a PING: PONG, or its -ERR."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock, sock.makefile("rwb") as wire:
        assert wire.readline().startswith(b"INFO ")
        wire.write(b"CONNECT " + orjson.dumps({"verbose": False, **connect}) + b"\r\nPING\r\n")
        wire.flush()
        return wire.readline().decode().strip()


@pytest.mark.timeout(120)
def test_a_password_in_the_nats_url_stays_off_the_command_lines_and_the_screen(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", extra_config='authorization {\n  user: jets\n  password: "s3cret-pw"\n}\n')
    server.start()
    guarded_url = server.url.replace("nats://", "nats://jets:s3cret-pw@")
    port = free_port()
    args = ["up", "--nats-url", guarded_url, "--port", str(port), "--data-dir", str(tmp_path / "data")]
    proc = JetspoolProcess(args, env={**FAST_STOP, ACCEPT_SINGLE_REPLICA: "true"})
    try:
        shown = proc.wait_for_line("  nats:")
        command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in descendants(proc.process.pid)]
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        code = proc.terminate(30)
    finally:
        proc.kill_tree()
        server.stop()

    assert shown.split()[1] == server.url.replace("nats://", "nats://***@")
    assert ready.status_code == 200
    assert code == 0
    assert len(command_lines) >= 2, "a gateway and a worker"
    assert all(b"s3cret-pw" not in line for line in command_lines)


def test_a_password_the_embedded_server_cannot_take_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"nats.password: control characters"):
        _authorization(NatsSettings(user="jets", password="a\x01b"))
    with pytest.raises(ConfigError, match=r"nats.password: .*bcrypt"):  # nats-server's own reading (a review)
        _authorization(NatsSettings(user="jets", password="$2a$10$abcdefghijklmnopqrstuv"))
