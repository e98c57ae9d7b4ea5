"""10-minute rollups, the 1h/1d/1w Redis windows and the daily/weekly summaries on real services.

Events go into closed windows of the week before last (so the stream's own window updates do
not touch them), the stream fills ClickHouse, and the Dagster jobs roll them up. Every result is
compared with PostgreSQL directly: after inserts, after late events, updates (to other content,
to another window) and deletes, and after re-running partitions.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import dagster as dg
import polars as pl
import pytest
import redis

from engagement_dagster.assets.rollups import (
    WINDOW_FMT,
    late_change_sensor,
    redis_check_result,
    rollup_check_result,
    summary_sensor,
)
from engagement_dagster.definitions import defs
from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.redis import read_window
from engagement_dagster.lib.source_db import connect
from engagement_dagster.lib.windows import Window, window_start, window_top_key
from tests.support import VALID_EVENT, drain, insert_event, sql

TTL_10M = 4321  # set through the environment below: the TTLs are configuration
A, B, C, UNKNOWN = (str(uuid.uuid4()) for _ in range(4))
U1, U2, U3 = (str(uuid.uuid4()) for _ in range(3))

# The last 10 minutes of the week before last: also the last of its hour and day. Every window
# here closed long ago, so only the rollups write their Redis keys.
WEEK = window_start("1w", datetime.now(UTC)) - timedelta(days=7)
LAST = WEEK + timedelta(days=7, minutes=-10)  # Sunday 23:50
EARLY = LAST - timedelta(minutes=30)  # Sunday 23:20, same hour
MORNING = WEEK + timedelta(days=6, hours=5)  # Sunday 05:00, same day, other hour
MIDWEEK = WEEK + timedelta(days=2, hours=10)  # Wednesday 10:00
ROLLED = (EARLY, MORNING, MIDWEEK, LAST)

# The Redis windows the jobs rewrite, and what PostgreSQL says they hold.
REDIS_WINDOWS: list[tuple[Window, datetime]] = [
    *(("10m", w) for w in ROLLED),
    ("1h", window_start("1h", LAST)),
    ("1h", window_start("1h", MORNING)),
    ("1d", window_start("1d", LAST)),
    ("1d", window_start("1d", MIDWEEK)),
    ("1w", WEEK),
]
SIZE = {"10m": 600, "1h": 3600, "1d": 86_400, "1w": 604_800}

# DESIGN §5 from the source: pct = round(100 * seconds / length, 2) when both are known and the
# length positive; the test data has no rounding ties.
PCT = """CASE WHEN c.length_seconds > 0 AND e.duration_ms IS NOT NULL
         THEN round(100 * (e.duration_ms / 1000.0) / c.length_seconds, 2) END"""
POSTGRES_BY_CONTENT = f"""
SELECT e.content_id::text, count(*), sum(coalesce(e.duration_ms, 0)), coalesce(sum({PCT}), 0),
       count({PCT}), count(DISTINCT e.user_id)
  FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id
 WHERE {VALID_EVENT} AND e.event_ts >= %(start)s AND e.event_ts < %(end)s
 GROUP BY 1
"""
POSTGRES_BY_TYPE = f"""
SELECT c.content_type, count(*), sum(coalesce(e.duration_ms, 0)) / 1000.0,
       avg(e.duration_ms) / 1000.0, coalesce(sum({PCT}), 0), count({PCT}), avg({PCT}),
       count(DISTINCT e.user_id)
  FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id
 WHERE {VALID_EVENT} AND e.event_ts >= %(start)s AND e.event_ts < %(end)s
 GROUP BY 1
