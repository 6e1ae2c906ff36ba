"""The benchmark report: a markdown section per run (appended) and a PNG of the run's figures."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

Record = dict[str, Any]

# Issue 8's targets, each: (what, how to read it off the records, comparison, bound).
_CELERY_STATED = 535.0  # completions/s of FastAPI + Celery + Redis measured in-house on a 2-core machine
_OPENFAAS_STATED = 1000.0  # OpenFaaS CE, four Go queue-workers, same kind of machine (in-house figure)


def _find(records: list[Record], workload: str, sync_interval: str | None = None) -> Record | None:
    for record in records:
        if record["workload"] == workload and sync_interval in (None, record.get("sync_interval")):
            return record
    return None


def _get(record: Record | None, *path: str) -> Any:
    value: Any = record
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def targets(records: list[Record]) -> list[tuple[str, Any, str]]:
    """(target, measured, verdict) for every target the run has figures for."""
    rows: list[tuple[str, Any, str]] = []

    def check(name: str, value: Any, ok: bool | None) -> None:
        if value is not None:
            rows.append((name, value, "n/a" if ok is None else ("met" if ok else "missed")))

    submit, e2e = _find(records, "submit", "always"), _find(records, "end_to_end", "always")
    ratio = _get(submit, "ratio_gateway_over_plain")
    check("submit throughput ≥ 0.5 x plain Litestar", ratio, ratio is not None and ratio >= 0.5)
    rate = _get(e2e, "completions_per_s")
    celery = _get(_find(records, "celery"), "completions_per_s")
    if rate is not None and celery:
        check("completions/s ≥ 4 x Celery (measured in this run)", round(rate / celery, 2), rate >= 4 * celery)
    if rate is not None:
        check(
            f"completions/s ≥ 4 x Celery's stated {_CELERY_STATED:.0f}/s",
            round(rate / _CELERY_STATED, 2),
            rate >= 4 * _CELERY_STATED,
        )
        check(
            f"completions/s ≥ 2 x OpenFaaS CE's stated {_OPENFAAS_STATED:.0f}/s",
            round(rate / _OPENFAAS_STATED, 2),
            rate >= 2 * _OPENFAAS_STATED,
        )
    p50 = _get(e2e, "at_half_max", "queue_overhead", "p50_ms")
    p99 = _get(e2e, "at_half_max", "queue_overhead", "p99_ms")
    check("queue overhead p50 ≤ 5 ms at half the max rate", p50, p50 is not None and p50 <= 5)
    check("queue overhead p99 ≤ 25 ms at half the max rate", p99, p99 is not None and p99 <= 25)
    light = _get(e2e, "at_100_per_s", "stored", "p50_ms")  # submitted → the completion's write acknowledged
    check("submit → result stored p50 ≤ 2.5 ms at 100/s", light, light is not None and light <= 2.5)
    backlog = _find(records, "backlog")
    for part in ("gateway", "worker"):
        rss = _get(backlog, "rss_mb", part)
        check(f"{part} RSS < 200 MB with the backlog waiting", rss, rss is not None and rss < 200)
    flat = _get(backlog, "p50_ratio_backlog_over_100")
    check("status p50 at the backlog ≤ 1.2 x at 100 waiting", flat, flat is not None and flat <= 1.2)
    sse = _get(_find(records, "sse_fanout"), "completed_delay", "p99_ms")
    check("SSE change → client p99 ≤ 250 ms", sse, sse is not None and sse <= 250)
    return rows


def _machine() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def _summary_lines(records: list[Record]) -> list[str]:
    lines = []
    for sync in ("always", "2m"):
        submit = _find(records, "submit", sync)
        if submit is not None:
            lines.append(
                f"| submit ({sync}) | {submit['gateway']['rps']:.0f}/s, p50 {submit['gateway']['p50_ms']} ms, "
                f"p99 {submit['gateway']['p99_ms']} ms | plain Litestar {submit['plain_litestar']['rps']:.0f}/s; "
                f"raw publish {submit['raw_nats_publish']['rps']:.0f}/s{_floor(submit)} | "
                f"{submit['ratio_gateway_over_plain']} x plain |"
            )
        e2e = _find(records, "end_to_end", sync)
        if e2e is not None:
            lines.append(
                f"| end to end ({sync}) | {e2e['completions_per_s']:.0f} completions/s; overhead p50 "
                f"{_get(e2e, 'at_half_max', 'queue_overhead', 'p50_ms')} ms at half max | direct HTTP "
                f"{e2e['direct_http']['rps']:.0f}/s | {e2e['ratio_completions_over_direct']} x direct |"
            )
            cpu = e2e.get("cpu_ms_per_completion")
            if cpu:
                spent = ", ".join(f"{part} {ms} ms" for part, ms in cpu.items())
                lines.append(f"| CPU per completion ({sync}) | {spent} | | |")
    backlog = _find(records, "backlog")
    if backlog is not None:
        lines.append(
            f"| backlog {backlog['waiting']:,} | status p50 {backlog['status_at_backlog']['p50_ms']} ms; RSS gateway "
            f"{backlog['rss_mb']['gateway']} MB, worker {backlog['rss_mb']['worker']} MB | status p50 "
            f"{_at_100(backlog)} at 100 | {backlog['p50_ratio_backlog_over_100']} x |"
        )
    sse = _find(records, "sse_fanout")
    if sse is not None:
        lines.append(
            f"| SSE {sse['streams']} streams | change → client p50 {sse['completed_delay']['p50_ms']} ms, "
            f"p99 {sse['completed_delay']['p99_ms']} ms | | |"
        )
    callbacks = _find(records, "callback_delay")
    if callbacks is not None:
        lines.append(
            f"| callbacks at {callbacks['rate_per_s']}/s | completion → receiver p50 {callbacks['delay']['p50_ms']} "
            f"ms, p99 {callbacks['delay']['p99_ms']} ms | | |"
        )
    celery = _find(records, "celery")
    if celery is not None:
        lines.append(f"| FastAPI + Celery + Redis | {celery['completions_per_s']:.0f} completions/s | | |")
    return lines


def _floor(submit: Record) -> str:
    """The HTTP + publish floor of a submit run, for its summary line (runs before it had none)."""
    floor = submit.get("http_publish_floor")
    if floor is None:
        return ""
    return f"; HTTP + publish floor {floor['rps']:.0f}/s ({submit['ratio_floor_over_plain']} x plain)"


def _throughputs(records: list[Record]) -> list[tuple[str, float]]:
    bars: list[tuple[str, float]] = []
    for sync in ("always", "2m"):
        submit = _find(records, "submit", sync)
        if submit is not None:
            if sync == "always":
                bars.append(("plain Litestar", submit["plain_litestar"]["rps"]))
                bars.append(("raw JS publish", submit["raw_nats_publish"]["rps"]))
            if "http_publish_floor" in submit:
                bars.append((f"HTTP + publish ({sync})", submit["http_publish_floor"]["rps"]))
            bars.append((f"submit ({sync})", submit["gateway"]["rps"]))
    for sync in ("always", "2m"):
        e2e = _find(records, "end_to_end", sync)
        if e2e is not None:
            if sync == "always":
                bars.append(("direct HTTP", e2e["direct_http"]["rps"]))
            bars.append((f"completions ({sync})", e2e["completions_per_s"]))
    celery = _find(records, "celery")
    if celery is not None:
        bars.append(("Celery completions", celery["completions_per_s"]))
    return bars


def _latency_series(records: list[Record]) -> list[tuple[str, Any]]:
    e2e = _find(records, "end_to_end", "always")
    return [
        ("submit (64 conns)", _get(_find(records, "submit", "always"), "gateway")),
        ("queue overhead, half max", _get(e2e, "at_half_max", "queue_overhead")),
        ("total, half max", _get(e2e, "at_half_max", "total")),
        ("stored, 100/s", _get(e2e, "at_100_per_s", "stored")),
        ("total, 100/s", _get(e2e, "at_100_per_s", "total")),
        ("SSE change -> client", _get(_find(records, "sse_fanout"), "completed_delay")),
        ("callback delay", _get(_find(records, "callback_delay"), "delay")),
        ("status at backlog", _get(_find(records, "backlog"), "status_at_backlog")),
    ]


def plot(records: list[Record], path: Path) -> bool:
    """Throughput bars and latency percentiles of the run, as a PNG; False without matplotlib."""
    try:
        import matplotlib as mpl  # noqa: PLC0415 - optional, bench only

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    bars = _throughputs(records)
    if bars:
        left.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color="#4477aa")
        left.set_xlabel("requests per second")
        left.set_title("Throughput (2 wrk threads, 64 connections)")
    labels = ["p50", "p90", "p99"]
    plotted = [
        (name, figures)
        for name, figures in _latency_series(records)
        if figures and all(f"{p}_ms" in figures for p in labels)
    ]
    for name, figures in plotted:
        right.plot(labels, [figures[f"{p}_ms"] for p in labels], marker="o", label=name)
    right.set_yscale("log")
    right.set_ylabel("milliseconds (log)")
    right.set_title("Latency distribution")
    if plotted:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(records: list[Record], out: Path, *, label: str, minutes: float, argv: list[str]) -> Path:
    """Append this run's section to `out/report.md` and its records to `out/results.jsonl`."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    png = out / f"run-{stamp}.png"
    plotted = plot(records, png)
    with (out / "results.jsonl").open("ab") as jsonl:
        for record in records:
            jsonl.write(orjson.dumps({"run": stamp, **record}) + b"\n")
    lines = [
        f"## Run {stamp}" + (f" — {label}" if label else ""),
        "",
        f"`python -m tests.bench {shlex.join(argv)}`".replace(" `", "`") + f" on commit {_commit()}, "
        f"{_machine()}; {minutes:.1f} minutes.",
        "",
        "| workload | jetspool | baseline (same run) | ratio |",
        "|---|---|---|---|",
        *_summary_lines(records),
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *(f"| {name} | {value} | {verdict} |" for name, value, verdict in targets(records)),
        "",
    ]
    if plotted:
        lines += [f"![figures of run {stamp}]({png.name})", ""]
    lines += ["<details><summary>records</summary>", "", "```json"]
    lines += [orjson.dumps(record).decode() for record in records]
    lines += ["```", "", "</details>", "", ""]
    path = out / "report.md"
    if not path.exists():
        path.write_text("# jetspool benchmark runs\n\nNewest last. `just bench` appends a section per run.\n\n")
    with path.open("a", encoding="utf-8") as report:
        report.write("\n".join(lines))
    return path


def _at_100(backlog: dict[str, Any]) -> str:
    """The status p50 at 100 waiting: before the fill, and (runs since the bracketing) after the purge."""
    before = f"{backlog['status_at_100']['p50_ms']} ms"
    after = backlog.get("status_at_100_after")
    return before if after is None else f"{before} before the fill, {after['p50_ms']} ms after the purge,"
