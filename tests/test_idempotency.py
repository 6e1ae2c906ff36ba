"""Idempotency-Key (SPEC §2): the same key to the same function, through either dialect, returns the
first request instead of queueing again; the same key on another function is a new request."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.stack import Stack


async def test_the_same_key_returns_the_first_request_through_either_dialect(stack: Stack) -> None:
    await stack.register("echo")
    key = {"Idempotency-Key": "order-42"}

    first = await stack.client.post("/queue/echo", json={"n": 1}, headers=key)
    first_id = first.json()["request_id"]
    await stack.wait_for_status("echo", first_id)
    again = await stack.client.post("/queue/echo", json={"n": 2}, headers=key)
    openfaas = await stack.client.post("/async-function/echo", content=b"3", headers=key)

    assert again.status_code == 200
    assert again.json()["request_id"] == first_id
    assert openfaas.status_code == 202
    assert openfaas.headers["x-call-id"] == first_id
    assert [seen.body for seen in stack.functions.on("/echo")] == [b'{"n":1}']


async def test_concurrent_submits_with_one_key_make_one_request(stack: Stack) -> None:
    await stack.register("echo")

    responses = await asyncio.gather(
        *(stack.client.post("/queue/echo", json={}, headers={"Idempotency-Key": "burst"}) for _ in range(8))
    )

    assert len({r.json()["request_id"] for r in responses}) == 1


async def test_the_same_key_on_another_function_is_a_new_request(stack: Stack) -> None:
    await stack.register("one")
    await stack.register("two")
    key = {"Idempotency-Key": "shared"}

    first = (await stack.client.post("/queue/one", json={}, headers=key)).json()["request_id"]
    second = (await stack.client.post("/queue/two", json={}, headers=key)).json()["request_id"]

    assert first != second


@pytest.mark.parametrize("key", ["", "k" * 257])
async def test_an_unusable_key_is_refused(stack: Stack, key: str) -> None:
    await stack.register("echo")

    response = await stack.client.post("/queue/echo", json={}, headers={"Idempotency-Key": key})

    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["detail"]
