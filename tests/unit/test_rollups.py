"""The rules of the rollups without services: which windows close when, which derived windows a
10-minute window rewrites, and what the time-based sensor requests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl

from engagement_dagster.assets.rollups import (
    WINDOW_FMT,
    rollup_10m_partitions_def,
    rollup_window_sensor,
    weekly_summary_partitions_def,
)
from engagement_dagster.lib.rollups import (
    compare_window,
    derived_windows_to_rewrite,
    newest_closed_window,
    windows_to_request,
)

FIRST = datetime(2026, 11, 1, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_window_closes_for_rollups_after_its_end_plus_the_lateness() -> None:
    assert newest_closed_window(at("2026-11-24 12:11:59"), 120) == at("2026-11-24 11:50")
    assert newest_closed_window(at("2026-11-24 12:12:00"), 120) == at("2026-11-24 12:00")
    assert newest_closed_window(at("2026-11-24 12:12:00"), 0) == at("2026-11-24 12:00")
    assert newest_closed_window(at("2026-11-24 12:09:59"), 0) == at("2026-11-24 11:50")


def test_the_sensor_asks_for_the_newest_window_first_then_every_one_oldest_first() -> None:
    now = at("2026-11-24 12:30:00")
    assert windows_to_request(now, lateness_s=120, after=None, first=FIRST, limit=36) == [
        at("2026-11-24 12:10")
    ]
    after_outage = windows_to_request(
        now, lateness_s=120, after=at("2026-11-24 11:20"), first=FIRST, limit=3
    )
    assert after_outage == [at("2026-11-24 11:30"), at("2026-11-24 11:40"), at("2026-11-24 11:50")]
    assert windows_to_request(now, lateness_s=120, after=at("2026-11-24 12:10"), first=FIRST,
                              limit=36) == []  # fmt: skip
    assert windows_to_request(FIRST, lateness_s=120, after=None, first=FIRST, limit=36) == []


def test_the_last_ten_minutes_of_an_hour_day_and_iso_week_rewrite_them() -> None:
    sunday_last = at("2026-11-22 23:50")  # 2026-11-23 is a Monday
    due = sunday_last + timedelta(minutes=12)
    assert derived_windows_to_rewrite(sunday_last, due, 120) == [
        ("1h", at("2026-11-22 23:00")),
        ("1d", at("2026-11-22 00:00")),
        ("1w", at("2026-11-16 00:00")),
    ]
    # A window in an hour that is still open rewrites nothing but itself; once the hour closed
    # (a re-roll after a late change), it rewrites the hour too.
    early = at("2026-11-24 10:20")
    assert derived_windows_to_rewrite(early, at("2026-11-24 10:32"), 120) == []
    assert derived_windows_to_rewrite(early, at("2026-11-24 11:02"), 120) == [
        ("1h", at("2026-11-24 10:00"))
    ]


def test_partitions_are_utc_ten_minute_windows_and_monday_weeks() -> None:
    keys = rollup_10m_partitions_def.get_partition_keys_in_range(
        dg.PartitionKeyRange("2026-11-22-23:40", "2026-11-23-00:00")
    )
    assert keys == ["2026-11-22-23:40", "2026-11-22-23:50", "2026-11-23-00:00"]
    week = weekly_summary_partitions_def.time_window_for_partition_key("2026-11-16")
    assert week.start.weekday() == 0 and week.end - week.start == timedelta(days=7)


def test_window_sensor_run_keys_are_partition_keys_and_the_cursor_moves() -> None:
    with dg.instance_for_test() as instance:
        first = rollup_window_sensor(dg.build_sensor_context(instance=instance))
        assert isinstance(first, dg.SensorResult) and first.run_requests
        (request,) = first.run_requests
        assert request.run_key == request.partition_key == first.cursor
        newest = datetime.strptime(first.cursor or "", WINDOW_FMT).replace(tzinfo=UTC)
        assert newest == newest_closed_window(datetime.now(UTC), 120) or newest < datetime.now(UTC)
        behind = (newest - timedelta(minutes=30)).strftime(WINDOW_FMT)
        later = rollup_window_sensor(dg.build_sensor_context(instance=instance, cursor=behind))
        assert isinstance(later, dg.SensorResult)
        assert [r.partition_key for r in later.run_requests or []][-1] == first.cursor
        assert len(later.run_requests or []) == 3


def test_a_redis_window_is_compared_in_exact_units() -> None:
    rollup = pl.DataFrame(
        {"content_id": ["a", "b"], "events": [2, 1], "engagement_seconds_sum": [0.3, 12.345],
         "engagement_pct_sum": [10.1, 0.0], "engagement_pct_count": [2, 0]}
    )  # fmt: skip
    redis_side = rollup.with_columns(engagement_seconds_sum=pl.Series([0.1 + 0.2, 12.345]))
    assert compare_window(redis_side, rollup)[1] == ()
    wrong = redis_side.with_columns(events=pl.Series([2, 5]))
    (difference,) = compare_window(wrong, rollup)[1]
    assert difference.startswith("content_id=b") and "events 5 != 1" in difference
    missing = compare_window(redis_side.head(1), rollup)[1]
    assert len(missing) == 1 and missing[0].startswith("content_id=b")
