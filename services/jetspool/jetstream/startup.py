"""What every component does first: connect, provision, and register the configured functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jetspool.domain.errors import ConfigError
from jetspool.jetstream.connection import connect
from jetspool.jetstream.provision import Stores, ensure_function_consumers, provision
from jetspool.jetstream.registry import FunctionRegistry
from jetspool.jetstream.ridethrough import RIDE_THROUGH_S, is_transient, ride_through

if TYPE_CHECKING:
    from collections.abc import Iterable
    from contextlib import AsyncExitStack

    from jetspool.domain.functions import Function
    from jetspool.jetstream.connection import Nats
    from jetspool.settings import Settings


def check_durability(settings: Settings) -> None:
    """ConfigError for one replica on a NATS server jetspool did not start, unless accepted: a
    settings check, made before anything starts (and again by every component that connects)."""
    if settings.nats.servers and settings.nats.replicas == 1 and not settings.nats.accept_single_replica:
        raise ConfigError(
            "nats.replicas: 1 on a NATS server jetspool did not start keeps acknowledged requests through a "
            "crash of its machine only if that server fsyncs every write (jetstream sync_interval: always). "
            "Use nats.replicas: 3 on a cluster, or set nats.accept_single_replica: true to run this way."
        )


async def open_jetstream(
    settings: Settings, name: str, started: AsyncExitStack, extra_functions: Iterable[Function] = ()
) -> tuple[Nats, Stores, FunctionRegistry]:
    """Connect as `name` (closed when `started` unwinds), provision every stream and bucket, and
    write the config file's functions (and `extra_functions`) to the registry with their consumers."""
    check_durability(settings)
    conn = await connect(settings.nats, name)
    started.push_async_callback(conn.close)
    functions = [*settings.functions, *extra_functions]

    async def prepare() -> tuple[Stores, FunctionRegistry]:
        stores = await provision(conn, settings.nats.replicas, settings.events)
        registry = FunctionRegistry(stores.functions)
        for function in functions:
            await registry.ensure(function)
            await ensure_function_consumers(conn.js, function.name, settings.worker.ack_wait)
        return stores, registry

    # All of it is idempotent: on a cluster electing leaders (or busy with other components
    # starting), a step that timed out is simply done again.
    try:
        stores, registry = await ride_through(prepare, "provisioning")
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise ConfigError(_unprovisioned(settings.nats.replicas, exc)) from exc
    return conn, stores, registry


def _unprovisioned(replicas: int, exc: BaseException) -> str:
    """Why start-up stopped when JetStream would not set up the streams within the ride-through:
    on a cluster short of JetStream servers it ended in a traceback, exit code 1 or 3 (found by a
    cluster audit); SPEC §9 asks for a message naming `nats.replicas`."""
    waited = (
        f"JetStream did not set up jetspool's streams within {RIDE_THROUGH_S:g} s ({exc.__class__.__name__}: {exc})"
    )
    if replicas > 1:
        return (
            f"nats: {waited}. nats.replicas: {replicas} needs a JetStream cluster with at least {replicas} "
            "servers up, each with JetStream enabled, and a meta leader elected among them"
        )
    return f"nats: {waited}. Is the server up, with JetStream enabled?"
