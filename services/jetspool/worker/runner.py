"""One function's pull loop: fetch as many requests as there are free slots, handle each in a task.

A boring loop: pull (highest priority first); if nothing waits, sleep until a wake-up on
`jetspool.wake.<function>.*` (the queue stream sends one for each message it stores), until a
request this worker handed back with a delay is due, or until the poll interval (a retry another
worker handed back becomes due without a wake-up); back off on NATS errors. In-flight tasks are
held strongly in `_inflight`; their count never exceeds the function's `concurrency`. Each
message is kept (in-progress acks) from receipt until it is settled.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError

from jetspool.aio import run_to_end, stop_task, wait_event
from jetspool.domain import names
from jetspool.worker.handler import HAND_BACK, Lease, settle
from jetspool.worker.puller import DUE_WAIT_S, PriorityPuller

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from jetspool.domain.functions import Function
    from jetspool.worker.handler import RequestHandler, Settle

log = logging.getLogger(__name__)

_ERROR_BACKOFF_S = 1.0
_DUE_SLACK_S = 0.02
"""After a handed-back message's delay, before pulling it: JetStream's own timer makes it due."""
_AT_ONCE_S = 1.0
"""How long a cancelled stop gives what is left of its hand-backs (each a nak sent without a reply)."""
_UNSUBSCRIBE_S = 2.0
"""How long a stop waits for each unsubscribe (nats-py sends it and returns)."""


class FunctionRunner:
    def __init__(self, nc: Client, function: Function, handler: RequestHandler, poll_interval_s: float) -> None:
        self._nc = nc
        self._function = function
        self._handler = handler
        self._poll_interval_s = poll_interval_s
        self._puller = PriorityPuller(nc, function.name, poll_interval_s)
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._wake = asyncio.Event()
        self._wake_sub: Subscription | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._due: set[asyncio.TimerHandle] = set()
        self._handing_back: list[Msg] = []
        """Deliveries the puller held at the stop, until each is handed back."""

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def update(self, function: Function) -> None:
        """Take a changed registry entry (URL, concurrency, ...) into use for the next requests."""
        self._function = function
        self._slot_freed.set()

    async def start(self) -> None:
        await self._puller.start()
        self._wake_sub = await self._nc.subscribe(names.wake_subject(self._function.name, "*"), cb=self._on_wake)
        self._loop_task = asyncio.create_task(self._loop(), name=f"runner-{self._function.name}")

    async def stop(self, grace_s: float) -> None:
        """Stop pulling, let in-flight calls finish for `grace_s`, hand the rest back to the queue.

        Each step runs whatever the one before did, and the calls are waited for whatever failed:
        a stop that raised on the way (an unsubscribe refused by a closing connection) left them
        running unbounded while the pool took the runner for stopped, and the deliveries its puller
        held waited out the ack wait (found by reviews). The first failure is raised at the end. A
        stop cancelled on its way stops the calls at once (their messages go back), and ends."""
        try:
            try:
                failure = await self._stop_taking()
            except Exception as exc:  # noqa: BLE001 - raised once the calls are over
                failure = exc
            await self._end_calls(grace_s)
        except asyncio.CancelledError:
            # Cancelled anywhere, before the hand-backs too (found by a review): what is left of
            # them is done, and the calls stopped, at once.
            await run_to_end(self._stop_at_once())
            raise
        if failure is not None:
            raise failure

    async def _stop_at_once(self) -> None:
        try:
            async with asyncio.timeout(_AT_ONCE_S):
                failure = await self._stop_taking()  # picks up where the cancelled turn left off (see there)
        except Exception as exc:  # noqa: BLE001 - TimeoutError included; logged, the calls end all the same
            failure = exc
        if failure is not None:
            left = len(self._handing_back) + self._puller.held
            log.warning("stopping delivery to %s at once: %r (%d not handed back)", self._function.name, failure, left)
        await self._end_calls(0.0)

    async def _stop_taking(self) -> Exception | None:
        """Take no more requests and hand back those the puller holds; the first failure, if any.

        The hand-backs come first, and again after the unsubscribes, each bounded: behind an
        unsubscribe that hung (a connection busy flushing), they were never made (found by a
        review). Each step is done once, so that a turn after a cancelled one does only what is left."""
        failures: list[Exception] = []
        if self._loop_task is not None:
            await stop_task(self._loop_task)  # no pull after this one
        for timer in self._due:
            timer.cancel()
        await self._hand_back(failures)
        wake_sub, self._wake_sub = self._wake_sub, None
        for unsubscribe in (wake_sub.unsubscribe if wake_sub is not None else None, self._puller.stop):
            if unsubscribe is None:
                continue
            try:
                async with asyncio.timeout(_UNSUBSCRIBE_S):
                    await unsubscribe()
            except Exception as exc:  # noqa: BLE001 - raised once every step has run
                failures.append(exc)
        await self._hand_back(failures)  # what the pull in flight brought meanwhile
        for later in failures[1:]:
            log.warning("stopping delivery to %s: %r as well", self._function.name, later)
        return failures[0] if failures else None

    async def _hand_back(self, failures: list[Exception]) -> None:
        self._handing_back.extend(self._puller.take_held())
        while self._handing_back:
            try:
                await settle(self._handing_back[0], HAND_BACK)
            except Exception as exc:  # noqa: BLE001 - the next ones are handed back all the same
                failures.append(exc)
            self._handing_back.pop(0)

    async def _end_calls(self, grace_s: float) -> None:
        """Let the calls in flight finish for `grace_s`; stop the rest (their messages go back)."""
        if self._loop_task is not None:
            await stop_task(self._loop_task)  # no new call starts while these are waited for
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=grace_s)
            await asyncio.gather(*(stop_task(task) for task in pending))

    async def _on_wake(self, msg: Msg) -> None:
        priority = msg.subject.rpartition(".")[2]
        self._puller.heard(None if priority == names.WAKE_ANY else priority)
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            free = self._function.concurrency - len(self._inflight)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wake.clear()
            try:
                msgs = await self._puller.pull(free)
            except ConnectionClosedError:
                return
            except NatsError:
                log.warning("pull for %s failed; retrying", self._function.name, exc_info=True)
                await asyncio.sleep(_ERROR_BACKOFF_S)
                continue
            for msg in msgs:
                self._spawn(msg)
            if not msgs:
                await wait_event(self._wake, self._poll_interval_s)

    def _spawn(self, msg: Msg) -> None:
        task = asyncio.create_task(self._handle(msg))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_freed.set()

    async def _handle(self, msg: Msg) -> None:
        lease = Lease()
        keeper = asyncio.create_task(self._handler.keep_in_progress(msg, lease), name=f"in-progress-{msg.subject}")
        failure: Exception | None = None
        try:
            decision = await self._handler.handle(msg)
        except asyncio.CancelledError:
            keeper.cancel()
            # Shutting down: another worker takes it at once.
            await asyncio.shield(settle(msg, self._handler.settlement(msg, HAND_BACK, lease)))
            raise
        except Exception as exc:  # noqa: BLE001 - logged with its traceback once settled
            failure, decision = exc, self._handler.unexpected(msg)
        finally:
            await stop_task(keeper)  # no in-progress ack goes out after the settlement
        decision = self._handler.settlement(msg, decision, lease)
        if failure is not None:
            _log_failure(msg, decision, failure)
        try:
            await settle(msg, decision)
        except NatsError:
            log.warning("acknowledging %s failed; JetStream will redeliver it", msg.subject, exc_info=True)
        else:
            if decision.verb == "nak" and decision.delay_s:
                self._pull_later(msg.subject.rpartition(".")[2], decision.delay_s)

    def _pull_later(self, priority: str, delay_s: float) -> None:
        """Pull when a message handed back with a delay (a retry's backoff) is due again, rather
        than at the next poll: a backoff of 2 s took up to 2 s plus the poll interval. The pull
        waits for the message, as one on a wake-up does: JetStream's timer, begun when its nak
        arrived, may fire just after this one, and a plain `no_wait` pull then found the class
        empty and left the retry to the poll interval (found by a test audit)."""

        def due() -> None:
            self._due.discard(timer)
            self._puller.heard(priority, DUE_WAIT_S)
            self._wake.set()

        timer = asyncio.get_running_loop().call_later(delay_s + _DUE_SLACK_S, due)
        self._due.add(timer)


def _log_failure(msg: Msg, decision: Settle, failure: Exception) -> None:
    """The error line of a message whose handling raised, saying what becomes of the message."""
    if decision.verb == "nak":
        log.error("handling %s failed; it is tried again in %.1f s", msg.subject, decision.delay_s, exc_info=failure)
    else:  # its hold may have lapsed: the nak became a leave (see `RequestHandler.settlement`)
        log.error("handling %s failed; it is left to its redelivery", msg.subject, exc_info=failure)
