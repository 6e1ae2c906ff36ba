"""Pure decisions of the worker: how a function's answer is classified, how long to back off.

No I/O here, so every rule is unit-tested without a server.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Final

from jetspool.domain.errors import RetryableDelivery

if TYPE_CHECKING:
    import random

    from jetspool.settings import RetrySettings

RETRYABLE_STATUS: Final = frozenset({429, 502, 503, 504})


def check_response(status_code: int, retry_after: str | None, now: datetime) -> None:
    """Raise RetryableDelivery for an answer worth retrying (429, 502, 503, 504); any other is an outcome."""
    if status_code in RETRYABLE_STATUS:
        raise RetryableDelivery(f"function answered {status_code}", parse_retry_after(retry_after, now))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from `now` named by a `Retry-After` header (delta-seconds or an HTTP date), if valid."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


SOONEST_S: Final = 0.001
"""The shortest delay a message is handed back with. A nak with no delay is nats-server's "redeliver
now", kept in its memory only (lost with a restart, and then the ack wait passes first), and the
worker scheduled no pull for it: `Retry-After: 0` waited for the next poll (found by an audit)."""


def backoff_s(attempt: int, settings: RetrySettings, retry_after_s: float | None, rng: random.Random) -> float:
    """Delay before attempt `attempt + 1`: the function's Retry-After (capped), else jittered exponential."""
    if retry_after_s is not None:
        return max(SOONEST_S, min(retry_after_s, settings.max_retry_after))
    try:
        grown = settings.initial_backoff * settings.multiplier ** max(0, attempt - 1)
    except OverflowError:  # a count of thousands (a job tried again without a bound): past any cap
        grown = settings.max_backoff
    base = min(grown, settings.max_backoff)
    return base * rng.uniform(1 - settings.jitter, 1 + settings.jitter)
