"""The client commands of the CLI (SPEC §8): submit, status, result, cancel, functions.

People get readable lines, scripts `--json`. Progress (status, queue position, elapsed time)
goes to stderr, updating one line in place on a terminal and as plain lines otherwise, so
stdout carries only the answer. `status --logs` prints the request's log lines, one a line
(timestamp, level, message), below its status line.

Exit codes: 0 done; 1 the request completed with an error or was cancelled (or was already
completed, for `cancel`); 2 usage, configuration or a refused call; 3 not found; 4 gave up
waiting; 5 gateway unreachable: no connection, a 5xx error from the gateway, or a 502, 503
or 504 from a proxy in front of it. An answer no jetspool gateway sends (not JSON where JSON
is due, JSON without the fields it must carry, an error without a jetspool error body: most
likely the URL names some other server) exits 2, as a configuration error: the gateway URL is
wrong, and trying again will not help. Each error is one line on stderr; for an answer, it
names the URL and the HTTP status.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import msgspec
import orjson
import yaml

from jetspool.client import (
    Client,
    Handle,
    JetspoolError,
    NotFound,
    RequestFailed,
    Result,
    Status,
    Unreachable,
    WaitTimeout,
    escaped,
)
from jetspool.domain.errors import ConfigError
from jetspool.domain.functions import Function, is_base_url
from jetspool.domain.validation import describe
from jetspool.settings import load, load_yaml

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from jetspool.settings import Settings

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_GAVE_UP: Final = 4
EXIT_UNREACHABLE: Final = 5
CLIENT_COMMANDS: Final = frozenset({"submit", "status", "result", "cancel", "functions"})


def given(value: str) -> str:
    """An option's value, which may not be empty: `--data-dir ''` put the data in the working
    directory and `--url ''` or `--config ''` fell back to the defaults (found by a CLI audit)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def add_client_commands(commands: Any) -> None:
    """Add the client commands to the CLI's subparsers."""
    submit = commands.add_parser("submit", help="queue a request (with --wait: follow it and print the result)")
    submit.add_argument("name")
    submit.add_argument("--data", help="the body: JSON text, @FILE to send a file as it is, or @- for standard input")
    submit.add_argument("--path", default="", help="sub-path below the function's URL, query too: /v1/run?mode=fast")
    submit.add_argument("--priority", choices=["high", "normal", "low"])
    submit.add_argument("--wait", action="store_true", help="follow the request and print its result")
    submit.add_argument("--timeout", type=_seconds, metavar="S", help="with --wait: give up after S seconds (exit 4)")
    _client_options(submit)

    status = commands.add_parser("status", help="show a request's status (--watch: follow it)")
    status.add_argument("name")
    status.add_argument("id")
    status.add_argument("--watch", action="store_true", help="follow the status stream until it completes")
    status.add_argument("--logs", action="store_true", help="include the request's log lines")
    _client_options(status)

    for command, text in (("result", "print a completed request's result"), ("cancel", "cancel a request")):
        parser = commands.add_parser(command, help=text)
        parser.add_argument("name")
        parser.add_argument("id")
        _client_options(parser)

    functions = commands.add_parser("functions", help="list, deploy or remove functions")
    verbs = functions.add_subparsers(dest="verb", required=True, metavar="VERB")
    _client_options(verbs.add_parser("list", help="the registered functions and their queue figures"))
    deploy = verbs.add_parser("deploy", help="create or replace the functions of a YAML or JSON file")
    deploy.add_argument("file", type=Path)
    _client_options(deploy)
    remove = verbs.add_parser("rm", help="remove a function")
    remove.add_argument("fname", metavar="NAME")
    _client_options(remove)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", type=given, help="gateway URL (or JETSPOOL_URL; default gateway.public_url of the config)"
    )
    parser.add_argument("--api-key", help="API key (or JETSPOOL_API_KEY; '' sends none)")
    parser.add_argument("--config", type=given, help="YAML config file (or JETSPOOL_CONFIG), for the default URL")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _seconds(text: str) -> float:
    """A number of seconds, zero or more (argparse: exit 2 for anything else)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds, got {text!r}")
    return seconds


def _gateway_url(args: argparse.Namespace) -> str:
    """The gateway URL: --url, else JETSPOOL_URL, else the config's `gateway.public_url`. A config
    file named (--config, JETSPOOL_CONFIG) is read even when a URL is given: a missing or broken
    one is an error either way. ConfigError for a URL that is not http(s)://HOST."""
    config = args.config or os.environ.get("JETSPOOL_CONFIG") or None
    settings = None if config is None else _settings(config)
    url: str
    if args.url:
        url, source = args.url, "--url"
    elif os.environ.get("JETSPOOL_URL"):
        url, source = os.environ["JETSPOOL_URL"], "JETSPOOL_URL"
    else:
        url, source = (settings or _settings(None)).gateway.base_url, "gateway.public_url"
    # Checked as `gateway.public_url` is: a query let through went before every route's path, and
    # each command's answer was the gateway's 404, taken for an unknown request (found by a SPEC audit).
    if not is_base_url(url):
        raise ConfigError(
            f"{source} {url!r} is not a gateway URL: http://HOST[:PORT][/PATH] or https://..., "
            "without query or fragment"
        )
    return url


