"""The official fal-client package, pointed at jetspool, works unchanged (SPEC §2).

fal-client calls `https://{FAL_QUEUE_RUN_HOST}/{app}`, so the gateway serves HTTPS
(`gateway.tls_cert`/`tls_key`) and FAL_QUEUE_RUN_HOST names it with the `/queue` prefix.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.stack import start_stack
from tests.support.tls import self_signed

if TYPE_CHECKING:
    from jetspool.embedded import EmbeddedNats

ROOT = Path(__file__).resolve().parents[1]


async def test_fal_client_submit_status_events_get_subscribe_and_cancel(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    tls = self_signed(tmp_path)
    stack = await start_stack(nats_server, tls=tls)
    try:
        await stack.register("echo")
        await stack.occupy("busy")
        env = {
            **os.environ,
            "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{stack.gateway.port}/queue",
            "FAL_KEY": "jetspool:unused",
            "SSL_CERT_FILE": str(tls[0]),
        }
        driver = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tests.support.fal_driver"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert driver.returncode == 0, driver.stderr
        report = json.loads(driver.stdout)
        cancelled = await stack.status("busy", report["cancelled"])
        stack.functions.release("/busy")
    finally:
        await stack.close()

    assert report["first"] in {"Queued", "InProgress", "Completed"}
    assert report["events"][-1] == "Completed"
    assert "attempt 1 of 10 started" in report["final_logs"]
    assert report["result"] == {"prompt": "a cat"}
    assert report["subscribed"] == {"n": 2}
    assert cancelled["error_type"] == "cancelled"
