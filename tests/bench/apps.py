"""The HTTP servers the benchmarks need beside jetspool, each run as its own uvicorn process.

    python -m tests.bench.apps noop  --port P   # the no-op function: records when each request came
    python -m tests.bench.apps plain --port P   # the baseline: a Litestar POST endpoint doing no work
    python -m tests.bench.apps receiver --port P  # a callback receiver: records when each callback came
    python -m tests.bench.apps hold --port P   # a function that never answers (keeps a backlog waiting)
    python -m tests.bench.apps publish --port P --nats-url U  # the floor of a submit: see `Publisher`

`noop` and `receiver` answer `GET /_seen` with what they recorded ({request id: Unix time}) and
forget it on `DELETE /_seen`. Both are raw ASGI so that they cost the measured system as little
as possible; `plain` is Litestar on purpose, the same framework and server as the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import nats
import orjson
import uvicorn
from litestar import Litestar, Request, get, post

from tests.support.servers import read_body

Scope = dict[str, Any]


class Recorder:
    """An ASGI app answering 200 `{}` to anything, noting the arrival of each request id."""

    def __init__(self, header: bytes) -> None:
        self.header = header
        self.seen: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        arrived = time.time()
        await read_body(receive)
        path, method = scope["path"], scope["method"]
        body = b"{}"
        if path == "/_seen" and method == "GET":
            body = orjson.dumps(self.seen)
        elif path == "/_seen" and method == "DELETE":
            self.seen = {}
        else:
            key = next((v.decode() for k, v in scope["headers"] if k == self.header), None)
            if key is not None:
                self.seen.setdefault(key, arrived)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class Hold(Recorder):
    """Answers `/_seen` and `/readyz`; any other request waits until the server stops."""

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in {"/_seen", "/readyz"}:
            await asyncio.Event().wait()
        await super().__call__(scope, receive, send)


class Publisher:
    """The floor of a submit over HTTP: a raw ASGI app that stores each request's body with one
    nats-py JetStream publish-with-ack (stream `BENCH_FLOOR`, on file) and answers 202.

    What any gateway on uvicorn and nats-py must do to take a request durably, and nothing more:
    no framework, no options, no status, no events."""

    SUBJECT = "bench.floor"

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.nc: Any = None
        self.js: Any = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = await read_body(receive)
        status, answer = 200, b"{}"
        if scope["path"] != "/readyz":
            ack = await self.js.publish(self.SUBJECT, body)
            status, answer = 202, orjson.dumps({"seq": ack.seq})
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.nc = await nats.connect(self.nats_url)
                self.js = self.nc.jetstream()
                await self.js.add_stream(name="BENCH_FLOOR", subjects=[self.SUBJECT], storage="file")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.js.delete_stream("BENCH_FLOOR")
                await self.nc.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


@post("/submit", status_code=202)
async def plain_submit(request: Request[Any, Any, Any]) -> dict[str, str]:
    """What a submit route does when it does nothing: read the body, answer 202 with an id."""
    await request.body()
    return {"request_id": "00000000-0000-0000-0000-000000000000"}


@get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["noop", "plain", "receiver", "hold", "publish"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nats-url", help="the NATS server `publish` stores in")
    args = parser.parse_args()
    app: Any
    if args.kind == "plain":
        app = Litestar([plain_submit, ready])
    elif args.kind == "noop":
        app = Recorder(b"x-request-id")
    elif args.kind == "receiver":
        app = Recorder(b"x-call-id")
    elif args.kind == "publish":
        if not args.nats_url:
            parser.error("publish needs --nats-url")
        app = Publisher(args.nats_url)
    else:
        app = Hold(b"x-request-id")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
