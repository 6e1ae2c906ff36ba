"""Finding a request for a route: by id, under its function (or any, for the legacy fal paths)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jetspool.domain.errors import NotFound
from jetspool.gateway.intake import parse_request_id

if TYPE_CHECKING:
    from jetspool.gateway.state import Gateway
    from jetspool.jetstream.status_store import Versioned


async def find_request(gateway: Gateway, name: str | None, request_id: str) -> Versioned | None:
    """The status of `request_id` under function `name` (any function when None); None when unknown.

    422 for a malformed id."""
    request_id = parse_request_id(request_id)
    current = await gateway.status.get(request_id)
    if current is None or (name is not None and current.record.function != name):
        return None
    return current


async def require_request(gateway: Gateway, name: str | None, request_id: str) -> Versioned:
    """Like `find_request`, 404 when unknown."""
    current = await find_request(gateway, name, request_id)
    if current is None:
        raise NotFound(f"request {request_id} not found" + ("" if name is None else f" for function {name!r}"))
    return current
