"""Names are defined once (domain/names.py); infra/ and schemas/ agree with the code."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from jetspool.domain import names
from jetspool.domain.schemas import WIRE_TYPES
from jetspool.embedded import EmbeddedNats, server_binary

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ROOT / "infra" / "nats" / "single.conf"


def _setting(config: str, key: str) -> str:
    match = re.search(rf"^\s*{key}:\s*(\S+)", config, re.M)
    assert match is not None, f"{key} is set"
    return match.group(1)


def test_the_single_node_config_is_valid_for_the_bundled_server() -> None:
    result = subprocess.run(
        [str(server_binary()), "-c", str(SINGLE), "-t"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_single_node_config_matches_the_embedded_server(tmp_path: Path) -> None:
    infra = SINGLE.read_text(encoding="utf-8")
    embedded = EmbeddedNats(tmp_path).config()

    for key in ("max_payload", "sync_interval"):
        assert _setting(infra, key) == _setting(embedded, key)


def test_subjects_and_consumers_are_built_from_one_scheme() -> None:
    for priority in names.PRIORITIES:
        subject = names.queue_subject("fn", priority)
        assert subject.startswith(names.QUEUE_SUBJECTS.removesuffix(">"))
        assert subject.split(".")[-2:] == ["fn", priority]
        assert names.queue_consumer("fn", priority) == f"jetspool-fn-{priority}"
    assert names.callback_subject("fal").startswith(names.CALLBACK_SUBJECTS.removesuffix(">"))
    assert names.counter_subject("fn", "completed").startswith(names.COUNTER_SUBJECTS.removesuffix(">"))
    assert names.wake_subject("fn").startswith(names.WAKE_SUBJECTS.removesuffix(">"))


def test_schemas_name_the_streams_and_buckets_of_the_names_module() -> None:
    described = " ".join(where for _, where in WIRE_TYPES.values())
    for name in (names.QUEUE_STREAM, names.CALLBACK_STREAM, names.STATUS_BUCKET, names.FUNCTIONS_BUCKET):
        assert name in described