"""


FK = "engagement_events_content_id_fkey"  # unknown content must still count


@pytest.fixture(scope="module")
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture(scope="module")
def rollup_db(source_dsn: str, clean_sinks: Settings) -> Iterator[Settings]:
    """Known events in closed windows, streamed into ClickHouse; a short 10m TTL from env.

    Kafka topics of the module's own: the session's keep what earlier modules wrote, and
    `window_reconciles_across_sinks` counts every message of a window in the topic. Events an
    earlier module wrote into these windows (test_backfill moves events a day back, into last
    Sunday on a Wednesday) were counted, and the check failed ("kafka differs: 1 event more")."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ENGAGEMENT_WINDOW_TTL_10M_SECONDS", str(TTL_10M))
        prefix = f"{clean_sinks.kafka_topic_prefix}rollups."  # deleted with the session's
        env.setenv("ENGAGEMENT_KAFKA_TOPIC_PREFIX", prefix)  # the Dagster jobs' resources
        settings = clean_sinks.model_copy(update={"kafka_topic_prefix": prefix})
        dsn = settings.pg_dsn
        sql(dsn, "ALTER TABLE engagement_events DROP CONSTRAINT IF EXISTS " + FK)
        sql(
            dsn,
            "INSERT INTO content (id, slug, title, content_type, length_seconds) VALUES "
            "(%s, 'a', 'A', 'podcast', 600), (%s, 'b', 'B', 'video', 300), "
            "(%s, 'c', 'C', 'newsletter', NULL)",
            A, B, C,
        )  # fmt: skip
        for at, content, user, ms in [
            (LAST + timedelta(seconds=10), A, U1, 30_000),
            (LAST + timedelta(seconds=70), A, U2, 45_000),
            (LAST + timedelta(seconds=130), A, U1, None),
            (LAST + timedelta(seconds=200), B, U3, 100_000),
            (LAST + timedelta(seconds=260), B, U1, 12_346),
            (LAST + timedelta(seconds=320), C, U2, 5_000),
            (LAST + timedelta(seconds=599), UNKNOWN, U1, 10_000),
            (EARLY + timedelta(seconds=5), A, U3, 61_000),
            (EARLY + timedelta(seconds=50), A, U3, 7_777),
            (EARLY + timedelta(seconds=500), B, U2, 33_333),
            (MORNING, A, U1, 1_234),
            (MIDWEEK + timedelta(seconds=1), A, U2, 600_000),
            (MIDWEEK + timedelta(seconds=2), B, U1, 299_999),
            (MIDWEEK + timedelta(seconds=3), B, U1, 1),
            (MIDWEEK + timedelta(seconds=4), C, U3, 42_000),
        ]:
            insert_event(dsn, content, user, at, ms)
        drain(settings)
        yield settings


def run_window(instance: dg.DagsterInstance, start: datetime) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def("rollup_windows").execute_in_process(
        partition_key=start.strftime(WINDOW_FMT), instance=instance
    )
    assert result.success
    return result


def run_summaries(instance: dg.DagsterInstance) -> None:
    for job, key in (("daily_summary", LAST.strftime("%Y-%m-%d")),
                     ("weekly_summary", WEEK.strftime("%Y-%m-%d"))):  # fmt: skip
        assert (
            defs.resolve_job_def(job)
            .execute_in_process(partition_key=key, instance=instance)
            .success
        )


def evaluate(sensor: dg.SensorDefinition, context: dg.SensorEvaluationContext) -> dg.SensorResult:
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def check_evaluations(result: dg.ExecuteInProcessResult) -> list[dg.AssetCheckEvaluation]:
    return [
        e
        for e in (ev.event_specific_data for ev in result.all_events)
        if isinstance(e, dg.AssetCheckEvaluation)
    ]


def checks_passed(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in check_evaluations(result)}


def failed_checks(result: dg.ExecuteInProcessResult) -> str:
    """Each failed check's description and metadata: what an assertion shows when one fails."""
    return "\n".join(
        f"{e.check_name}: {e.description}; "
        + ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in e.metadata.items())
        for e in check_evaluations(result)
        if not e.passed
    )


# --- what PostgreSQL says -------------------------------------------------------------------


