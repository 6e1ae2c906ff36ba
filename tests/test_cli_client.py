"""The client commands of the CLI as a subprocess against a real stack: output for people and
for scripts (--json), every documented exit code, and the live status line on a terminal."""

from __future__ import annotations

import asyncio
import base64
import os
import pty
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from tests.support.servers import Reply, eventually_true, free_port
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from pathlib import Path

    from jetspool.embedded import EmbeddedNats
    from tests.support.stack import Stack


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


async def _jetspool(stack: Stack, *args: str, url: str | None = None) -> Ran:
    """Run `jetspool ARGS` while the test's event loop keeps serving the stack."""
    env = {**os.environ, "JETSPOOL_URL": url or stack.url, "JETSPOOL_CONFIG": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetspool", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def test_submit_reads_the_body_from_standard_input_with_data_at_dash(stack: Stack) -> None:
    """As `faas-cli invoke` reads it; `@-` was taken for a file named `-` (found by a CLI audit)."""
    await stack.register("echo")
    env = {**os.environ, "JETSPOOL_URL": stack.url, "JETSPOOL_CONFIG": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetspool", "submit", "echo", "--data", "@-", "--wait", env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(b"from stdin \x00\xff"), 60)

    assert process.returncode == 0, err.decode()
    assert out == b"from stdin \x00\xff", "the answer as it came, byte for byte (no terminal: no line break added)"
    assert [seen.body for seen in stack.functions.on("/echo")] == [b"from stdin \x00\xff"]


async def test_result_writes_a_binary_answer_byte_for_byte_and_json_keeps_it(stack: Stack) -> None:
    """`jetspool result f ID > out.png` added a line break to the file, and `--json` gave the bytes
    as text with replacement characters, past recovery, without the content type (found by an
    outside audit)."""
    await stack.register("echo")
    body = bytes(range(256)) * 4  # not UTF-8, no line break at the end
    request_id = (await stack.client.post("/queue/echo", content=body, headers={"Content-Type": "image/png"})).json()[
        "request_id"
    ]
    await stack.wait_for_status("echo", request_id)
    env = {**os.environ, "JETSPOOL_URL": stack.url, "JETSPOOL_CONFIG": ""}

    async def result(*flags: str) -> bytes:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jetspool", "result", "echo", request_id, *flags,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        return out

    raw, as_json = await result(), orjson.loads(await result("--json"))

    assert raw == body
    assert base64.b64decode(as_json.pop("result_base64")) == body
    assert as_json == {"request_id": request_id, "status_code": 200, "content_type": "image/png", "result": None}


async def test_submit_status_result_and_cancel(stack: Stack) -> None:
    await stack.register("echo")

    waited = await _jetspool(stack, "submit", "echo", "--data", '{"n": 1}', "--wait")
    queued = await _jetspool(stack, "submit", "echo", "--data", "[1]", "--json")
    request_id = orjson.loads(queued.out)["request_id"]
    await stack.wait_for_status("echo", request_id)
    status = await _jetspool(stack, "status", "echo", request_id)
    status_json = await _jetspool(stack, "status", "echo", request_id, "--json", "--logs")
    watched = await _jetspool(stack, "status", "echo", request_id, "--watch", "--json")
    result = await _jetspool(stack, "result", "echo", request_id)
    result_json = await _jetspool(stack, "result", "echo", request_id, "--json")
    cancel_done = await _jetspool(stack, "cancel", "echo", request_id)

    assert (waited.code, waited.out) == (0, '{"n": 1}')
    assert "COMPLETED" in waited.err, "progress goes to stderr"
    assert queued.code == 0
    assert (status.code, status.out.strip()) == (0, f"{request_id} COMPLETED (attempts 1)")
    assert orjson.loads(status_json.out)["logs"] is not None
    assert orjson.loads(watched.out.splitlines()[-1])["status"] == "COMPLETED"
    assert (result.code, result.out) == (0, "[1]")
    shown = {"request_id": request_id, "status_code": 200, "content_type": "application/json", "result": [1]}
    assert orjson.loads(result_json.out) == shown
    assert (cancel_done.code, cancel_done.out.strip()) == (1, "ALREADY_COMPLETED")


async def test_exit_codes_scripts_can_rely_on(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(500, b"boom"), Reply(422, b'{"error": "bad prompt"}')])
    await stack.occupy("busy")

    failed = await _jetspool(stack, "submit", "echo", "--data", "{}", "--wait", "--json")
    failed_id = orjson.loads(failed.out)["request_id"]
    failed_status = await _jetspool(stack, "status", "echo", failed_id)
    failed_watched = await _jetspool(stack, "status", "echo", failed_id, "--watch")
    failed_result = await _jetspool(stack, "result", "echo", failed_id)
    refused = await _jetspool(stack, "submit", "echo", "--data", "{}", "--wait")
    refused_id = refused.err.split("request ")[1].split()[0]
    refused_json = await _jetspool(stack, "result", "echo", refused_id, "--json")
    unknown = await _jetspool(stack, "submit", "nope", "--wait")
    gave_up = await _jetspool(stack, "submit", "busy", "--data", "{}", "--wait", "--timeout", "0.5")
    waiting_id = gave_up.err.split("request ")[1].split()[0]
    not_yet = await _jetspool(stack, "result", "busy", waiting_id)
    cancelled = await _jetspool(stack, "cancel", "busy", waiting_id)
    cancelled_result = await _jetspool(stack, "result", "busy", waiting_id)
    bad_data = await _jetspool(stack, "submit", "echo", "--data", "not json")
    bad_usage = await _jetspool(stack, "submit")
    timeout_alone = await _jetspool(stack, "submit", "echo", "--data", "{}", "--timeout", "5")  # was ignored
    unreachable_url = f"http://127.0.0.1:{free_port()}"
    unreachable = await _jetspool(stack, "submit", "echo", url=unreachable_url)
    unreachable_watch = await _jetspool(stack, "status", "echo", failed_id, "--watch", url=unreachable_url)
    stack.functions.release("/busy")

    assert failed.code == 1
    assert orjson.loads(failed.out)["error_type"] == "function_error"
    assert (failed_status.code, failed_watched.code) == (1, 1), "status shows it completed with an error"
    assert "function_error" in failed_status.out
    assert (failed_result.code, failed_result.out) == (1, "boom"), "the function's answer is shown"
    assert "failed (function_error): the function answered 500" in failed_result.err
    assert (refused.code, refused.out) == (1, '{"error": "bad prompt"}')
    assert "failed (function_error): the function answered 422" in refused.err
    assert orjson.loads(refused_json.out) == {
        "request_id": refused_id,
        "error_type": "function_error",
        "detail": "the function answered 422",
        "status_code": 422,
        "content_type": "application/json",
        "result": {"error": "bad prompt"},
    }
    assert unknown.code == 3
    assert "nope" in unknown.err
    assert gave_up.code == 4
    assert (cancelled.code, cancelled.out.strip()) == (0, "CANCELLATION_REQUESTED")
    assert cancelled_result.code == 1
    assert "cancelled" in cancelled_result.err
    assert (not_yet.code, not_yet.out) == (4, "")
    assert "has not completed yet" in not_yet.err, "it said: did not complete within 0 s"
    assert (bad_data.code, bad_usage.code, timeout_alone.code) == (2, 2, 2)
    assert "--wait" in timeout_alone.err
    assert "--data is not JSON" in bad_data.err
    assert unreachable.code == 5
    assert "cannot reach the gateway" in unreachable.err
    assert unreachable_watch.code == 5
    assert "cannot reach the gateway" in unreachable_watch.err, "at once, not after resume pauses (16 s)"


async def test_functions_list_deploy_and_rm(stack: Stack, tmp_path: Path) -> None:
    spec = tmp_path / "functions.yaml"
    spec.write_text(
        f"functions:\n  - name: resize\n    url: {stack.function_url('/resize')}\n    concurrency: 2\n"
        f"  - name: tag\n    url: {stack.function_url('/tag')}\n",
        encoding="utf-8",
    )

    deployed = await _jetspool(stack, "functions", "deploy", str(spec))
    stack.functions.script("/tag", [Reply(500, b"no")])
    await stack.wait_for_status("tag", await stack.submit("tag"))

    async def counted() -> bool:  # the counter is written after the status
        return bool((await stack.client.get("/system/functions/tag")).json()["stats"]["failed"] == 1)

    await eventually_true(counted)
    listed = await _jetspool(stack, "functions", "list")
    listed_json = await _jetspool(stack, "functions", "list", "--json")
    removed = await _jetspool(stack, "functions", "rm", "tag")
    missing = await _jetspool(stack, "functions", "rm", "tag")
    after = await _jetspool(stack, "functions", "list", "--json")

    assert (deployed.code, deployed.out.split()) == (0, ["deployed", "resize", "deployed", "tag"])
    assert listed.out.splitlines()[0].startswith("resize\t")
    assert listed.out.splitlines()[1].endswith("\twaiting 0 · running 0 · done 0 · failed 1"), listed.out
    assert {f["name"]: f["concurrency"] for f in orjson.loads(listed_json.out)} == {"resize": 2, "tag": 8}
    assert (removed.code, missing.code) == (0, 3)
    assert [f["name"] for f in orjson.loads(after.out)] == ["resize"]


async def test_submit_wait_shows_a_live_status_line_on_a_terminal(stack: Stack) -> None:
    await stack.occupy("busy")
    main, terminal = pty.openpty()
    env = {**os.environ, "JETSPOOL_URL": stack.url, "JETSPOOL_CONFIG": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetspool", "submit", "busy", "--data", "{}", "--wait",
        env=env, stdout=terminal, stderr=terminal,
    )  # fmt: skip
    os.close(terminal)
    seen = b""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            while b"IN_QUEUE \xc2\xb7 position 0" not in seen:
                seen += await loop.run_in_executor(None, os.read, main, 4096)
            stack.functions.release("/busy", 2)
            while b"COMPLETED" not in seen:
                seen += await loop.run_in_executor(None, os.read, main, 4096)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(main)

    assert process.returncode == 0
    assert b"\r\x1b[2KIN_QUEUE \xc2\xb7 position 0" in seen, "the line is rewritten in place"
    assert b"\r\x1b[2KCOMPLETED" in seen


async def test_submit_wait_gives_up_at_its_timeout_while_the_stream_keeps_alive(nats_server: EmbeddedNats) -> None:
    """The status stream's keep-alive comments (here every 0.1 s, 15 s by default) restarted a
    limit on each read: `--wait --timeout 20` gave up after 58 s, when the request moved (found by
    a CLI audit). Now the deadline is the command's own."""
    stack = await start_stack(nats_server, overrides={"gateway": {"sse_ping_interval": 0.1}})
    try:
        await stack.occupy("busy")
        started = time.monotonic()
        gave_up = await _jetspool(stack, "submit", "busy", "--data", "{}", "--wait", "--timeout", "1.5")
        took = time.monotonic() - started
        stack.functions.release("/busy", 2)
    finally:
        await stack.close()

    assert gave_up.code == 4
    assert "did not complete in time" in gave_up.err
    assert took < 30, "it gave up at its deadline, not when the request moved"


async def test_ctrl_c_on_a_waiting_command_is_not_success(stack: Stack) -> None:
    """`submit --wait && next-step` went on to the next step: Ctrl-C exited 0 (found by a CLI audit).
    It exits 4, as a command that gave up waiting."""
    await stack.occupy("busy")
    env = {**os.environ, "JETSPOOL_URL": stack.url, "JETSPOOL_CONFIG": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetspool", "submit", "busy", "--data", "{}", "--wait",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await eventually_true(lambda: _waiting(stack), timeout_s=30)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        stack.functions.release("/busy", 2)

    assert process.returncode == 4
    assert "interrupted" in err.decode()


async def _waiting(stack: Stack) -> bool:
    stats = (await stack.client.get("/system/functions/busy")).json()["stats"]
    return bool(sum(stats["waiting"].values()) == 1)
