"""Pulling a function's waiting requests, highest priority class first.

Each pull is a `no_wait` request to one class's durable consumer, answered on this puller's
own inbox: JetStream sends what is waiting and then a 404 status, at once. Classes are asked
in order (high, normal, low) and a lower class only for the slots the higher ones left, so
a low-priority request starts only when no higher-class request waits.

Every data message that reaches the inbox is a delivery this worker owns. It is kept only as an
answer to the pull in flight, within what that pull asked of its class; any other (one that comes
after its pull timed out, or the answer to a pull request nats-py held while NATS was away and sent
on reconnecting) is handed back at once. Kept, such deliveries held several times `concurrency`
after an outage, without in-progress signals: redelivered to another worker after the ack wait,
they then ran twice at once (found by a review). No pull is sent while NATS is away.

A class found empty is not asked again until a wake-up names it (the queue stream sends one on
`jetspool.wake.<function>.<priority>` for each message it stores) or `recheck_s` has passed (a
retry's delayed redelivery becomes due with no wake-up): a worker busy with normal requests makes
one pull per round, not three.

A pull made on a wake-up that named its class may wait up to `_WOKEN_WAIT_S` for the request
the wake-up announced (`no_wait` with `expires`: nats-server answers as soon as one request is
there, and 404 after what waits). On a cluster the stream's leader sends the wake-up as it
stores the message, and the consumer's leader, on another node, may not have it yet: a plain
`no_wait` pull then found the class empty, and the request waited for the poll interval. In a
3-node check (replicas 3, one submit at a time), 55 of 780 requests did so with a plain `no_wait`
pull whenever the two leaders were on different nodes, and none of 780 with the wait. A pull that
finds nothing (another worker took the request) holds this worker's round for that long. The
wait is the server's to keep: nats-server ends every `no_wait` request when its consumer next
finds nothing to deliver, which may be at once (a pull made before the message was stored ended
so in about one of thirty tries on one server); the request then waits for the next wake-up or
recheck, as it did without the wait.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import orjson

from jetspool.aio import wait_event
from jetspool.domain import names

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_PULL_TIMEOUT_S = 2.0
_WOKEN_WAIT_S = 0.05
DUE_WAIT_S = 0.25
"""How long a pull made when a handed-back request is due waits for it: JetStream's timer, begun
when the nak arrived, may fire after the worker's by more than a wake-up's wait (a review)."""
_HEARTBEAT = "100"


class _Pull:
    def __init__(self, subject: str, batch: int) -> None:
        self.subject = subject
        """The queue subject of the class asked: its deliveries carry it."""
        self.remaining = batch
        self.done = asyncio.Event()


class PriorityPuller:
    def __init__(self, nc: Client, function: str, recheck_s: float) -> None:
        self._nc = nc
        self._function = function
        self._recheck_s = recheck_s
        self._drained: dict[str, float] = {}
        """Class → when a pull last found it empty."""
        self._heard: dict[str, int] = dict.fromkeys(names.PRIORITIES, 0)
        """Class → wake-ups heard for it (a wake-up during a pull keeps the class from counting as drained)."""
        self._woken: dict[str, float] = {}
        """Class → how long its next pull waits for a request a wake-up (or a due retry) announced."""
        self._inbox = nc.new_inbox()
        self._tokens = itertools.count()
        self._pulls: dict[str, _Pull] = {}
        self._current: _Pull | None = None
        self._ready: deque[Msg] = deque()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_message)

    @property
    def held(self) -> int:
        return len(self._ready)

    def take_held(self) -> list[Msg]:
        """The deliveries received but never handed out, now no longer held (the caller hands them back)."""
        held = list(self._ready)
        self._ready.clear()
        return held

    async def stop(self) -> None:
        """Stop listening (once: a second stop does nothing). Deliveries may still come until it has
        (`take_held` after it)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    def heard(self, priority: str | None, wait_s: float = _WOKEN_WAIT_S) -> None:
        """A wake-up: work of `priority` (None: of any class, none announced) may wait; the class's
        next pull waits up to `wait_s` for it."""
        for name in names.PRIORITIES if priority is None else (priority,):
            if name in self._heard:
                self._heard[name] += 1
                self._drained.pop(name, None)
                if priority is not None:
                    self._woken[name] = max(wait_s, self._woken.get(name, 0.0))

    def _skip(self, priority: str) -> bool:
        found_empty = self._drained.get(priority)
        return found_empty is not None and time.monotonic() - found_empty < self._recheck_s

    async def pull(self, batch: int) -> list[Msg]:
        """Up to `batch` waiting requests, higher classes first; empty when nothing waits."""
        for priority in names.PRIORITIES:
            if len(self._ready) >= batch:
                break
            if self._skip(priority):
                continue
            heard, asked = self._heard[priority], batch - len(self._ready)
            wait_s = self._woken.pop(priority, 0.0)
            if await self._pull_class(priority, asked, wait_s) < asked and self._heard[priority] == heard:
                self._drained[priority] = time.monotonic()
            else:
                self._drained.pop(priority, None)
        return [self._ready.popleft() for _ in range(min(batch, len(self._ready)))]

    async def _pull_class(self, priority: names.Priority, batch: int, wait_s: float = 0.0) -> int:
        """Ask one class for `batch` requests, waiting up to `wait_s` for the first when none is
        there yet; returns how many came (all of them, on a time-out)."""
        if not self._nc.is_connected:  # held by nats-py, it would be sent late (see the module's docstring)
            return batch  # not known to be empty
        token = str(next(self._tokens))
        pull = _Pull(names.queue_subject(self._function, priority), batch)
        self._pulls[token] = pull
        self._current = pull
        consumer = names.queue_consumer(self._function, priority)
        try:
            await self._nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{names.QUEUE_STREAM}.{consumer}",
                orjson.dumps({"batch": batch, "no_wait": True} | ({"expires": round(wait_s * 1e9)} if wait_s else {})),
                reply=f"{self._inbox}.{token}",
            )
            # On a time-out, whatever this pull still brings lands in _ready and goes out with the next pull.
            if not await wait_event(pull.done, _PULL_TIMEOUT_S):
                return batch  # no answer: not known to be empty
            return batch - max(0, pull.remaining)
        finally:
            del self._pulls[token]
            self._current = None

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None and msg.reply:
            # A delivery shows the message's own subject, not our inbox token: it counts against the
            # pull in flight (pulls are made one at a time), if that pull asked its class for more.
            current = self._current
            if current is None or current.remaining <= 0 or msg.subject != current.subject:
                await self._hand_back(msg)
                return
            self._ready.append(msg)
            current.remaining -= 1
            if current.remaining <= 0:
                current.done.set()
            return
        pull = self._pulls.get(msg.subject.rpartition(".")[2])  # status replies do come on the token
        if status != _HEARTBEAT and pull is not None:
            pull.done.set()  # 404 no messages, 408 expired, 409 consumer gone: this pull is over

    @staticmethod
    async def _hand_back(msg: Msg) -> None:
        """A delivery no pull in flight asked for: back to the queue for the next pull, of any worker."""
        try:
            await msg.nak()
        except Exception:  # it comes back after the ack wait instead
            log.warning("handing back %s, which no pull asked for, failed", msg.subject, exc_info=True)
        else:
            log.info("handed back %s: no pull in flight asked for it", msg.subject)