def postgres_by_content(dsn: str, start: datetime, seconds: int) -> dict[str, tuple[int, ...]]:
    """content_id -> (events, engagement ms, pct x100 sum, pct count, unique users)."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            POSTGRES_BY_CONTENT, {"start": start, "end": start + timedelta(seconds=seconds)}
        )
        return {
            cid: (int(n), int(ms), round(pct * 100), int(pct_n), int(users))
            for cid, n, ms, pct, pct_n, users in cur.fetchall()
        }


def postgres_by_type(dsn: str, start: datetime, days: int) -> dict[str | None, tuple[Any, ...]]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(POSTGRES_BY_TYPE, {"start": start, "end": start + timedelta(days=days)})
        return {
            row[0]: (int(row[1]), float(row[2]), _float(row[3]), float(row[4]), int(row[5]),
                     _float(row[6]), int(row[7]))
            for row in cur.fetchall()
        }  # fmt: skip


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# --- what the sinks hold ----------------------------------------------------------------------


def clickhouse_rollup(settings: Settings, start: datetime) -> dict[str, tuple[int, ...]]:
    with clickhouse_client(settings.clickhouse_dsn) as client:
        rows = client.query(
            "SELECT toString(content_id), sum(events), sum(engagement_ms_sum), "
            "sum(engagement_pct_x100_sum), sum(engagement_pct_count), uniqExactMerge(users_state), "
            "sum(engagement_seconds_sum), sum(engagement_pct_sum), sum(unique_users) "
            "FROM engagement.engagement_rollup_10m FINAL "
            "WHERE window_start = {start:DateTime('UTC')} AND is_deleted = 0 GROUP BY 1",
            parameters={"start": start},
        ).result_rows
    for row in rows:  # the contract columns agree with the exact ones
        assert row[6] == row[2] / 1000 and abs(row[7] - row[3] / 100) < 1e-9 and row[8] == row[5]
    return {r[0]: tuple(int(v) for v in r[1:6]) for r in rows}


def clickhouse_summary(
    settings: Settings, period: str, start: datetime
) -> dict[str | None, tuple[Any, ...]]:
    table, column = {"day": ("daily_engagement_summary", "day"),
                     "week": ("weekly_engagement_summary", "week_start")}[period]  # fmt: skip
    with clickhouse_client(settings.clickhouse_dsn) as client:
        rows = client.query(
            f"SELECT content_type, events, engagement_seconds_sum, avg_engagement_seconds, "
            f"engagement_pct_sum, engagement_pct_count, avg_engagement_pct, unique_users "
            f"FROM engagement.{table} FINAL WHERE {column} = {{start:Date}} AND is_deleted = 0",
            parameters={"start": start.date()},
        ).result_rows
    return {r[0]: tuple(r[1:]) for r in rows}


def redis_window(settings: Settings, window: Window, start: datetime) -> dict[str, tuple[int, ...]]:
    """content_id -> (events, ms, pct x100, pct count), and the TTL of every key checked."""
    store = redis.Redis.from_url(settings.redis_url)
    try:
        frame = read_window(store, window, start)
        scores = store.zrange(window_top_key(window, start), 0, -1, withscores=True)
        top = cast(dict[bytes, float], dict(cast(Any, scores)))
        prefix = window_top_key(window, start).removesuffix("top")
        ttls = [store.ttl(k) for k in store.keys(prefix + "*")]
    finally:
        store.close()
    want = TTL_10M if window == "10m" else settings.window_ttls[window]
    assert ttls and all(want - 600 < t <= want for t in ttls), f"{window} {start}: TTLs {ttls}"
    # The top set: content_id -> engagement seconds (compared in ms: a score is a float).
    assert {k.decode(): round(v * 1000) for k, v in top.items()} == {
        cid: round(seconds * 1000)
        for cid, seconds in zip(frame["content_id"], frame["engagement_seconds_sum"], strict=True)
    }
    return {
        row[0]: (row[1], round(row[2] * 1000), round(row[3] * 100), row[4])
        for row in frame.iter_rows()
    }


def assert_everything_equals_postgres(settings: Settings) -> None:
    dsn = settings.pg_dsn
    for start in ROLLED:
        want = postgres_by_content(dsn, start, 600)
        assert want, f"no test data in {start}"
        assert clickhouse_rollup(settings, start) == want, f"rollup {start}"
    for window, start in REDIS_WINDOWS:
        want = {cid: v[:4] for cid, v in postgres_by_content(dsn, start, SIZE[window]).items()}
        assert redis_window(settings, window, start) == want, f"redis {window} {start}"
    for period, start, days in (("day", window_start("1d", LAST), 1), ("week", WEEK, 7)):
        want_types = postgres_by_type(dsn, start, days)
        got = clickhouse_summary(settings, period, start)
        assert set(got) == set(want_types), f"{period}: {set(got) ^ set(want_types)}"
        for content_type, expected in want_types.items():
            for name, g, w in zip(
                ("events", "seconds", "avg_seconds", "pct_sum", "pct_count", "avg_pct", "users"),
                got[content_type], expected, strict=True,
            ):  # fmt: skip
                assert (g is None) == (w is None) and (g is None or abs(g - w) < 1e-9), (
                    f"{period} {content_type} {name}: ClickHouse {g} != PostgreSQL {w}"
                )


# --- the tests -----------------------------------------------------------------------------


def test_rollups_windows_and_summaries_equal_postgres(
    rollup_db: Settings, instance: dg.DagsterInstance
) -> None:
    for start in ROLLED:  # LAST last: it closes its hour, day and week
        result = run_window(instance, start)
        assert checks_passed(result) == {
            "rollup_matches_enriched": True,
            "redis_windows_match_rollups": True,
            "window_reconciles_across_sinks": True,
        }, failed_checks(result)
    run_summaries(instance)
    assert_everything_equals_postgres(rollup_db)


def test_late_events_updates_and_deletes_reach_rollups_windows_and_summaries(
    rollup_db: Settings, instance: dg.DagsterInstance
) -> None:
    dsn = rollup_db.pg_dsn
    late = insert_event(dsn, B, U2, LAST + timedelta(seconds=400), 20_000)
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(  # moved to other content
            "UPDATE engagement_events SET content_id = %s WHERE event_ts = %s",
            (C, LAST + timedelta(seconds=70)),
        )
        cur.execute(  # moved to another window (and day)
            "UPDATE engagement_events SET event_ts = %s WHERE event_ts = %s",
            (MIDWEEK + timedelta(seconds=30), EARLY + timedelta(seconds=50)),
        )
        cur.execute("UPDATE engagement_events SET duration_ms = 5 WHERE event_ts = %s", (MORNING,))
        cur.execute(
            "DELETE FROM engagement_events WHERE event_ts = %s", (LAST + timedelta(seconds=320),)
        )
    drain(rollup_db)
    assert late

    # Any rollup run scans the changes applied since the previous scan; the sensor re-rolls.
    run_window(instance, MORNING - timedelta(minutes=10))
    tick = evaluate(late_change_sensor, dg.build_sensor_context(instance=instance))
    requests = tick.run_requests or []
    keys = sorted(r.partition_key for r in requests if r.partition_key)
    assert keys == sorted(w.strftime(WINDOW_FMT) for w in ROLLED)
    assert all(r.run_key and r.run_key.startswith(f"{r.partition_key}@") for r in requests)
    for request in requests:  # the sensor's requests, as the daemon would launch them
        assert request.partition_key is not None
        run_window(
            instance, datetime.strptime(request.partition_key, WINDOW_FMT).replace(tzinfo=UTC)
        )

    summaries = evaluate(summary_sensor, dg.build_sensor_context(instance=instance)).run_requests
    summaries = summaries or []
    assert {(r.job_name, r.partition_key) for r in summaries} >= {
        ("daily_summary", LAST.strftime("%Y-%m-%d")),
        ("daily_summary", MIDWEEK.strftime("%Y-%m-%d")),
        ("weekly_summary", WEEK.strftime("%Y-%m-%d")),
    }
    run_summaries(instance)
    assert_everything_equals_postgres(rollup_db)
    # The scan is incremental: nothing new since, so the next rollup finds nothing to re-roll.
    run_window(instance, MORNING - timedelta(minutes=10))
    later = dg.build_sensor_context(instance=instance, cursor=tick.cursor)
    assert not evaluate(late_change_sensor, later).run_requests


def _snapshot(settings: Settings) -> tuple[Any, ...]:
    with clickhouse_client(settings.clickhouse_dsn) as client:
        tables = tuple(
            client.query(
                f"SELECT * EXCEPT (computed_at{extra}) FROM engagement.{table} FINAL "
                "WHERE is_deleted = 0 ORDER BY ALL"
            ).result_rows
            for table, extra in (
                ("engagement_rollup_10m", ", users_state"),
                ("daily_engagement_summary", ""),
                ("weekly_engagement_summary", ""),
            )
        )
    store = redis.Redis.from_url(settings.redis_url)
    try:
        keys = sorted(store.keys("engagement:1*") + store.keys("engagement:10m:*"))
        values = tuple(
            (k, store.type(k), store.hgetall(k) if store.type(k) == b"hash" else
             store.zrange(k, 0, -1, withscores=True) if store.type(k) == b"zset" else
             sorted(store.smembers(k)))
            for k in keys
        )  # fmt: skip
    finally:
        store.close()
    return (*tables, values)


def test_rerunning_partitions_changes_nothing(
    rollup_db: Settings, instance: dg.DagsterInstance
) -> None:
    before = _snapshot(rollup_db)
    for start in (LAST, EARLY):
        run_window(instance, start)
    run_summaries(instance)
    assert _snapshot(rollup_db) == before
    assert_everything_equals_postgres(rollup_db)


def run_checks(settings: Settings, start: datetime) -> tuple[dict[str, bool], str]:
    """The two checks' bodies, run alone as the UI's "Execute checks" does (an in-process run of
    a checks-only selection cannot take a partition in Dagster 1.13)."""
    store = redis.Redis.from_url(settings.redis_url)
    try:
        results = {
            "rollup_matches_enriched": rollup_check_result(settings.clickhouse_dsn, start),
            "redis_windows_match_rollups": redis_check_result(
                settings.clickhouse_dsn, store, start, settings.rollup_lateness_seconds
            ),
        }
    finally:
        store.close()
    details = "\n".join(str(r.metadata["differences"].value) for r in results.values())
    return {name: r.passed for name, r in results.items()}, details


def test_checks_fail_when_a_rollup_row_or_a_redis_key_is_corrupted(
    rollup_db: Settings, instance: dg.DagsterInstance
) -> None:
    assert run_checks(rollup_db, LAST)[0] == {
        "rollup_matches_enriched": True,
        "redis_windows_match_rollups": True,
    }
    with clickhouse_client(rollup_db.clickhouse_dsn) as client:  # a newer version, one event more
        client.command(
            "INSERT INTO engagement.engagement_rollup_10m SELECT * REPLACE (events + 1 AS events, "
            "now64(6) AS computed_at) FROM engagement.engagement_rollup_10m "
            "FINAL WHERE window_start = {start:DateTime('UTC')} AND content_id = {cid:UUID} "
            "AND is_deleted = 0",
            parameters={"start": LAST, "cid": A},
        )
    passed, details = run_checks(rollup_db, LAST)
    assert passed["rollup_matches_enriched"] is False
    assert f"content_id={A}" in details and "events" in details

    run_window(instance, LAST)  # the rollup is authoritative again
    assert all(run_checks(rollup_db, LAST)[0].values())
    store = redis.Redis.from_url(rollup_db.redis_url)
    try:
        stats = window_top_key("1d", window_start("1d", LAST)).removesuffix("top") + f"stats:{B}"
        assert store.hset(stats, "events", 999) == 0  # behind the check's back
    finally:
        store.close()
    passed, details = run_checks(rollup_db, LAST)
    assert passed == {"rollup_matches_enriched": True, "redis_windows_match_rollups": False}
    assert f"content_id={B}" in details and "events 999" in details
    run_window(instance, LAST)
    assert all(run_checks(rollup_db, LAST)[0].values())


def test_rollup_columns_read_as_a_frame(rollup_db: Settings) -> None:
    """The rollup table holds the contract columns, one row per window, content and type."""
    with clickhouse_client(rollup_db.clickhouse_dsn) as client:
        frame = pl.from_arrow(
            client.query_arrow(
                "SELECT window_start, toString(content_id) AS content_id, content_type, events, "
                "engagement_seconds_sum, engagement_pct_sum, engagement_pct_count, unique_users "
                "FROM engagement.engagement_rollup_10m FINAL WHERE is_deleted = 0"
            )
        )
    assert isinstance(frame, pl.DataFrame)
    assert frame.select(
        pl.struct("window_start", "content_id", "content_type").is_unique().all()
    ).item()
    assert UNKNOWN in frame["content_id"].to_list()  # unknown content: content_type NULL
