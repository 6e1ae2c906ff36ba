"""The `jetspool` command (SPEC §8).

Exit codes: 0 done; 1 failed; 2 usage or config error; 3 not found; 4 gave up waiting;
5 gateway unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from jetspool import __version__, logfmt
from jetspool.aio import stop_task
from jetspool.commands import CLIENT_COMMANDS, add_client_commands, given, run_client_command
from jetspool.domain.errors import ConfigError
from jetspool.settings import Settings, check_listen, check_tls_files, load

if TYPE_CHECKING:
    import socket
    from collections.abc import Coroutine

    import uvicorn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
_KEEP_ALIVE_S = 75
_STARTING_POLL_S = 0.2
_STOP_SLACK_S = 2.0
"""Beyond `worker.shutdown_grace`, for a worker stopped during start-up to unwind."""

log = logging.getLogger("jetspool")
_LOG_FORMATS: Final = ("text", "json")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetspool", description="A durable async request queue for HTTP functions.")
    parser.add_argument("--version", action="version", version=f"jetspool {__version__}")
    _logging(parser, "INFO", os.environ.get("JETSPOOL_LOG_FORMAT", "text"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole stack: embedded NATS, gateway, worker(s)")
    _common(up)
    _http(up)
    up.add_argument(
        "--data-dir",
        type=lambda value: Path(given(value)),
        default=Path("jetspool-data"),
        help="embedded NATS data dir (default ./jetspool-data)",
    )
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument("--demo", action="store_true", help="also serve and register demo functions")

    gateway = commands.add_parser("gateway", help="run the HTTP gateway against --nats-url")
    _common(gateway)
    _http(gateway)

    worker = commands.add_parser("worker", help="run function and callback delivery against --nats-url")
    _common(worker)

    add_client_commands(commands)

    demo = commands.add_parser("demo-functions", help="serve the demo functions (echo, sleep, flaky)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9000)
    return parser


def _logging(parser: argparse.ArgumentParser, level: str, log_format: str) -> None:
    parser.add_argument("--log-level", default=level, type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--log-format",
        default=log_format,
        choices=_LOG_FORMATS,
        help="log lines as text or JSON objects (or JETSPOOL_LOG_FORMAT); each names its request and trace",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=given, help="YAML config file (or JETSPOOL_CONFIG)")
    parser.add_argument("--nats-url", type=given, help="NATS server URL(s), comma-separated")
    # also after the command (`jetspool up --log-format json`); given there, it wins over one before it
    _logging(parser, argparse.SUPPRESS, argparse.SUPPRESS)


def _http(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", type=given, help="gateway bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gateway port (default 8080)")


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {"nats.url": args.nats_url}
    if hasattr(args, "host"):
        flags |= {"gateway.host": args.host, "gateway.port": args.port}
    return load(args.config, flags=flags)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.log_format not in _LOG_FORMATS:  # from JETSPOOL_LOG_FORMAT: argparse checks only what is given
        parser.error(f"JETSPOOL_LOG_FORMAT: {args.log_format!r} is not one of {', '.join(_LOG_FORMATS)}")
    logfmt.configure(args.log_level, args.log_format)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        sys.stderr.write(f"jetspool: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo-functions":
        return _serve_demo(args.host, args.port)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args)
    settings = _settings(args)
    if args.command == "up":
        from jetspool.supervisor import UpOptions, run_up  # noqa: PLC0415 - keeps other commands light

        if args.workers < 1:
            raise ConfigError("--workers must be at least 1")
        options = UpOptions(args.config, args.data_dir, args.workers, args.demo, args.log_level, args.log_format)
        return run_up(settings, options)
    from jetspool.jetstream.startup import check_durability  # noqa: PLC0415

    if args.command == "gateway":
        check_tls_files(settings.gateway)  # what serves the gateway needs its key and its port; a worker does not
        check_listen(settings.gateway)
    check_durability(settings)
    return _serve_gateway(settings) if args.command == "gateway" else _run_worker(settings)


def _serve_gateway(settings: Settings) -> int:
    import uvicorn  # noqa: PLC0415

    from jetspool.gateway.app import create_app, stopping  # noqa: PLC0415

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            stopping(app)  # streams end and long polls answer before uvicorn waits for them
            await super().shutdown(sockets)

    gateway = settings.gateway
    config_errors: list[ConfigError] = []
    app = create_app(settings, config_errors=config_errors)
    _settle_heap()
    config = uvicorn.Config(
        app,
        host=gateway.host,
        port=gateway.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
        # Longer than a client's or load balancer's idle timeout (httpx 5 s, most proxies 60 s): the
        # client drops an idle connection first, and never sends a request on one being closed.
        timeout_keep_alive=_KEEP_ALIVE_S,
        ssl_certfile=gateway.tls_cert,
        ssl_keyfile=gateway.tls_key,
    )
    server = Server(config)

    # uvicorn logs a failed or abandoned start-up with a whole traceback: a config error is told
    # as a message instead, and a stop during start-up is no error.
    def worth_telling(_: logging.LogRecord) -> bool:
        return not config_errors and (server.started or not server.should_exit)

    logging.getLogger("uvicorn.error").addFilter(worth_telling)
    # Once shut down, uvicorn raises the stop signal again under the handler it found, so that the
    # process would end killed by it (-15) where a stop on request exits 0. Its own handler, in
    # place before it starts, takes that second raise as a repeated stop request.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, server.handle_exit)
    try:
        run_loop(_serve(server))
    except SystemExit:  # uvicorn's way out of a failed start-up
        if config_errors:
            raise config_errors[0] from None
        raise
    return EXIT_OK if server.started or server.should_exit else EXIT_FAILED


async def _serve(server: uvicorn.Server) -> None:
    """uvicorn's `serve`, except that a stop signal during start-up ends it too.

    uvicorn notes a signal at any time but looks at it only once started, and start-up waits for
    an unreachable NATS server as long as it takes: SIGTERM would not stop the gateway then."""
    serving = asyncio.create_task(server.serve())
    while not serving.done():
        await asyncio.wait({serving}, timeout=_STARTING_POLL_S)
        if server.should_exit and not server.started:
            await stop_task(serving)
    if not serving.cancelled():
        serving.result()


def _run_worker(settings: Settings) -> int:
    from jetspool.worker.main import run  # noqa: PLC0415

    _settle_heap()

    async def main() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        running = asyncio.create_task(run(settings, stop, ready))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not running.done() and not ready.is_set():
            # Stopped during start-up: waiting for NATS, or with runners that already took requests.
            # One cancel ends start-up where it is, and what has started unwinds as on any stop,
            # handing back what it took; repeated cancels would cut the hand-backs short, and the
            # requests would wait out the ack wait. Past the grace (a cancel swallowed inside
            # nats-py, see stop_task), it is cancelled until it ends.
            log.info("worker stopping during start-up")
            running.cancel()
            await asyncio.wait({running}, timeout=settings.worker.shutdown_grace + _STOP_SLACK_S)
            await stop_task(running)
            return
        await running

    run_loop(main())
    return EXIT_OK


def _settle_heap() -> None:
    """Set the garbage collector for a long-running server, once its code is imported and built.

    What start-up imported and built lives as long as the process: in the gateway some 88,000
    objects the collector tracks. `gc.freeze` takes them out of its collections; before, each full
    collection walked them all, about 60 ms each, stalling every request in flight. And the young
    generation is collected after 10,000 allocations instead of 700: a request makes short-lived
    objects by the hundred. Measured on the gateway in-process, over 17,000 submits: the
    collector's time went from 1.35 s to 0.17 s, about 70 µs per submit."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop where it is installed (Linux, macOS), else on asyncio's own loop."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _serve_demo(host: str, port: int) -> int:
    import uvicorn  # noqa: PLC0415

    from jetspool.demo import create_app  # noqa: PLC0415

    uvicorn.run(create_app(), host=host, port=port, log_level="warning")
    return EXIT_OK
