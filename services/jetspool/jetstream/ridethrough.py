"""Riding through the loss of a NATS node: retry an operation that failed because the cluster
was between leaders, or the connection between servers.

When a node of a cluster dies, its clients reconnect to another one, and every stream and
consumer it led elects a new leader among the survivors (a few seconds). Meanwhile a request
to JetStream gets no responder, times out or is told the system is unavailable. Each of
jetspool's writes is safe to repeat: a message id makes a repeated publish store nothing
twice, a compare-and-set write that did land is recognised by the writer (see
`StatusStore.update`), a KV put of the same value changes nothing; reads are free to repeat.
So they are retried here, with a growing pause, for up to `RIDE_THROUGH_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, TypeVar

from nats.errors import ConnectionReconnectingError, NoRespondersError, StaleConnectionError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, KeyNotFoundError, NoStreamResponseError, ServiceUnavailableError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

T = TypeVar("T")

RIDE_THROUGH_S: Final = 30.0
"""How long an operation is retried: past a leader election (seconds) and a reconnect."""
_FIRST_PAUSE_S: Final = 0.05
_HELD_WAIT_S: Final = 0.05
_MAX_PAUSE_S: Final = 1.0
_BETWEEN_LEADERS: Final = frozenset({10008, 10009, 10118, 10158})
"""JetStream API errors of a cluster between leaders: temporarily unavailable (10008), not the
leader (10009), stream offline (10118), and a repeat of a publish whose message id is still in
process (10158): a leader that lost its quorum holds the first publish, unanswered, until the
quorum is back and the message commits. Repeated, the publish then gets the stored message's
acknowledgement; raised, it made a submit answer 503 for a request that went on to run."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is what a node loss or leader election looks like to a client."""
    if isinstance(
        exc,
        NatsTimeoutError
        | TimeoutError
        | NoRespondersError
        | NoStreamResponseError
        | ServiceUnavailableError
        | ConnectionReconnectingError
        | StaleConnectionError,
    ):
        return True
    return isinstance(exc, APIError) and getattr(exc, "err_code", None) in _BETWEEN_LEADERS


async def ride_through(operation: Callable[[], Awaitable[T]], what: str, budget_s: float | None = None) -> T:
    """`await operation()`, repeated while it fails transiently, for up to `budget_s` (default
    `RIDE_THROUGH_S`); the last error is raised when time runs out. `operation` must be safe to repeat."""
    deadline = time.monotonic() + (RIDE_THROUGH_S if budget_s is None else budget_s)
    pause = _FIRST_PAUSE_S
    tries = 0
    while True:
        try:
            result = await operation()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + pause > deadline:
                raise
            tries += 1
            if tries == 1:
                log.info("nats: %s failed (%s), retrying", what, type(exc).__name__)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE_S)
            continue
        if tries:
            log.info("nats: %s succeeded after %d retries", what, tries)
        return result


async def ride_through_create(create: Callable[[], Awaitable[T]], what: str, budget_s: float | None = None) -> T:
    """`ride_through` for nats-py's `KeyValue.create`, which needs one more case: refused because
    the key is taken, it reads the key (to tell a deleted one apart) and raises KeyNotFoundError
    while the write that took it is still in process, held by a cluster leader waiting for its
    quorum (often our own first try, timed out and repeated). That is tried again every 50 ms,
    within the same budget, until the write is settled; past the budget, a time-out.
    KeyWrongLastSequenceError still means the key is taken: by whom is the caller's question."""
    deadline = time.monotonic() + (RIDE_THROUGH_S if budget_s is None else budget_s)
    while True:
        try:
            return await ride_through(create, what, budget_s=deadline - time.monotonic())
        except KeyNotFoundError:
            if time.monotonic() > deadline:
                raise NatsTimeoutError from None  # the quorum stayed away
            await asyncio.sleep(_HELD_WAIT_S)
