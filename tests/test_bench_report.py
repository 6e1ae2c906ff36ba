"""The benchmark report's arithmetic: percentiles and target verdicts (the figures come from `just bench`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.bench import report
from tests.bench.workloads import percentiles

if TYPE_CHECKING:
    from pathlib import Path


def test_percentiles_pick_the_nearest_rank() -> None:
    figures = percentiles([float(n) for n in range(1, 101)])

    assert figures == {"n": 100, "p50_ms": 51.0, "p90_ms": 91.0, "p99_ms": 100.0, "max_ms": 100.0}
    assert percentiles([]) == {"n": 0}


def _records(submit_ratio: float, rss: float) -> list[dict[str, object]]:
    return [
        {
            "workload": "submit",
            "sync_interval": "always",
            "gateway": {"rps": 1000 * submit_ratio, "p50_ms": 10.0, "p99_ms": 20.0},
            "plain_litestar": {"rps": 1000.0},
            "raw_nats_publish": {"rps": 3000.0},
            "http_publish_floor": {"rps": 1500.0},
            "ratio_gateway_over_plain": submit_ratio,
            "ratio_floor_over_plain": 0.5,
        },
        {
            "workload": "backlog",
            "waiting": 1000,
            "rss_mb": {"gateway": rss, "worker": 50.0},
            "status_at_100": {"p50_ms": 2.0},
            "status_at_backlog": {"p50_ms": 2.2},
            "p50_ratio_backlog_over_100": 1.1,
        },
    ]


def test_targets_say_met_or_missed_for_the_figures_a_run_has() -> None:
    verdicts = {name: verdict for name, _, verdict in report.targets(_records(0.6, 250.0))}

    assert verdicts == {
        "submit throughput ≥ 0.5 x plain Litestar": "met",
        "gateway RSS < 200 MB with the backlog waiting": "missed",
        "worker RSS < 200 MB with the backlog waiting": "met",
        "status p50 at the backlog ≤ 1.2 x at 100 waiting": "met",
    }


def test_the_light_load_target_reads_when_the_result_was_stored_not_when_the_bench_saw_it() -> None:
    e2e = {
        "workload": "end_to_end",
        "sync_interval": "always",
        "completions_per_s": 500.0,
        "at_100_per_s": {"stored": {"p50_ms": 2.4}, "total": {"p50_ms": 4.0}},
    }

    rows = {name: (value, verdict) for name, value, verdict in report.targets([e2e])}

    assert rows["submit → result stored p50 ≤ 2.5 ms at 100/s"] == (2.4, "met")


def test_the_report_appends_a_section_per_run(tmp_path: Path) -> None:
    for label in ("first", "second"):
        path = report.write(_records(0.2, 70.0), tmp_path, label=label, minutes=1.0, argv=["--only", "submit"])

    text = path.read_text()
    assert text.count("## Run ") == 2
    assert "; HTTP + publish floor 1500/s (0.5 x plain) |" in text
    assert "— first" in text
    assert "— second" in text
    assert "| submit throughput ≥ 0.5 x plain Litestar | 0.2 | missed |" in text
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
