"""The retry route: running a request that ended in an error or was cancelled again, under its id.

Its envelope (kept by `retention` when it completed) goes back on the queue as run `retries + 1`,
then the status record moves from COMPLETED back to IN_QUEUE by compare-and-set, naming that
message's stream sequence. The record decides which message is the current run:

- a worker that takes the message before the record names it hands it back for a moment;
- a message the record never comes to name (the gateway died between the two steps, or a
  concurrent retry won the compare-and-set) is dropped by the worker after a few deliveries.
  Nobody was told it was queued, so nothing accepted is lost.

Attempts keep counting across runs (so a stale worker of an earlier run stays fenced off), and
`max_attempts` counts again from the record's `attempt_base`. A start deadline
(`X-Request-Timeout`) applies to the new run afresh: as many seconds from the retry as the first
run had from its submission.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import msgspec

from jetspool.domain.messages import DeadlineJob, QueuedRequest
from jetspool.domain.status import State, utcnow
from jetspool.jetstream.status_store import StaleStatus, Versioned

if TYPE_CHECKING:
    from datetime import datetime

    from jetspool.jetstream.events import EventLog
    from jetspool.jetstream.queue import RequestQueue
    from jetspool.jetstream.retention import Retention
    from jetspool.jetstream.status_store import StatusStore


class RetryOutcome(Enum):
    REQUEUED = "re-queued"
    SUCCEEDED = "the request succeeded; only a request that ended in an error or was cancelled can be retried"
    UNFINISHED = "the request has not completed; only a completed request can be retried"
    NOT_KEPT = "the request is no longer kept for a retry"
    NOT_FOUND = "no such request"


@dataclass(frozen=True, slots=True)
class RetryAnswer:
    outcome: RetryOutcome
    current: Versioned | None
    """The record after the retry (or as found, when it was refused)."""


class Retrier:
    def __init__(self, status: StatusStore, retention: Retention, queue: RequestQueue, events: EventLog) -> None:
        self._status = status
        self._retention = retention
        self._queue = queue
        self._events = events

    async def retry(self, current: Versioned) -> RetryAnswer:
        """Re-queue the request `current` describes, if it ended in an error or was cancelled."""
        refused = self._refusal(current)
        if refused is not None:
            return RetryAnswer(refused, current)
        envelope = await self._retention.envelope(current.record.request_id)
        if envelope is None:
            return RetryAnswer(RetryOutcome.NOT_KEPT, current)
        run = current.record.retries + 1
        request = next_run(envelope, run, utcnow())
        seq = await self._queue.enqueue(request)
        while True:
            record = current.record.retried(seq)
            try:
                revision = await self._status.update(record, current.revision)
            except StaleStatus:
                reread = await self._status.get(record.request_id)
                if reread is None:
                    return RetryAnswer(RetryOutcome.NOT_FOUND, None)
                if reread.record.retries + 1 != run or self._refusal(reread) is not None:
                    # Another retry won: our message is never named, and gets dropped.
                    return RetryAnswer(self._refusal(reread) or RetryOutcome.UNFINISHED, reread)
                current = reread  # changed in another way (e.g. callback state): apply to the new revision
                continue
            await self._events.publish(record)
            if request.start_deadline is not None:
                job = DeadlineJob(
                    request_id=request.request_id, function=request.function, due_at=request.start_deadline, retry=run
                )
                await self._queue.set_deadline(job)
            return RetryAnswer(RetryOutcome.REQUEUED, Versioned(record, revision))

    @staticmethod
    def _refusal(current: Versioned) -> RetryOutcome | None:
        record = current.record
        if record.status is not State.COMPLETED:
            return RetryOutcome.UNFINISHED
        if record.error_type is None:
            return RetryOutcome.SUCCEEDED
        return None


def next_run(request: QueuedRequest, run: int, now: datetime) -> QueuedRequest:
    """Run `run` of `request` (the message of its last run), queued `now`. Its start deadline is as
    long after `now` as the first run's was after the submission: measured from the last run's
    queueing, not the submission, which would add the time before each retry to the next."""
    deadline = None
    if request.start_deadline is not None:
        deadline = now + (request.start_deadline - (request.queued_at or request.submitted_at))
    return msgspec.structs.replace(request, retry=run, queued_at=now, start_deadline=deadline)
