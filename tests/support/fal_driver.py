"""Drives jetspool with the official fal-client, unchanged, as a user would (run in its own process:
fal-client reads FAL_QUEUE_RUN_HOST when it is imported). Prints one JSON object of what it saw."""

from __future__ import annotations

import json
import sys

import fal_client


def main() -> None:
    handle = fal_client.submit("echo", arguments={"prompt": "a cat"})
    first = handle.status(with_logs=True)
    events = [type(event).__name__ for event in handle.iter_events(with_logs=True, interval=0.05)]
    final = handle.status(with_logs=True)
    result = handle.get()
    subscribed = fal_client.subscribe("echo", arguments={"n": 2}, with_logs=True)
    waiting = fal_client.submit("busy", arguments={})
    waiting.cancel()
    report = {
        "request_id": handle.request_id,
        "first": type(first).__name__,
        "events": events,
        "final_logs": [line["message"] for line in getattr(final, "logs", None) or []],
        "result": result,
        "subscribed": subscribed,
        "cancelled": waiting.request_id,
    }
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
