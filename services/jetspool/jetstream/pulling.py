"""One fetch of a durable pull consumer, with the expected outcomes folded in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError

from jetspool.aio import stop_task

if TYPE_CHECKING:
    from typing import Any

    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)

_ERROR_BACKOFF_S = 1.0


class ConnectionGone(Exception):
    """The connection is closed for good: the pull loop ends."""


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout_s: float, what: str) -> list[Msg]:
    """Up to `batch` messages; empty when none came in `timeout_s` or after a NATS error (logged and
    backed off); ConnectionGone once the connection is closed."""
    try:
        return list(await sub.fetch(batch, timeout=timeout_s))
    except (TimeoutError, NatsTimeoutError):
        return []
    except ConnectionClosedError as exc:
        raise ConnectionGone from exc
    except NatsError:
        log.warning("%s fetch failed; retrying", what, exc_info=True)
        await asyncio.sleep(_ERROR_BACKOFF_S)
        return []


async def stop_pulling(task: asyncio.Task[Any] | None, sub: JetStreamContext.PullSubscription | None) -> None:
    """End the pull loop `task` on `sub` for good. The last fetch's pull request stays open on the
    server until it expires, and messages delivered to it once the loop is gone would wait out the
    consumer's ack wait (a stopping worker's callback jobs waited 60 s). With nobody subscribed to
    its inbox, nats-server drops the request instead, and the messages stay for the next puller."""
    if task is not None:
        await stop_task(task)
    if sub is not None:
        with contextlib.suppress(NatsError):
            await sub.unsubscribe()
