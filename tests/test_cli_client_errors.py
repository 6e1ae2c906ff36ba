"""The client commands of the CLI when things are not as they should be: log lines for people,
answers no jetspool gateway sends, a bad URL, a missing config file, a negative timeout. Each
ends as one line on stderr and the exit code SPEC §8 gives it, never a traceback."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
import pytest

from tests.support.servers import AsgiServer, RecordingApp, Reply, eventually_true

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.support.stack import Stack

REQUEST_ID = "00000000-0001-8d9c-93eb-94fad0e24a22"
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 5


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def _env(url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETSPOOL_")}
    return env | ({"JETSPOOL_URL": url} if url else {}) | extra


async def _jetspool(*args: str, url: str | None, **env: str) -> Ran:
    """Run `jetspool ARGS` (JETSPOOL_URL=`url`) while the test's event loop serves what it talks to."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetspool", *args,
        env=_env(url, **env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def _one_error_line(ran: Ran) -> str:
    assert "Traceback" not in ran.err, ran.err
    assert ran.err.count("\n") == 1, f"one line on stderr: {ran.err!r}"
    return ran.err


# --- status --logs --------------------------------------------------------------------------


async def _held_request(stack: Stack) -> tuple[str, str]:
    """Submit one request to `echo` and hold its call: (request id, its X-Logs-Url)."""
    await stack.register("echo")
    stack.functions.hold("/echo")
    submitted = await stack.client.post("/queue/echo", json={})
    [seen] = await stack.functions.wait_for("/echo")
    return submitted.json()["request_id"], seen.header("x-logs-url") or ""


async def test_status_logs_prints_each_log_line_below_the_status_line(stack: Stack) -> None:
    request_id, logs_url = await _held_request(stack)
    line = {"message": "two\nlines \x1b[31mred", "level": "WARN"}
    assert (await stack.client.post(logs_url, json=line)).status_code == 202
    stack.functions.release("/echo")

    async def logged_completion() -> bool:
        response = await stack.client.get(f"/queue/echo/requests/{request_id}/status", params={"logs": "1"})
        return len(response.json()["logs"]) == 3  # started, the function's, completed

    await eventually_true(logged_completion)
    await stack.wait_for_status("echo", request_id)

    shown = await _jetspool("status", "echo", request_id, "--logs", url=stack.url)
    plain = await _jetspool("status", "echo", request_id, url=stack.url)

    assert shown.code == 0, shown.err
    status_line, *log_lines = shown.out.splitlines()
    assert status_line == f"{request_id} COMPLETED (attempts 1)"
    assert len(log_lines) == 3, shown.out
    assert log_lines[0].split()[1:] == ["INFO", "attempt", "1", "of", "10", "started"]
    assert log_lines[0].split()[0].startswith("20"), "a timestamp first"
    assert log_lines[1].split()[1:] == ["WARN", "two\\nlines", "\\x1b[31mred"], "line breaks and escapes shown, not run"
    assert log_lines[2].split()[1] == "INFO"
    assert plain.out.splitlines() == [status_line], "no log lines without --logs"


async def test_status_watch_logs_prints_each_log_line_once(stack: Stack) -> None:
    request_id, logs_url = await _held_request(stack)
    assert (await stack.client.post(logs_url, json={"message": "first"})).status_code == 202
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetspool", "status", "echo", request_id, "--watch", "--logs",
        env=_env(stack.url, PYTHONUNBUFFERED="1"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    out: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any(" first" in line for line in out):
                out.append((await process.stdout.readline()).decode())
            assert (await stack.client.post(logs_url, json={"message": "second"})).status_code == 202
            while not any(" second" in line for line in out):
                out.append((await process.stdout.readline()).decode())
            stack.functions.release("/echo")
            out += (await process.stdout.read()).decode().splitlines(keepends=True)
            err = await process.stderr.read()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0, err
    logged = [line.split(maxsplit=2)[2].strip() for line in out if line.startswith("  ")]
    assert logged[:3] == ["attempt 1 of 10 started", "first", "second"]
    assert logged[3:] == ["completed, succeeded"], "the worker's last line comes before COMPLETED"
    statuses = [line.split()[1] for line in out if not line.startswith("  ")]
    assert statuses[0] == "IN_PROGRESS"
    assert statuses[-1] == "COMPLETED"


# --- answers no jetspool gateway sends --------------------------------------------------------


@pytest.fixture
async def stranger() -> AsyncIterator[tuple[RecordingApp, AsgiServer]]:
    """Some other HTTP server, answering by script."""
    app = RecordingApp()
    server = AsgiServer(app)
    await server.start()
    yield app, server
    await server.stop()


_SSE = "text/event-stream"
_QUEUE = "/queue/fn"
_REQUEST = f"/queue/fn/requests/{REQUEST_ID}"


@pytest.mark.parametrize(
    ("args", "path", "reply", "code"),
    [
        (["submit", "fn"], _QUEUE, Reply(200, b'{"ok": true}'), EXIT_USAGE),
        (["submit", "fn"], _QUEUE, Reply(200, b"<html>hello</html>", "text/html"), EXIT_USAGE),
        (["submit", "fn"], _QUEUE, Reply(500, b"Internal\nServer Error", "text/plain"), EXIT_USAGE),
        (["submit", "fn"], _QUEUE, Reply(404, b"<h1>Not Found</h1>", "text/html"), EXIT_USAGE),
        (["submit", "fn"], _QUEUE, Reply(502, b"<h1>Bad Gateway</h1>", "text/html"), EXIT_UNREACHABLE),
        (["submit", "fn", "--wait"], _QUEUE, Reply(200, b'{"request_id": 7}'), EXIT_USAGE),
        (["status", "fn", REQUEST_ID], f"{_REQUEST}/status", Reply(200, b"[1, 2]"), EXIT_USAGE),
        (["status", "fn", REQUEST_ID, "--watch"], f"{_REQUEST}/status/stream", Reply(200), EXIT_USAGE),
        (["status", "fn", REQUEST_ID, "--watch"], f"{_REQUEST}/status/stream", Reply(404, b"no", "text/plain"),
         EXIT_USAGE),
        (["status", "fn", REQUEST_ID, "--watch"], f"{_REQUEST}/status/stream", Reply(200, b'data: {"a": 1}\n\n', _SSE),
         EXIT_USAGE),
        (["result", "fn", REQUEST_ID], _REQUEST, Reply(500, b"oops", "text/plain"), EXIT_USAGE),
        # another server's page was printed as the result, exit 0 (found by an outside audit)
        (["result", "fn", REQUEST_ID], _REQUEST, Reply(200, b"<html>oops</html>", "text/html"), EXIT_USAGE),
        (["result", "fn", REQUEST_ID], _REQUEST, Reply(404, b'{"detail": "Not Found"}'), EXIT_USAGE),
        (["cancel", "fn", REQUEST_ID], f"{_REQUEST}/cancel", Reply(400, b"bad", "text/plain"), EXIT_USAGE),
        (["cancel", "fn", REQUEST_ID], f"{_REQUEST}/cancel", Reply(200, b"sure", "text/plain"), EXIT_USAGE),
        (["functions", "list"], "/system/functions", Reply(200, b'{"functions": []}'), EXIT_USAGE),
    ],
)  # fmt: skip
async def test_an_answer_no_jetspool_gateway_sends_is_one_line_naming_url_and_status(
    stranger: tuple[RecordingApp, AsgiServer], args: list[str], path: str, reply: Reply, code: int
) -> None:
    app, server = stranger
    app.script(path, [reply])

    ran = await _jetspool(*args, url=server.url)

    assert app.on(path), "the command asked the server"
    assert ran.code == code, ran.err
    error = _one_error_line(ran)
    assert f"{server.url}{path}" in error
    assert f"HTTP {reply.status}" in error
    assert ran.out == ""


async def test_an_unexpected_answer_is_a_json_error_with_json(stranger: tuple[RecordingApp, AsgiServer]) -> None:
    app, server = stranger
    app.script(_QUEUE, [Reply(200, b'{"ok": true}')])

    ran = await _jetspool("submit", "fn", "--json", url=server.url)

    assert ran.code == EXIT_USAGE
    assert "HTTP 200" in orjson.loads(ran.out)["error"]


async def test_status_watch_of_an_unknown_request_exits_3(stack: Stack) -> None:
    await stack.register("echo")

    ran = await _jetspool("status", "echo", REQUEST_ID, "--watch", url=stack.url)

    assert ran.code == EXIT_NOT_FOUND
    assert REQUEST_ID in _one_error_line(ran)


# --- usage ------------------------------------------------------------------------------------


# A query or fragment went before every route's path: the gateway's 404 was taken for an unknown
# request, exit 3 (found by a SPEC audit).
@pytest.mark.parametrize(
    "url", ["notaurl", "ftp://example.com", "http://", "http://[::1", "http://127.0.0.1:9?x=1", "http://127.0.0.1:9/#f"]
)
async def test_a_url_that_is_not_a_gateway_url_is_a_usage_error(url: str) -> None:
    flag = await _jetspool("submit", "fn", "--url", url, url=None)
    env = await _jetspool("status", "fn", REQUEST_ID, url=url)

    assert (flag.code, env.code) == (EXIT_USAGE, EXIT_USAGE)
    assert "--url" in _one_error_line(flag)
    assert "JETSPOOL_URL" in _one_error_line(env)


async def test_a_missing_or_unreadable_config_file_is_a_config_error_even_with_a_url(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    nowhere = "http://127.0.0.1:9"  # never asked: the config is read first

    with_env_url = await _jetspool("submit", "fn", "--config", missing, url=nowhere)
    with_flag_url = await _jetspool("status", "fn", REQUEST_ID, "--config", missing, "--url", nowhere, url=None)
    without_url = await _jetspool("submit", "fn", "--config", missing, url=None)
    a_directory = await _jetspool("submit", "fn", "--config", str(tmp_path), url=nowhere)
    from_env = await _jetspool("submit", "fn", url=nowhere, JETSPOOL_CONFIG=missing)

    for ran in (with_env_url, with_flag_url, without_url, a_directory, from_env):
        assert ran.code == EXIT_USAGE, ran
        assert "config file" in _one_error_line(ran)
    assert "No such file" in with_env_url.err


async def test_a_readable_config_file_goes_with_a_url_given(stack: Stack, tmp_path: Path) -> None:
    await stack.register("echo")
    config = tmp_path / "jetspool.yaml"
    config.write_text("gateway:\n  public_url: http://127.0.0.1:9\n", encoding="utf-8")

    ran = await _jetspool("submit", "echo", "--config", str(config), "--json", url=stack.url)

    assert ran.code == 0, ran.err
    assert "request_id" in orjson.loads(ran.out)


@pytest.mark.parametrize("seconds", ["-1", "-0.5", "nan", "inf", "soon"])
async def test_submit_timeout_must_be_zero_or_more_seconds(seconds: str) -> None:
    ran = await _jetspool("submit", "fn", "--wait", "--timeout", seconds, url="http://127.0.0.1:9")

    assert ran.code == EXIT_USAGE
    assert "--timeout" in ran.err
    assert "Traceback" not in ran.err


async def test_submit_help_says_timeout_goes_with_wait() -> None:
    ran = await _jetspool("submit", "--help", url=None)

    assert ran.code == 0
    assert "with --wait: give up after S seconds" in " ".join(ran.out.split())


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "../system/functions", "--data", '{"name": "evil", "url": "http://127.0.0.1:1"}'],
        ["submit", "codes/sub"],
        ["submit", "echo", "--path", "/../codes"],
        ["submit", "echo", "--path", "a/..\\..;x/admin?k=v"],
        ["functions", "rm", "aaa/../bbb"],
        ["status", "a/../b", REQUEST_ID],
        ["cancel", "Echo", REQUEST_ID],
    ],
)
async def test_a_name_or_path_that_would_leave_its_route_is_refused_before_anything_is_sent(
    stranger: tuple[RecordingApp, AsgiServer], args: list[str]
) -> None:
    """The HTTP client resolved `..` before sending: `submit ../system/functions` registered a
    function on an open gateway, `functions rm aaa/../bbb` removed bbb, and `--path /../codes` ran
    the request on another function (found by a CLI audit)."""
    app, server = stranger

    ran = await _jetspool(*args, url=server.url)

    assert ran.code == EXIT_USAGE, ran.err
    assert "name" in _one_error_line(ran) or "segment" in ran.err
    assert app.seen == [], "nothing reached the gateway"


