"""One fetch of a durable pull consumer, with the expected outcomes folded in."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError

if TYPE_CHECKING:
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
