"""`just bench`: every benchmark workload against real processes on 127.0.0.1, one JSON record
per workload on stdout, and a section with a PNG appended to the markdown report.

    python -m tests.bench [--only submit,end_to_end,...] [--backlog 1000000] [--quick] [--celery]

Workloads (issue 8): submit, end_to_end, durability (both under `sync_interval: 2m` beside the
default `always`), backlog, sse_fanout, callback_delay, and with --celery the FastAPI + Celery +
Redis comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from tests.bench import report, workloads

WORKLOADS = ("submit", "end_to_end", "durability", "backlog", "sse_fanout", "callback_delay")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads to run")
    parser.add_argument("--seconds", type=float, default=10, help="length of each closed-loop submit run")
    parser.add_argument("--e2e-seconds", type=float, default=10, help="length of the closed-loop end-to-end run")
    parser.add_argument("--paced-seconds", type=float, default=5, help="length of each paced run")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="waiting requests of the backlog run")
    parser.add_argument("--streams", type=int, default=1000, help="open SSE status streams")
    parser.add_argument("--callbacks", type=int, default=500, help="callbacks of the callback-delay run")
    parser.add_argument("--celery", action="store_true", help="also run the FastAPI + Celery + Redis comparison")
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that the suite runs")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="where the report and plots go")
    parser.add_argument("--label", default="", help="a note on this run, shown in the report")
    return parser


async def _run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(WORKLOADS) - {"celery"}
    if unknown:
        raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")
    if args.celery and "celery" not in chosen:
        chosen.append("celery")
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
        sys.stdout.flush()

    for n, name in enumerate(chosen):
        for record in await _workload(name, args, root / f"{n}-{name}"):
            emit(record)
    return records


async def _workload(name: str, args: argparse.Namespace, where: Path) -> list[dict[str, Any]]:
    """The records of workload `name` (the durability workload gives two), each with its time taken."""
    started = time.perf_counter()
    if name == "submit":
        records = [await workloads.submit(where, "always", args.seconds)]
    elif name == "end_to_end":
        records = [await workloads.end_to_end(where, "always", args.e2e_seconds, args.paced_seconds)]
    elif name == "durability":
        records = [await workloads.submit(where / "submit", "2m", args.seconds)]
        records.append(await workloads.end_to_end(where / "e2e", "2m", args.e2e_seconds, args.paced_seconds))
    elif name == "backlog":
        records = [await workloads.backlog(where, args.backlog, 400)]
    elif name == "sse_fanout":
        records = [await workloads.sse_fanout(where, args.streams)]
    elif name == "callback_delay":
        records = [await workloads.callback_delay(where, args.callbacks, 100)]
    else:
        from tests.bench import celery_compare  # noqa: PLC0415 - optional dependencies

        records = [await asyncio.to_thread(celery_compare.run, where, args.e2e_seconds)]
    elapsed = round(time.perf_counter() - started, 1)
    return [record | {"workload_s": elapsed} for record in records]


def main() -> None:
    args = _parser().parse_args()
    if args.quick:
        args.seconds, args.e2e_seconds, args.paced_seconds = 3, 3, 2
        args.backlog, args.streams, args.callbacks = 5000, 100, 50
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jetspool-bench-") as root:
        records = asyncio.run(_run(args, Path(root)))
    minutes = (time.perf_counter() - started) / 60
    path = report.write(records, args.out, label=args.label, minutes=minutes, argv=sys.argv[1:])
    sys.stdout.write(f"report: {path}\n")


if __name__ == "__main__":
    main()
