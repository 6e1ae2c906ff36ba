"""Idempotency keys: a second submit with the same key to the same function returns the first request.

Each key has its own record (`jetspool-idempotency`, key = function + hash of the client's key)
naming the request it created and when; `create` fails when the key is taken, so two concurrent
submits cannot both win. The key holds for as long as the named request's status is kept: a
record whose request is gone (its status expired) is replaced. The JetStream message-id window
alone would forget a key after two minutes.

A key whose request has no status yet, though it cannot have expired, names a submit that died
between its claim and its status record (a gateway killed), one whose queue write timed out (it
may still land: the key is given back only when JetStream refused the write), or one still under
way. A second submit then takes that request's id and queues under it: the message id (the request
id) stores nothing twice if the first message made it within JetStream's duplicate window (two
minutes). Past it a second message is stored, and workers run only the one the status record names
(by its stream sequence) and drop the other: the request runs once either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from typing import TYPE_CHECKING, Final

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError

from jetspool.domain import names
from jetspool.jetstream import ridethrough
from jetspool.jetstream.ridethrough import ride_through, ride_through_create

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from jetspool.domain.status import StatusRecord
    from jetspool.jetstream.status_store import StatusStore, Versioned

_IN_FLIGHT_CHECKS: Final = 40
_IN_FLIGHT_WAIT_S: Final = 0.05
_KEEP_S: Final = 30 * 86400.0
"""Beyond the request's result_ttl, how long an unused key record may linger before it expires."""


class IdempotencyKeys:
    def __init__(self, kv: KeyValue, status: StatusStore) -> None:
        self._kv = kv
        self._status = status

    async def claim(self, function: str, key: str, request_id: str, result_ttl_s: float) -> StatusRecord | str | None:
        """Reserve `key` for `request_id`. None when reserved; when taken, the first request's
        record, or its id when it has no record yet (the caller queues under that id)."""
        entry = names.idempotency_key(function, key)
        mine = f"{request_id} {time.time():.3f}".encode()
        create = partial(self._kv.create, entry, mine, msg_ttl=result_ttl_s + _KEEP_S)
        deadline = time.monotonic() + ridethrough.RIDE_THROUGH_S  # one budget for all the tries
        while True:
            try:
                await ride_through_create(create, "idempotency claim", budget_s=deadline - time.monotonic())
            except KeyWrongLastSequenceError:
                try:
                    held = await ride_through(partial(self._kv.get, entry), "idempotency read")
                except KeyNotFoundError:
                    continue  # removed meanwhile: claim again
                if held.value == mine:
                    return None  # our own claim, whose acknowledgement was lost to a node loss
                first = await self._first(entry, held, result_ttl_s)
                if first is not None:
                    return first
                continue  # the record went stale and was removed: claim again
            return None

    async def named(self, function: str, key: str, result_ttl_s: float) -> StatusRecord | str | None:
        """The request `key` names: its record, or its id while it has no record (see `claim`);
        None when the key names none. Claims nothing."""
        entry = names.idempotency_key(function, key)
        try:
            held = await self._kv.get(entry)
        except KeyNotFoundError:
            return None
        return await self._first(entry, held, result_ttl_s)

    async def release(self, function: str, key: str) -> None:
        """Give a key back after the message of the request it reserved was refused."""
        with contextlib.suppress(KeyNotFoundError):
            await self._kv.delete(names.idempotency_key(function, key))

    async def _first(self, entry: str, held: KeyValue.Entry, result_ttl_s: float) -> StatusRecord | str | None:
        """The request a taken key names, or its id while it has no record but cannot have expired;
        None (after removing the key's record) when that request is gone."""
        request_id, _, claimed = (held.value or b"").decode().partition(" ")
        current = await self._status.get(request_id)
        if current is not None:
            return current.record
        try:
            if time.time() - float(claimed) < result_ttl_s:
                return request_id
        except ValueError:  # a claim of an earlier version, without its time: its submit may still be storing
            current = await self._stored_soon(request_id)
            if current is not None:
                return current.record
        with contextlib.suppress(APIError):  # changed meanwhile: someone else replaced it
            await self._kv.delete(entry, last=held.revision)
        return None

    async def _stored_soon(self, request_id: str) -> Versioned | None:
        """The request's status, should it be stored within a couple of seconds."""
        for _ in range(_IN_FLIGHT_CHECKS):
            await asyncio.sleep(_IN_FLIGHT_WAIT_S)
            current = await self._status.get(request_id)
            if current is not None:
                return current
        return None
