"""The dashboard (`/ui`) in a real headless Chromium against a real stack, and the two admin
routes it reads, over HTTP."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.support.servers import eventually, eventually_true
from tests.support.stack import Stack, start_stack

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from jetspool.embedded import EmbeddedNats

USER, ADMIN = "user-key-1", "admin-key-1"
# The overview refreshes every 2 s and Chromium shares two cores with the whole stack: Playwright's
# default of 5 s per expectation left little room on a loaded machine (a test audit).
expect.set_options(timeout=20_000)
SCREENSHOTS_ENV = "JETSPOOL_SCREENSHOTS"
"""A directory to copy the screenshots to (the README's comes from here); they always go to tmp_path."""


@pytest.fixture
async def keyed_stack(nats_server: EmbeddedNats) -> AsyncIterator[Stack]:
    running = await start_stack(nats_server, overrides={"auth": {"api_keys": [USER], "admin_keys": [ADMIN]}})
    running.client.headers["Authorization"] = f"Bearer {ADMIN}"
    yield running
    await running.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is needed: apt-get install chromium (.ci/run installs it)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        await launched.close()


async def _shoot(page: Page, directory: Path, name: str) -> None:
    path = directory / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    copy_to = os.environ.get(SCREENSHOTS_ENV)
    if copy_to:
        shutil.copy(path, Path(copy_to) / path.name)


@pytest.mark.timeout(120)
async def test_the_page_asks_for_a_key_follows_a_submitted_request_live_and_cancels_another(
    keyed_stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    stack = keyed_stack
    first = await stack.occupy("slow")  # `slow` runs one request at a time; this one holds its slot
    await stack.occupy("parked")  # the same for `parked`: what is submitted next waits
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    await page.goto(f"{stack.url}/ui")
    await expect(page.locator("#key-dialog")).to_be_visible()
    await page.fill("#key-input", ADMIN)
    await page.click("#key-form button")
    await expect(page.locator('#functions [data-function="slow"]')).to_be_visible()

    await page.select_option("#submit-function", "slow")
    await page.fill("#submit-body", '{"n": 1}')
    await page.click("#submit-button")
    status = page.locator("#detail-status")
    await expect(status).to_have_text("IN_QUEUE")
    mine = await page.locator("#detail").get_attribute("data-request")
    assert mine is not None
    await expect(page.locator('[data-function="slow"] [data-figure="waiting"]')).to_have_text("1")
    await _shoot(page, tmp_path, "1-queued")

    stack.functions.release("/slow")  # the first answers; mine starts, and is held in turn
    await expect(status).to_have_text("IN_PROGRESS")
    await _shoot(page, tmp_path, "2-running")
    stack.functions.release("/slow")
    await expect(status).to_have_text("COMPLETED")
    await expect(page.locator("#detail-history .status")).to_have_text(["IN_QUEUE", "IN_PROGRESS", "COMPLETED"])
    await expect(page.locator('[data-function="slow"] [data-figure="completed"]')).to_have_text("2")

    other = (await stack.client.post("/queue/parked", json={"n": 2})).json()["request_id"]
    row = page.locator(f'#recent tr[data-request="{other}"]')
    await expect(row).to_be_visible()
    await row.click()
    await expect(status).to_have_text("IN_QUEUE")
    await page.click("#detail-cancel")
    await expect(status).to_have_text("COMPLETED · cancelled")
    await expect(page.locator("#detail-cancel")).to_be_disabled()
    await expect(row.locator(".status")).to_have_text("COMPLETED · cancelled")
    await _shoot(page, tmp_path, "3-cancelled")

    assert (await stack.status("slow", mine))["status"] == "COMPLETED"
    assert (await stack.status("slow", first))["status"] == "COMPLETED"
    cancelled = await stack.status("parked", other)
    assert (cancelled["status"], cancelled["error_type"]) == ("COMPLETED", "cancelled")
    assert (await stack.client.get(f"/queue/slow/requests/{mine}")).json() == {"n": 1}
    assert errors == [], "no script error on the page"
    shots = await asyncio.to_thread(lambda: {p.name for p in tmp_path.glob("*.png")})
    assert shots == {"1-queued.png", "2-running.png", "3-cancelled.png"}
    stack.functions.release("/parked")


async def test_a_wrong_key_is_asked_again_and_a_plain_api_key_is_told_it_needs_an_admin_key(
    keyed_stack: Stack, browser: Browser
) -> None:
    page = await browser.new_page()
    await page.goto(f"{keyed_stack.url}/ui")
    await page.fill("#key-input", "not-a-key")
    await page.click("#key-form button")
    await expect(page.locator("#key-error")).to_have_text("the API key is not valid")
    await page.fill("#key-input", USER)
    await page.click("#key-form button")
    await expect(page.locator("#key-error")).to_have_text("This needs an admin key.")
    await page.fill("#key-input", ADMIN)
    await page.click("#key-form button")
    await expect(page.locator("#connection")).to_have_text("live")


async def test_the_page_and_its_files_are_open_and_anything_else_under_ui_is_404(keyed_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=keyed_stack.url) as anonymous:
        page = await anonymous.get("/ui")
        script = await anonymous.get("/ui/dashboard.js")
        style = await anonymous.get("/ui/dashboard.css")
        missing = await anonymous.get("/ui/secrets.txt")
        data = await anonymous.get("/system/dashboard")

    assert (page.status_code, page.headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert '<script src="/ui/dashboard.js">' in page.text
    assert (script.status_code, style.status_code) == (200, 200)
    assert script.headers["content-type"].startswith("text/javascript")
    assert missing.status_code == 404
    assert data.status_code == 401, "the figures need a key"


async def test_the_overview_needs_an_admin_key_and_counts_completions_in_the_last_minutes(
    keyed_stack: Stack,
) -> None:
    stack = keyed_stack
    await stack.register("echo")
    ids = [await stack.submit("echo", content=b"{}") for _ in range(3)]
    for request_id in ids:
        await stack.wait_for_status("echo", request_id)

    as_user = await stack.client.get("/system/dashboard", headers={"Authorization": f"Bearer {USER}"})

    async def echo_figures() -> dict[str, Any]:
        overview = (await stack.client.get("/system/dashboard")).json()
        (echo,) = [f for f in overview["functions"] if f["name"] == "echo"]
        return dict(echo)

    async def all_counted() -> bool:
        completed: list[int] = (await echo_figures())["activity"]["completed"]
        return sum(completed) == len(ids)

    await eventually_true(all_counted)
    echo = await echo_figures()
    assert as_user.status_code == 403
    assert echo["stats"]["completed"] == len(ids)
    assert len(echo["activity"]["completed"]) == 60
    assert echo["activity"]["run_seconds"]["count"] == len(ids)
    assert echo["activity"]["run_seconds"]["p50"] is not None


async def test_the_event_feed_sends_the_latest_events_then_new_ones(keyed_stack: Stack) -> None:
    stack = keyed_stack
    await stack.register("echo")
    before = await stack.submit("echo", content=b"{}")
    await stack.wait_for_status("echo", before)
    heard: list[dict[str, Any]] = []

    async def read() -> None:
        async with stack.client.stream("GET", "/system/dashboard/events?limit=2") as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    heard.append(orjson.loads(line[5:]))

    reader = asyncio.create_task(read())
    try:
        await eventually(lambda: len(heard) >= 2)
        after = await stack.submit("echo", content=b"{}")
        await eventually(lambda: any(e["request_id"] == after and e["type"] == "succeeded" for e in heard))
    finally:
        reader.cancel()

    assert [(e["request_id"], e["type"]) for e in heard[:2]] == [(before, "started"), (before, "succeeded")]
    assert [e["type"] for e in heard[2:] if e["request_id"] == after] == ["queued", "started", "succeeded"]


@pytest.mark.parametrize("limit", ["-1", "501", "many"])
async def test_a_bad_event_limit_is_refused_with_422(keyed_stack: Stack, limit: str) -> None:
    response = await keyed_stack.client.get(f"/system/dashboard/events?limit={limit}")

    assert response.status_code in {400, 422}
    assert "limit" in response.text
