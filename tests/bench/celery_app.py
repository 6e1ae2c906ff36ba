"""The comparison setup users build by hand: a FastAPI endpoint queueing a Celery task on Redis,
the task calling the HTTP function and storing its answer in Redis (the result backend).

Configured by BENCH_REDIS_URL and BENCH_FUNCTION_URL; run by `tests.bench.celery_compare`.
"""

from __future__ import annotations

import os

import httpx
from celery import Celery
from fastapi import FastAPI, Request, Response

_REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
_FUNCTION = os.environ.get("BENCH_FUNCTION_URL", "http://127.0.0.1:9000/")

queue = Celery("bench", broker=_REDIS, backend=_REDIS)
queue.conf.update(task_acks_late=True, worker_prefetch_multiplier=4, result_expires=3600)
api = FastAPI()
_client: httpx.Client | None = None


@queue.task(name="call_function")
def call_function(body: str) -> dict[str, object]:
    global _client  # noqa: PLW0603 - one keep-alive client per worker process
    if _client is None:
        _client = httpx.Client(timeout=60)
    response = _client.post(_FUNCTION, content=body, headers={"content-type": "application/json"})
    return {"status": response.status_code, "body": response.text}


@api.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@api.post("/submit", status_code=202)
async def submit(request: Request) -> Response:
    task = call_function.delay((await request.body()).decode())
    return Response(content=f'{{"request_id": "{task.id}"}}', status_code=202, media_type="application/json")
