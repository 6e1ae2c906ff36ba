"""What the gateway's handlers use, built once in the app's lifespan and passed down.

A plain class on purpose: Litestar validates dataclass-typed handler arguments field by
field on every request, and this object is wiring, not input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.di import NamedDependency

if TYPE_CHECKING:
    import httpx

    from jetspool.gateway.feed import StatusFeed
    from jetspool.gateway.intake import Intake
    from jetspool.gateway.metrics import GatewayMetrics
    from jetspool.jetstream.callbacks import CallbackQueue
    from jetspool.jetstream.cancel import Canceller
    from jetspool.jetstream.connection import Nats
    from jetspool.jetstream.logs import RequestLogs
    from jetspool.jetstream.positions import QueuePositions
    from jetspool.jetstream.registry import FunctionRegistry, RegistryView
    from jetspool.jetstream.results import ResultStore
    from jetspool.jetstream.retry import Retrier
    from jetspool.jetstream.stats import StatsReader
    from jetspool.jetstream.status_store import StatusStore
    from jetspool.settings import Settings


class Gateway:
    __slots__ = (
        "callbacks",
        "canceller",
        "conn",
        "feed",
        "http",
        "intake",
        "logs",
        "metrics",
        "positions",
        "registry",
        "results",
        "retrier",
        "settings",
        "stats",
        "status",
        "view",
    )

    def __init__(
        self,
        *,
        settings: Settings,
        conn: Nats,
        intake: Intake,
        status: StatusStore,
        results: ResultStore,
        registry: FunctionRegistry,
        view: RegistryView,
        stats: StatsReader,
        positions: QueuePositions,
        canceller: Canceller,
        retrier: Retrier,
        callbacks: CallbackQueue,
        feed: StatusFeed,
        http: httpx.AsyncClient,
        logs: RequestLogs,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.conn = conn
        self.intake = intake
        self.status = status
        self.results = results
        self.registry = registry
        self.view = view
        self.stats = stats
        self.positions = positions
        self.canceller = canceller
        self.retrier = retrier
        self.callbacks = callbacks
        self.feed = feed
        self.http = http
        self.logs = logs
        self.metrics = metrics

    @property
    def base_url(self) -> str:
        return self.settings.gateway.base_url


GatewayDep = NamedDependency[Gateway]
"""How a handler asks for the gateway: `gateway: GatewayDep`."""
