"""The HTTP servers the benchmarks need beside jetspool, each run as its own uvicorn process.

    python -m tests.bench.apps noop  --port P   # the no-op function: records when each request came
    python -m tests.bench.apps plain --port P   # the baseline: a Litestar POST endpoint doing no work
    python -m tests.bench.apps receiver --port P  # a callback receiver: records when each callback came
    python -m tests.bench.apps hold --port P   # a function that never answers (keeps a backlog waiting)

`noop` and `receiver` answer `GET /_seen` with what they recorded ({request id: Unix time}) and
forget it on `DELETE /_seen`. Both are raw ASGI so that they cost the measured system as little
as possible; `plain` is Litestar on purpose, the same framework and server as the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
import uvicorn
from litestar import Litestar, Request, get, post

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
        more = True
        while more:  # read the whole body
            message = await receive()
            more = message.get("more_body", False)
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
    parser.add_argument("kind", choices=["noop", "plain", "receiver", "hold"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app: Any
    if args.kind == "plain":
        app = Litestar([plain_submit, ready])
    elif args.kind == "noop":
        app = Recorder(b"x-request-id")
    elif args.kind == "receiver":
        app = Recorder(b"x-call-id")
    else:
        app = Hold(b"x-request-id")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