@pytest.mark.parametrize("command", ["status", "result", "cancel"])
async def test_a_request_id_that_is_not_a_uuid_is_refused_before_anything_is_sent(
    stranger: tuple[RecordingApp, AsgiServer], command: str
) -> None:
    """An id with `/` and `..` reached other routes the same way (found by a CLI audit)."""
    app, server = stranger

    ran = await _jetspool(command, "echo", "../../../system/functions/echo", url=server.url)

    assert ran.code == EXIT_USAGE, ran.err
    assert "malformed request id" in _one_error_line(ran)
    assert app.seen == []


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("functions: [\n", "not YAML"),
        ("", "no functions"),
        ("just a string\n", "no functions"),
        ("- echo\n- other\n", "not a mapping with a name"),
        ("gateway:\n  port: 1\n", "not a mapping with a name"),
        ("functions: []\n", "no functions"),
        # checked before any is sent: the good ones before a bad one were registered (a CLI audit)
        ("- {name: ok2, url: 'http://127.0.0.1:9'}\n- {name: Bad, url: 'http://127.0.0.1:9'}\n", "function 2 ('Bad')"),
        ("- {name: ok2, url: 'http://127.0.0.1:9'}\n- {name: ok3, url: 'ftp://x'}\n", "url: must be an absolute"),
    ],
)
async def test_functions_deploy_of_a_file_without_function_entries_exits_2(
    stranger: tuple[RecordingApp, AsgiServer], tmp_path: Path, content: str, why: str
) -> None:
    """A malformed, empty or wrongly shaped file stopped the command with a traceback and exit 1."""
    app, server = stranger
    spec = tmp_path / "functions.yaml"
    spec.write_text(content, encoding="utf-8")

    ran = await _jetspool("functions", "deploy", str(spec), url=server.url)

    assert ran.code == EXIT_USAGE
    assert why in _one_error_line(ran)
    assert str(spec) in ran.err
    assert app.seen == []
