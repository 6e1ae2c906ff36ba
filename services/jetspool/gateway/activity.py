"""What the dashboard charts: per function, completions and failures in 10-second buckets over
the last ten minutes, and the run-time percentiles of that window.

Fed by the same status-change events as the metrics (every gateway hears all of them), so any
gateway shows the whole system's activity since it started.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

BUCKET_S: Final = 10
WINDOW_BUCKETS: Final = 60
"""Ten minutes of 10-second buckets."""
_MAX_SAMPLES: Final = 2000
"""Run times kept per function for the percentiles (the most recent ones)."""


@dataclass
class _Bucket:
    start: int
    completed: int = 0
    failed: int = 0


@dataclass
class _Function:
    buckets: deque[_Bucket] = field(default_factory=lambda: deque(maxlen=WINDOW_BUCKETS))
    run_times: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=_MAX_SAMPLES))
    """(when, seconds) of recent completed attempts."""


class Activity:
    def __init__(self) -> None:
        self._functions: dict[str, _Function] = {}

    def observe(self, function: str, *, succeeded: bool, ran_s: float | None, now: float | None = None) -> None:
        """Count one completion of `function` (`ran_s`: its final attempt's run time, when known)."""
        now = time.time() if now is None else now
        tracked = self._functions.setdefault(function, _Function())
        bucket = self._bucket(tracked, now)
        if succeeded:
            bucket.completed += 1
        else:
            bucket.failed += 1
        if ran_s is not None:
            tracked.run_times.append((now, ran_s))

    def series(self, function: str, now: float | None = None) -> dict[str, Any]:
        """The last ten minutes of `function`, oldest bucket first, gaps filled with zeros."""
        now = time.time() if now is None else now
        tracked = self._functions.get(function, _Function())
        last = _bucket_start(now)
        starts = [last - BUCKET_S * n for n in range(WINDOW_BUCKETS - 1, -1, -1)]
        counted = {b.start: b for b in tracked.buckets}
        buckets = [counted.get(start, _Bucket(start)) for start in starts]
        window_start = starts[0]
        recent = sorted(seconds for when, seconds in tracked.run_times if when >= window_start)
        return {
            "bucket_seconds": BUCKET_S,
            "starts": starts,
            "completed": [b.completed for b in buckets],
            "failed": [b.failed for b in buckets],
            "run_seconds": {"p50": _percentile(recent, 0.5), "p99": _percentile(recent, 0.99), "count": len(recent)},
        }

    @staticmethod
    def _bucket(tracked: _Function, now: float) -> _Bucket:
        start = _bucket_start(now)
        if not tracked.buckets or tracked.buckets[-1].start < start:
            tracked.buckets.append(_Bucket(start))
            return tracked.buckets[-1]
        for bucket in reversed(tracked.buckets):  # a late event: the bucket of its time
            if bucket.start == start:
                return bucket
        return tracked.buckets[-1]


def _bucket_start(now: float) -> int:
    return int(now // BUCKET_S * BUCKET_S)


def _percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list; None when it is empty."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
