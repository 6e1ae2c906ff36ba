"""API keys (SPEC §7): every route but the open ones needs a key, `/system/*` an admin key;
both header forms work; per-key rate limits answer 429 with Retry-After."""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

import pytest
from litestar.routes import HTTPRoute

from tests.support.stack import start_stack

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from jetspool.embedded import EmbeddedNats
    from tests.support.stack import Stack

USER, ADMIN = "user-key-1", "admin-key-1"
_OPEN = {"/healthz", "/readyz", "/metrics", "/schema", "/schema/openapi.json", "/ui"}
"""Open routes; so is everything under /ui/ (the dashboard's page and files hold no data)."""


@pytest.fixture
async def keyed(nats_server: EmbeddedNats) -> AsyncIterator[Stack]:
    running = await start_stack(nats_server, overrides={"auth": {"api_keys": [USER], "admin_keys": [ADMIN]}})
    yield running
    await running.close()


def _every_route(stack: Stack) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the gateway serves, parameters filled in."""
    found: list[tuple[str, str]] = []
    for route in stack.app.routes:
        if not isinstance(route, HTTPRoute) or route.path.startswith("/schema"):
            continue
        path = re.sub(r"\{request_id:str\}", str(uuid.uuid4()), route.path)
        path = re.sub(r"\{name:str\}", "echo", path)
        path = re.sub(r"\{path:path\}", "sub/path", path)
        found += [(method, path) for method in sorted(route.methods) if method not in {"HEAD", "OPTIONS"}]
    return found


def _is_open(path: str) -> bool:
    return path in _OPEN or path.startswith("/ui/")


async def test_every_route_but_the_open_ones_needs_a_key(keyed: Stack) -> None:
    stack = keyed
    routes = _every_route(stack)
    assert len(routes) >= 25, "the listing found the routes"

    for method, path in routes:
        missing = await stack.client.request(method, path)
        wrong = await stack.client.request(method, path, headers={"Authorization": "Bearer not-a-key"})
        if _is_open(path):
            assert missing.status_code not in {401, 403}, f"{method} {path} is open"
            continue
        assert missing.status_code == 401, f"{method} {path} without a key: {missing.status_code}"
        assert missing.json()["detail"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert wrong.status_code == 401, f"{method} {path} with a wrong key: {wrong.status_code}"
        named = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", path)
        # A refusal about a request names it, as every answer about one does (SPEC §2); it did not.
        assert missing.headers.get("x-request-id") == (named.group(0) if named else None), f"{method} {path}"


async def test_the_open_routes_answer_without_a_key(keyed: Stack) -> None:
    stack = keyed
    for path in ("/healthz", "/readyz", "/metrics", "/schema/openapi.json"):
        response = await stack.client.get(path)
        assert response.status_code == 200, path


@pytest.mark.parametrize("scheme", ["Bearer", "Key", "bearer"])
async def test_both_header_forms_carry_the_key(keyed: Stack, scheme: str) -> None:
    stack = keyed
    auth = {"Authorization": f"{scheme} {ADMIN}"}
    created = await stack.client.post(
        "/system/functions", json={"name": "echo", "url": stack.function_url("/echo")}, headers=auth
    )
    submitted = await stack.client.post("/queue/echo", json={"x": 1}, headers={"Authorization": f"{scheme} {USER}"})

    assert created.status_code == 201
    assert submitted.status_code == 200


async def test_admin_routes_refuse_a_key_that_is_not_an_admin_key(keyed: Stack) -> None:
    stack = keyed
    user = {"Authorization": f"Bearer {USER}"}
    admin_paths = [(m, p) for m, p in _every_route(stack) if p.startswith("/system/")]
    assert admin_paths

    for method, path in admin_paths:
        response = await stack.client.request(method, path, headers=user)
        assert response.status_code == 403, f"{method} {path}: {response.status_code}"
    listed = await stack.client.get("/system/functions", headers={"Authorization": f"Bearer {ADMIN}"})
    assert listed.status_code == 200


async def test_the_logs_url_of_a_request_needs_only_its_token(keyed: Stack) -> None:
    stack = keyed
    admin = {"Authorization": f"Bearer {ADMIN}"}
    await stack.client.post(
        "/system/functions", json={"name": "echo", "url": stack.function_url("/echo")}, headers=admin
    )
    stack.functions.hold("/echo")
    submitted = await stack.client.post("/queue/echo", json={}, headers=admin)
    request_id = submitted.json()["request_id"]
    [seen] = await stack.functions.wait_for("/echo")
    logs_url = seen.header("x-logs-url") or ""

    appended = await stack.client.post(logs_url, content=b"hello", headers={"Content-Type": "text/plain"})
    stack.functions.release("/echo")

    assert appended.status_code in {200, 202, 204}, appended.text
    assert request_id in logs_url


async def test_a_key_over_its_rate_gets_429_with_retry_after(nats_server: EmbeddedNats) -> None:
    overrides = {"auth": {"api_keys": [USER], "admin_keys": [ADMIN], "rate_limit": 0.5, "rate_burst": 2}}
    stack = await start_stack(nats_server, overrides=overrides)
    try:
        user = {"Authorization": f"Key {USER}"}
        path = f"/queue/echo/requests/{uuid.uuid4()}/status"
        answers = [(await stack.client.get(path, headers=user)) for _ in range(3)]
        other_key = await stack.client.get(path, headers={"Authorization": f"Key {ADMIN}"})
    finally:
        await stack.close()

    assert [a.status_code for a in answers] == [404, 404, 429]
    assert int(answers[2].headers["retry-after"]) >= 1
    assert answers[2].json()["detail"]
    assert other_key.status_code == 404, "each key has its own allowance"