def _settings(config: str | None) -> Settings:
    return load(config)


def run_client_command(args: argparse.Namespace) -> int:
    out = Output(args.json)
    try:
        with Client(_gateway_url(args), api_key=args.api_key) as client:
            return _COMMANDS[args.command](client, args, out)
    except RequestFailed as exc:
        out.failed(exc)
        return EXIT_FAILED
    except NotFound as exc:
        out.error(exc.detail)
        return EXIT_NOT_FOUND
    except (WaitTimeout, KeyboardInterrupt) as exc:  # Ctrl-C too: `submit --wait && next` must not go on
        out.error(exc.detail if isinstance(exc, WaitTimeout) else "interrupted; the request goes on")
        return EXIT_GAVE_UP
    except Unreachable as exc:
        out.error(exc.detail)
        return EXIT_UNREACHABLE
    except (JetspoolError, ConfigError, OSError, ValueError) as exc:
        out.error(str(exc))
        return EXIT_USAGE


def _submit(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.timeout is not None and not args.wait:  # it was ignored without a word (found by an audit)
        raise ConfigError("--timeout is how long --wait waits: give --wait too, or leave --timeout out")
    handle = client.submit(args.name, content=_body(args.data), path=args.path, priority=args.priority,
                           headers=_content_type(args.data))  # fmt: skip
    if not args.wait:
        out.value({"request_id": handle.request_id, "function": handle.function}, handle.request_id)
        return EXIT_OK
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    _follow(handle, out, deadline)
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    out.result(handle.request_id, handle.result(timeout=remaining))
    return EXIT_OK


def _follow(handle: Handle, out: Output, deadline: float | None) -> None:
    """Show the request's progress until it completes (or the deadline passes: WaitTimeout)."""
    progress = Progress(sys.stderr, time.monotonic())
    try:
        with _until(deadline):
            for status in handle.iter_events():
                progress.show(status)
                if status.completed:
                    return
    except WaitTimeout:
        pass
    finally:
        progress.done()
    raise WaitTimeout(f"request {handle.request_id} did not complete in time; it goes on")


@contextlib.contextmanager
def _until(deadline: float | None) -> Iterator[None]:
    """WaitTimeout raised wherever the command is at `deadline` (a SIGALRM; the CLI runs in the
    main thread). A limit on each read of the status stream did not do: the gateway's keep-alive
    every 15 s restarted it, and a stream resumed after a pause, so `--wait --timeout 20` gave up
    after 58 s (found by a CLI audit)."""
    if deadline is None:
        yield
        return

    def expired(_signum: int, _frame: object) -> None:
        raise WaitTimeout("the deadline passed")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, deadline - time.monotonic()))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _status(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Show the status (`--watch`: each change until it completes), with `--logs` its log lines
    (each once, though every status object carries them all); exit 1 when it shows the request
    completed with an error or cancelled, as every client command does."""
    handle = client.handle(args.name, args.id)
    if args.watch:
        _reachable(handle)
    shown = handle.iter_events(logs=args.logs) if args.watch else [handle.status(logs=args.logs)]
    last = None
    printed = 0
    for status in shown:
        lines = status.logs if isinstance(status.logs, list) else []
        out.value(status.raw, "\n".join([_describe(status), *_log_lines(lines[printed:])]))
        printed = max(printed, len(lines))
        last = status
    return EXIT_FAILED if last is not None and last.completed and last.error_type is not None else EXIT_OK


def _reachable(handle: Handle) -> None:
    """Unreachable at once when the gateway is not there: a status stream that cannot connect is
    resumed for about 16 s first, for a gateway that restarts (`status --watch` took that long to
    exit 5; found by a CLI audit). Any other answer is the stream's to give."""
    try:
        handle.status()
    except Unreachable:
        raise
    except JetspoolError:
        return


def _result(client: Client, args: argparse.Namespace, out: Output) -> int:
    handle = client.handle(args.name, args.id)
    out.result(handle.request_id, handle.result(timeout=0))
    return EXIT_OK


def _cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    requested = client.handle(args.name, args.id).cancel()
    status = "CANCELLATION_REQUESTED" if requested else "ALREADY_COMPLETED"
    out.value({"request_id": args.id, "status": status}, status)
    return EXIT_OK if requested else EXIT_FAILED


def _functions(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.verb == "list":
        listed = client.functions()
        lines = [f"{f['name']}\t{f['url']}\t{_figures(f.get('stats', {}))}" for f in listed]
        out.value(listed, "\n".join(lines) or "no functions")
    elif args.verb == "deploy":
        deployed = [client.deploy(entry) for entry in _function_entries(args.file)]
        out.value(deployed, "\n".join(f"deployed {d['name']}" for d in deployed))
    else:
        client.remove(args.fname)
        out.value({"removed": args.fname}, f"removed {args.fname}")
    return EXIT_OK


def _function_entries(file: Path) -> list[dict[str, Any]]:
    """The function entries of a file for `functions deploy`: a list of them, one alone, or a config
    file's `functions`. ConfigError (exit 2) for anything else: an empty, malformed or wrongly
    shaped file stopped the command with a traceback and exit code 1 (found by a CLI audit)."""
    try:
        loaded = load_yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not YAML or JSON: {' '.join(str(exc).split())}") from exc
    entries = loaded.get("functions", loaded) if isinstance(loaded, dict) else loaded
    entries = [entries] if isinstance(entries, dict) else entries
    if not isinstance(entries, list) or not entries:
        shapes = "a function (name, url, ...), a list of them, or `functions:`"
        raise ConfigError(f"{file}: no functions: expected {shapes}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{file}: function {index + 1} is not a mapping with a name: {entry!r}")
        # Every entry checked before any is sent: a bad one after good ones stopped the command
        # with those registered, and the message did not say so (found by a CLI audit).
        try:
            msgspec.convert({k: v for k, v in entry.items() if k != "stats"}, Function)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{file}: function {index + 1} ({entry['name']!r}): {describe(exc)}") from exc
    return entries


_COMMANDS: Final[dict[str, Callable[[Client, argparse.Namespace, Output], int]]] = {
    "submit": _submit,
    "status": _status,
    "result": _result,
    "cancel": _cancel,
    "functions": _functions,
}


def _body(data: str | None) -> bytes:
    if data is None:
        return b""
    if data == "@-":  # standard input, as `faas-cli invoke` reads it (found by a CLI audit)
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        return Path(data[1:]).read_bytes()
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as exc:  # exit 2, saying which option (found by a CLI audit)
        raise ValueError(f"--data is not JSON ({exc}); a file's bytes go as --data @FILE") from exc
    return data.encode()


def _content_type(data: str | None) -> dict[str, str]:
    if data is None:
        return {}
    return {"Content-Type": "application/octet-stream" if data.startswith("@") else "application/json"}


def _figures(stats: dict[str, Any]) -> str:
    waiting = sum((stats.get("waiting") or {}).values())
    running, done, failed = stats.get("in_progress", 0), stats.get("completed", 0), stats.get("failed", 0)
    return f"waiting {waiting} · running {running} · done {done} · failed {failed}"  # failures showed as nothing


def _describe(status: Status) -> str:
    if status.status == "IN_QUEUE" and status.queue_position is not None:
        return f"{status.request_id} IN_QUEUE, position {status.queue_position}"
    if status.completed and status.error_type:
        return f"{status.request_id} COMPLETED with {status.error_type}: {status.error}"
    return f"{status.request_id} {status.status} (attempts {status.attempts})"


def _log_lines(entries: Iterable[Any]) -> list[str]:
    """One line a log entry: timestamp, level, message (its line breaks and control characters escaped)."""
    return [
        "  " + " ".join(_printable(entry.get(key)) for key in ("timestamp", "level", "message"))
        for entry in entries
        if isinstance(entry, dict)
    ]


def _printable(value: object) -> str:
    return escaped("" if value is None else str(value))


class Progress:
    """One status line on a terminal (rewritten in place), plain lines elsewhere, on stderr."""

    def __init__(self, stream: TextIO, started: float) -> None:
        self._stream = stream
        self._started = started
        self._live = stream.isatty()
        self._last = ""

    def show(self, status: Status) -> None:
        where = f" · position {status.queue_position}" if status.queue_position is not None else ""
        line = f"{status.status}{where} · {time.monotonic() - self._started:.1f} s"
        if self._live:
            self._stream.write(f"\r\x1b[2K{line}")
        elif line.split(" · ")[:-1] != self._last.split(" · ")[:-1]:
            self._stream.write(f"{line}\n")
        self._last = line
        self._stream.flush()

    def done(self) -> None:
        if self._live and self._last:
            self._stream.write("\n")
            self._stream.flush()


def _shown_body(result: Result) -> dict[str, Any]:
    """A result for --json: its status code, content type and body, as its JSON value, else its
    text, else (bytes that are not UTF-8) `result_base64`. A binary result came out as text with
    its bytes replaced, past recovery, and without its content type (found by an outside audit)."""
    shown: dict[str, Any] = {"status_code": result.status_code, "content_type": result.content_type}
    try:
        return shown | {"result": orjson.loads(result.body)}
    except orjson.JSONDecodeError:
        pass
    try:
        return shown | {"result": result.body.decode("utf-8")}
    except UnicodeDecodeError:
        return shown | {"result": None, "result_base64": base64.b64encode(result.body).decode("ascii")}


class Output:
    def __init__(self, as_json: bool) -> None:
        self._json = as_json

    def value(self, data: Any, text: str) -> None:
        sys.stdout.write((orjson.dumps(data).decode() if self._json else text) + "\n")

    def result(self, request_id: str, result: Result) -> None:
        if self._json:
            self.value({"request_id": request_id} | _shown_body(result), "")
            return
        self._write_body(result.body)

    @staticmethod
    def _write_body(body: bytes) -> None:
        """The body byte for byte; on a terminal, a line break after it if it has none. Added
        everywhere, it changed a binary result written to a file (found by an outside audit)."""
        sys.stdout.buffer.write(body)
        if sys.stdout.isatty() and not body.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()

    def failed(self, exc: RequestFailed) -> None:
        """The failure; for a `function_error`, the function's own answer too (its body on stdout),
        which is what its caller needs to see."""
        data: dict[str, Any] = {"request_id": exc.request_id, "error_type": exc.error_type, "detail": exc.detail}
        if self._json:
            if exc.result is not None:
                data |= _shown_body(exc.result)
            self.value(data, "")
            return
        sys.stderr.write(f"jetspool: request {exc.request_id} failed ({exc.error_type}): {exc.detail}\n")
        if exc.result is not None and exc.result.body:
            self._write_body(exc.result.body)

    def error(self, detail: str) -> None:
        if self._json:
            self.value({"error": detail}, "")
        else:
            sys.stderr.write(f"jetspool: {detail}\n")
