"""A delivery whose attempt another delivery of the same message superseded (a worker paused past
the ack wait, a NATS outage longer than it) must not settle the message: nats-server takes an ack
or nak sent for an earlier delivery as one for the message. Found by a fault probe from outside:
the stale ack deleted the message under the attempt that held it, and when that worker then
crashed the request stayed IN_PROGRESS for ever."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats
import yaml

from jetspool.domain import names
from tests.support.processes import JetspoolProcess, start_part
from tests.support.relay import Relay
from tests.support.servers import Reply, eventually_true
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from jetspool.embedded import EmbeddedNats
    from tests.support.stack import Stack

_ACK_WAIT_S = 2.5  # the owning worker signals every 0.83 s: a stall of a loaded machine does not hand its call on
_SETTINGS = {"worker": {"ack_wait": _ACK_WAIT_S, "poll_interval": 0.2}}


@dataclass
class _TakenOver:
    """A request whose attempt 1 runs on the first worker and attempt 2 on the second, both calls held."""

    stack: Stack
    request_id: str
    first: JetspoolProcess
    second: JetspoolProcess


@contextlib.asynccontextmanager
async def _taken_over(
    nats_server: EmbeddedNats, tmp_path: Path, worker_settings: dict[str, Any], replies: list[Reply]
) -> AsyncIterator[_TakenOver]:
    """The first worker is paused past the ack wait, a second takes the redelivery, then the first
    resumes. `replies`: how the calls answer, in the order they are released."""
    stack = await start_stack(nats_server, worker=False, overrides=_SETTINGS)
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(worker_settings), encoding="utf-8")
    workers = [start_part("worker", config, nats_server.url)]
    try:
        await asyncio.to_thread(workers[0].wait_for_text, "worker ready", 60)
        await stack.register("echo")
        stack.functions.hold("/echo")
        stack.functions.script("/echo", replies)
        request_id = await stack.submit("echo", content=b"x")
        await stack.functions.wait_for("/echo", 1)  # attempt 1, on the first worker

        os.kill(workers[0].process.pid, signal.SIGSTOP)  # its in-progress acks stop
        workers.append(start_part("worker", config, nats_server.url))
        await stack.functions.wait_for("/echo", 2, timeout_s=30)  # redelivered: attempt 2, on the second
        os.kill(workers[0].process.pid, signal.SIGCONT)
        yield _TakenOver(stack, request_id, *workers)
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signal.SIGCONT)
            worker.kill_tree()
        await stack.close()


async def test_a_superseded_attempt_leaves_the_message_to_the_attempt_that_owns_it(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    async with _taken_over(nats_server, tmp_path, _SETTINGS, []) as run:
        run.stack.functions.release("/echo")  # attempt 1 answers; its outcome no longer counts
        await asyncio.to_thread(run.first.wait_for_text, "outcome of attempt 1 dropped", 30)

        run.second.process.kill()  # the worker that owns the request dies mid-call
        run.stack.functions.release("/echo", 2)  # the dead worker's call, and the next attempt
        final = await run.stack.wait_for_status("echo", run.request_id, timeout_s=30)

    assert (final["status"], final["attempts"]) == ("COMPLETED", 3), "the message outlived the stale attempt"
    assert "error_type" not in final


async def test_a_superseded_attempt_that_failed_does_not_hand_the_message_back(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Its nak would redeliver the message beside the attempt that owns it: a third attempt used to
    start while the second ran, and the second's success was dropped (found by a fault probe)."""
    retrying = {**_SETTINGS, "retry": {"initial_backoff": 0.2, "jitter": 0.0}}
    async with _taken_over(nats_server, tmp_path, retrying, [Reply(503)]) as run:
        run.stack.functions.release("/echo")  # attempt 1 answers 503: a retry, but attempt 2 owns the request
        await asyncio.to_thread(run.first.wait_for_text, "another attempt owns it; leaving this delivery alone", 30)
        with contextlib.suppress(TimeoutError):  # a redelivery would come after the 0.2 s backoff
            await run.stack.functions.wait_for("/echo", 3, timeout_s=3)
        calls = len(run.stack.functions.on("/echo"))
        run.stack.functions.release("/echo", 5)
        final = await run.stack.wait_for_status("echo", run.request_id, timeout_s=30)

    assert calls == 2, "no third attempt beside the second"
    assert (final["status"], final["attempts"]) == ("COMPLETED", 2)
    assert "error_type" not in final


