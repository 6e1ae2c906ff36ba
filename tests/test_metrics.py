"""`/metrics` (Prometheus text) after a known workload shows the counts it should."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import Reply, eventually_true
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from jetspool.embedded import EmbeddedNats
    from tests.support.stack import Stack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _scrape(stack: Stack) -> Samples:
    response = await stack.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.mark.timeout(90)
async def test_metrics_count_a_known_workload(nats_server: EmbeddedNats) -> None:
    stack = await start_stack(nats_server, overrides={"callbacks": {"max_attempts": 1}})
    try:
        await stack.register("echo")
        stack.functions.script("/echo", [Reply(500, b"boom"), Reply(503), Reply(200, b"after a retry")])
        stack.receiver.script("/refuses", [Reply(500)])
        ids = [await stack.submit("echo", content=b"first", headers={"X-Callback-Url": stack.callback_url("/ok")})]
        ids += [await stack.submit("echo", content=b"second")]
        ids += [await stack.submit("echo", headers={"X-Callback-Url": stack.callback_url("/refuses")})]
        ids += [await stack.submit("echo", content=str(n).encode()) for n in range(3)]
        for request_id in ids:
            await stack.wait_for_status("echo", request_id)
        await stack.occupy("busy")
        waiting = await stack.submit("busy")
        assert (await stack.client.put(f"/queue/busy/requests/{waiting}/cancel")).status_code == 202

        expected = {
            ("jetspool_completed_total", "echo"): 5,
            ("jetspool_failed_total", "echo"): 1,
            ("jetspool_retried_total", "echo"): 1,
            ("jetspool_cancelled_total", "echo"): 0,
            ("jetspool_failed_total", "busy"): 1,
            ("jetspool_cancelled_total", "busy"): 1,
            ("jetspool_callbacks_delivered_total", "echo"): 1,
            ("jetspool_callbacks_failed_total", "echo"): 1,
            ("jetspool_run_seconds_count", "echo"): 6,
            ("jetspool_queue_wait_seconds_count", "echo"): 6,
            ("jetspool_requests_in_progress", "busy"): 1,
        }
        samples: Samples = {}

        async def as_expected() -> bool:
            samples.update(await _scrape(stack))
            return all(_value(samples, name, function=f) == count for (name, f), count in expected.items())

        try:
            await eventually_true(as_expected, timeout_s=20, interval_s=0.2)
        except TimeoutError:
            seen = {key: _value(samples, key[0], function=key[1]) for key in expected}
            raise AssertionError(f"expected {expected}, scraped {seen}") from None
        stack.functions.release("/busy")
    finally:
        await stack.close()

    assert _value(samples, "jetspool_requests_waiting", function="busy", priority="normal") == 0
    assert _value(samples, "jetspool_requests_waiting", function="echo", priority="high") == 0
    latency = "jetspool_gateway_request_seconds_count"
    assert _value(samples, latency, method="POST", route="/async-function/{name}", status="202") == 7
    assert _value(samples, "jetspool_run_seconds_bucket", function="echo", le="+Inf") == 6


async def test_a_scrape_while_nats_does_not_answer_gives_the_gateways_own_figures_in_time(
    nats_server: EmbeddedNats,
) -> None:
    """It waited 31 s for a 503, blind to everything, beyond Prometheus's 10 s scrape timeout
    (found by an audit): now the queue figures are left out and say so."""
    stack = await start_stack(nats_server, worker=False)
    try:
        await stack.register("echo")
        before = await _scrape(stack)
        os.kill(nats_server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            during = await _scrape(stack)
            took_s = time.monotonic() - started
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)
    finally:
        await stack.close()

    assert _value(before, "jetspool_queue_figures_read") == 1
    assert _value(before, "jetspool_requests_waiting", function="echo", priority="normal") == 0
    assert _value(during, "jetspool_queue_figures_read") == 0
    assert _value(during, "jetspool_requests_waiting", function="echo", priority="normal") is None
    assert any(name == "jetspool_gateway_request_seconds_count" for name, _ in during)
    assert took_s < 10, "within Prometheus's default scrape timeout"


async def test_requests_the_router_refuses_are_timed_too(stack: Stack) -> None:
    """A path no route serves, or a method its route does not take, went unseen: the latency
    middleware ran after routing (an audit's finding). A method HTTP does not define shows as `other`."""
    for _ in range(3):
        assert (await stack.client.get("/no/such/route")).status_code == 404
    assert (await stack.client.patch("/healthz")).status_code == 405
    assert (await stack.client.request("PROPFIND", "/healthz")).status_code == 405  # WebDAV: parsed, not HTTP

    samples = await _scrape(stack)

    latency = "jetspool_gateway_request_seconds_count"
    assert _value(samples, latency, method="GET", route="unmatched", status="404") == 3
    assert _value(samples, latency, method="PATCH", route="unmatched", status="405") == 1
    assert _value(samples, latency, method="other", route="unmatched", status="405") == 1
