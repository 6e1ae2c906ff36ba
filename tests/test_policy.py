"""The worker's pure decisions (SPEC §4): which answers are retried, and how long to back off."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from jetspool.domain.errors import RetryableDelivery
from jetspool.settings import RetrySettings
from jetspool.worker.policy import SOONEST_S, backoff_s, check_response, parse_retry_after

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def _rng(seed: int) -> random.Random:
    """A seeded generator: jitter needs spread, not secrecy."""
    return random.Random(seed)  # noqa: S311


def _http_date(at: datetime) -> str:
    return format_datetime(at, usegmt=True)


# --- classification ------------------------------------------------------------------------


@pytest.mark.parametrize("status_code", [429, 502, 503, 504])
def test_overload_and_gateway_errors_are_retried(status_code: int) -> None:
    with pytest.raises(RetryableDelivery, match=str(status_code)):
        check_response(status_code, None, NOW)


@pytest.mark.parametrize("status_code", [200, 201, 202, 204, 301, 400, 401, 404, 422, 500, 501, 505])
def test_other_answers_are_outcomes_not_retries(status_code: int) -> None:
    check_response(status_code, None, NOW)  # no RetryableDelivery: the answer is recorded as the outcome


def test_retryable_answer_carries_its_retry_after_in_seconds() -> None:
    with pytest.raises(RetryableDelivery) as caught:
        check_response(503, "7", NOW)
    assert caught.value.retry_after_s == 7.0


def test_retryable_answer_carries_a_retry_after_date_as_seconds_from_now() -> None:
    with pytest.raises(RetryableDelivery) as caught:
        check_response(429, _http_date(NOW + timedelta(seconds=45)), NOW)
    assert caught.value.retry_after_s == 45.0


def test_retryable_answer_without_retry_after_carries_none() -> None:
    with pytest.raises(RetryableDelivery) as caught:
        check_response(502, None, NOW)
    assert caught.value.retry_after_s is None


def test_retryable_answer_with_an_unreadable_retry_after_carries_none() -> None:
    with pytest.raises(RetryableDelivery) as caught:
        check_response(504, "later", NOW)
    assert caught.value.retry_after_s is None


# --- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("1", 1.0), ("120", 120.0), (" 30 ", 30.0)])
def test_retry_after_in_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_http_date_in_the_future_is_seconds_from_now() -> None:
    assert parse_retry_after("Tue, 02 Jan 2024 03:05:35 GMT", NOW) == 90.0


def test_retry_after_http_date_with_numeric_utc_offset() -> None:
    assert parse_retry_after("Tue, 02 Jan 2024 03:05:35 -0000", NOW) == 90.0


def test_retry_after_http_date_is_measured_from_the_given_now() -> None:
    value = _http_date(NOW + timedelta(minutes=10))
    assert parse_retry_after(value, NOW) == 600.0
    assert parse_retry_after(value, NOW + timedelta(minutes=4)) == 360.0


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(seconds=-1), timedelta(days=-400)])
def test_retry_after_http_date_not_in_the_future_means_no_wait(delta: timedelta) -> None:
    assert parse_retry_after(_http_date(NOW + delta), NOW) == 0.0


@pytest.mark.parametrize("value", ["", "   ", "soon", "-5", "1.5", "5s", "Tue, 32 Foo 2024"])
def test_unreadable_retry_after_is_ignored(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


def test_missing_retry_after_is_none() -> None:
    assert parse_retry_after(None, NOW) is None


def test_retry_after_with_non_ascii_digits_is_ignored() -> None:
    assert parse_retry_after("\u00b2", NOW) is None


# --- backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 32.0), (7, 60.0), (8, 60.0), (50, 60.0)],
)
def test_backoff_doubles_from_the_initial_backoff_up_to_the_cap(attempt: int, seconds: float) -> None:
    settings = RetrySettings(jitter=0.0)
    assert backoff_s(attempt, settings, None, _rng(1)) == seconds


@pytest.mark.parametrize("attempt", [1100, 100_000])
def test_backoff_of_an_attempt_counted_in_thousands_is_the_cap(attempt: int) -> None:
    """A job tried again without a bound (a timer job) counts thousands of deliveries: the growth
    overflowed a float, and the error ended the job's handling."""
    assert backoff_s(attempt, RetrySettings(jitter=0.0), None, _rng(1)) == 60.0


def test_backoff_follows_the_configured_initial_multiplier_and_cap() -> None:
    settings = RetrySettings(initial_backoff=0.5, multiplier=3.0, max_backoff=10.0, jitter=0.0)
    delays = [backoff_s(attempt, settings, None, _rng(1)) for attempt in range(1, 6)]
    assert delays == [0.5, 1.5, 4.5, 10.0, 10.0]


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6, 7, 8, 20])
def test_jitter_stays_within_its_fraction_of_the_delay(attempt: int) -> None:
    settings = RetrySettings()
    base = min(2.0 ** (attempt - 1), 60.0)
    rng = _rng(20240102)
    delays = [backoff_s(attempt, settings, None, rng) for _ in range(500)]
    assert all(base * 0.8 <= delay <= base * 1.2 for delay in delays)
    assert min(delays) < base * 0.9
    assert max(delays) > base * 1.1


def test_jitter_fraction_is_configurable() -> None:
    settings = RetrySettings(initial_backoff=10.0, jitter=0.5)
    rng = _rng(7)
    delays = [backoff_s(1, settings, None, rng) for _ in range(500)]
    assert all(5.0 <= delay <= 15.0 for delay in delays)
    assert min(delays) < 6.0
    assert max(delays) > 14.0


def test_backoff_with_the_same_seed_is_reproducible() -> None:
    settings = RetrySettings()
    first = [backoff_s(attempt, settings, None, _rng(42)) for attempt in range(1, 9)]
    second = [backoff_s(attempt, settings, None, _rng(42)) for attempt in range(1, 9)]
    assert first == second


@pytest.mark.parametrize("retry_after", [3.0, 60.0, 120.0, 599.0, 600.0])
def test_retry_after_sets_the_wait_even_above_the_backoff_cap(retry_after: float) -> None:
    assert backoff_s(1, RetrySettings(), retry_after, _rng(1)) == retry_after


def test_a_retry_after_of_0_is_the_soonest_hand_back_not_a_plain_nak() -> None:
    assert backoff_s(1, RetrySettings(), 0.0, _rng(1)) == SOONEST_S > 0


def test_retry_after_is_not_jittered() -> None:
    rng = _rng(3)
    assert {backoff_s(4, RetrySettings(), 17.0, rng) for _ in range(50)} == {17.0}


@pytest.mark.parametrize("retry_after", [601.0, 3600.0, 86400.0])
def test_retry_after_is_capped_at_ten_minutes_by_default(retry_after: float) -> None:
    assert backoff_s(1, RetrySettings(), retry_after, _rng(1)) == 600.0


def test_retry_after_cap_is_configurable() -> None:
    settings = RetrySettings(max_retry_after=30.0)
    assert backoff_s(1, settings, 90.0, _rng(1)) == 30.0