async def test_a_redelivery_of_a_request_this_worker_runs_waits_for_that_call(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A worker cut off from NATS for longer than the ack wait gets the message redelivered while it
    still runs its call; it used to start a second call beside the first.

    Only the worker's link is cut, and nats-server stays up: its ack-wait timer then queues the
    redelivery during the outage. A restarted server counts the ack wait afresh from its restart,
    and the worker's in-progress signal sent on reconnecting could win that race: no redelivery
    came, one CI run in many."""
    stack = await start_stack(nats_server, worker=False, overrides=_SETTINGS)
    relay = Relay(nats_server.url)
    await relay.start()
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(_SETTINGS), encoding="utf-8")
    worker = start_part("worker", config, relay.url)
    try:
        await asyncio.to_thread(worker.wait_for_text, "worker ready", 60)
        await stack.register("echo")
        stack.functions.hold("/echo")
        request_id = await stack.submit("echo", content=b"x")
        await stack.functions.wait_for("/echo", 1)

        relay.cut()
        await asyncio.sleep(2 * _ACK_WAIT_S)  # the outage itself: longer than the ack wait
        await relay.mend()
        await eventually_true(lambda: _redelivered(nats_server.url), timeout_s=30)
        stack.functions.release("/echo")
        final = await stack.wait_for_status("echo", request_id, timeout_s=30)
    finally:
        stack.functions.release("/echo", 5)
        worker.kill_tree()
        await relay.stop()
        await stack.close()

    assert (final["status"], final["attempts"]) == ("COMPLETED", 1)
    assert len(stack.functions.on("/echo")) == 1, "one call, though the message was delivered twice"


async def _redelivered(url: str) -> bool:
    async with await nats.connect(url) as nc:
        info = await nc.jetstream().consumer_info(names.QUEUE_STREAM, names.queue_consumer("echo", "normal"))
    return bool(info.num_redelivered)


async def test_a_late_answer_from_before_a_retry_does_not_complete_the_new_run(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A worker paused through a cancel and a retry of its request answers late: the retry route's
    run starts with the attempt count where the last run stopped, so a fence on the attempt alone
    let that answer complete the new run, which was then never delivered (found by a race review).
    Completions are fenced on the run too."""
    stack = await start_stack(nats_server, worker=False, overrides=_SETTINGS)
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(_SETTINGS), encoding="utf-8")
    paused = start_part("worker", config, nats_server.url)
    try:
        await asyncio.to_thread(paused.wait_for_text, "worker ready", 60)
        await stack.register("echo")
        stack.functions.hold("/echo")
        stack.functions.script("/echo", [Reply(200, b"from run 1"), Reply(200, b"from run 2")])
        request_id = await stack.submit("echo", content=b"x")
        await stack.functions.wait_for("/echo", 1)
        os.kill(paused.process.pid, signal.SIGSTOP)

        cancelled = await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")
        other = await stack.start_worker()  # takes the redelivery after the ack wait: cancelled
        assert (await stack.wait_for_status("echo", request_id, timeout_s=30))["error_type"] == "cancelled"
        await other.stop()
        stack.worker = None
        retried = await stack.client.post(f"/queue/echo/requests/{request_id}/retry")
        stack.functions.release("/echo")  # run 1's call answers, to the paused worker
        os.kill(paused.process.pid, signal.SIGCONT)
        await asyncio.to_thread(paused.wait_for_text, f"request {request_id}: outcome of attempt 1 dropped", 30)
        await stack.functions.wait_for("/echo", 2, timeout_s=30)  # the new run is delivered
        stack.functions.release("/echo")
        final = await stack.wait_for_status("echo", request_id, timeout_s=30)
        result = await stack.client.get(f"/queue/echo/requests/{request_id}")
    finally:
        stack.functions.release("/echo", 5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(paused.process.pid, signal.SIGCONT)
        paused.kill_tree()
        await stack.close()

    assert (cancelled.status_code, retried.status_code) == (202, 202)
    assert [seen.header("x-attempt") for seen in stack.functions.on("/echo")] == ["1", "2"]
    assert (final["attempts"], "error_type" in final) == (2, False)
    assert result.content == b"from run 2"


async def test_pulls_held_through_an_outage_take_no_more_than_the_free_slots(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A worker cut off from NATS while idle went on pulling; nats-py held each pull request and
    sent them all on reconnecting, and the worker kept every request they brought: several times
    its free slots, with no in-progress signal. Past the ack wait another worker ran them, and
    once its slots freed the first ran them again beside it (found by a review). It takes what its
    slots allow and hands the rest back at once."""
    stack = await start_stack(nats_server, worker=False, overrides=_SETTINGS)
    relay = Relay(nats_server.url)
    await relay.start()
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(_SETTINGS), encoding="utf-8")
    workers = [start_part("worker", config, relay.url)]
    try:
        await asyncio.to_thread(workers[0].wait_for_text, "worker ready", 60)
        await stack.register("echo", concurrency=2)
        stack.functions.hold("/echo")
        relay.cut()
        await asyncio.sleep(9.0)  # the outage itself: its pulls time out, 2 s each, a class at a time
        keyed = [await stack.submit("echo", content=b"x", headers={"Idempotency-Key": f"k{n}"}) for n in range(4)]
        await relay.mend()
        await stack.functions.wait_for("/echo", 2, timeout_s=30)  # the first worker's two slots

        workers.append(start_part("worker", config, nats_server.url))
        await stack.functions.wait_for("/echo", 4, timeout_s=30)  # the second takes the other two
        first_two = [seen.header("x-call-id") for seen in stack.functions.on("/echo")[:2]]
        stack.functions.release("/echo", 2)  # the first worker's calls answer; its slots free
        for request_id in first_two:
            await stack.wait_for_status("echo", request_id or "", timeout_s=30)
        later = await stack.submit("echo", content=b"after")  # the first worker takes it: its slots are free
        await stack.functions.wait_for("/echo", 5, timeout_s=30)
        calls = [seen.header("x-call-id") or "" for seen in stack.functions.on("/echo")]
    finally:
        stack.functions.release("/echo", 10)
        for worker in workers:
            worker.kill_tree()
        await relay.stop()
        await stack.close()

    assert sorted(calls) == sorted([*keyed, later]), "each request called once, none beside itself"
