"""Daily backfills and restart from a point, on the real services.

A deleted day comes back through its Dagster partition and through the lib; a second run changes
nothing; a backfill racing a live stream with updates, deletes and moves across days and months
ends, after a final drain, with ClickHouse FINAL equal to PostgreSQL; a restart from a point
continues every sink exactly.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg
import pytest

from engagement_dagster.assets.history import clickhouse_enriched_engagements, restart_from_point
from engagement_dagster.lib.backfill import REPLAY_OP, backfill_days, day_bounds
from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.generator import seed_content
from engagement_dagster.lib.pipeline import default_sinks
from engagement_dagster.lib.restart import RestartRefused, restart_from
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect
from engagement_dagster.lib.stream import Stream
from engagement_dagster.resources import (
    ClickHouseResource,
    KafkaResource,
    PostgresResource,
    RedisResource,
)
from tests.support import (
    assert_clickhouse_matches_postgres,
    assert_kafka_matches_postgres,
    assert_redis_matches_postgres,
    drain,
    streaming,
)

EVENTS_PER_DAY = 400
INVALID_PER_DAY = sum(1 for i in range(EVENTS_PER_DAY) if i % 41 == 0 and i % 17 != 0)
# A day's events spread over [start, start + span): every 17th without a duration, every 41st
# invalid (negative duration: a dead letter, never a row), unicode payloads.
INSERT_DAY = """
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,
                               raw_payload)
SELECT c.ids[1 + i %% array_length(c.ids, 1)], gen_random_uuid(),
       (ARRAY['play', 'pause', 'finish', 'click'])[1 + i %% 4],
       %(start)s::timestamptz + %(span)s::interval * i / %(n)s,
       CASE WHEN i %% 17 = 0 THEN NULL WHEN i %% 41 = 0 THEN -5 ELSE i * 997 %% 600000 END,
       (ARRAY['ios', 'android', 'web'])[1 + i %% 3],
       jsonb_build_object('i', i, 'note', 'ü€ 😀')
  FROM (SELECT array_agg(id ORDER BY slug) AS ids FROM content) c, generate_series(0, %(n)s - 1) i
"""


def utc_day(days_ago: int) -> date:
    return (datetime.now(UTC) - timedelta(days=days_ago)).date()


def execute(dsn: str, statement: str, params: object = None) -> list[tuple[object, ...]]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


def insert_day(dsn: str, day: date, n: int = EVENTS_PER_DAY) -> None:
    start, end = day_bounds(day)
    now = datetime.now(UTC) - timedelta(seconds=5)
    span = min(end, now) - start
    execute(dsn, INSERT_DAY, {"start": start, "span": span, "n": n})


def clickhouse_versions(settings: Settings) -> int:
    """Every version ClickHouse holds (not FINAL): a re-run that writes nothing keeps it."""
    with clickhouse_client(settings.clickhouse_dsn) as client:
        return int(
            client.query("SELECT count() FROM engagement.enriched_engagements").result_rows[0][0]
        )


def delete_day_from_clickhouse(settings: Settings, day: date) -> None:
    start, end = day_bounds(day)
    with clickhouse_client(settings.clickhouse_dsn) as client:
        client.command(
            "ALTER TABLE engagement.enriched_engagements DELETE WHERE event_ts >= "
            "{start:DateTime64(6, 'UTC')} AND event_ts < {end:DateTime64(6, 'UTC')} "
            "SETTINGS mutations_sync = 2",
            parameters={"start": start, "end": end},
        )


def day_ids(dsn: str, day: date) -> list[int]:
    start, end = day_bounds(day)
    rows = execute(
        dsn,
        "SELECT id FROM engagement_events WHERE event_ts >= %s AND event_ts < %s ORDER BY id",
        (start, end),
    )
    return [int(r[0]) for r in rows]  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def history(clean_sinks: Settings, source_dsn: str) -> Iterator[Settings]:
    """Four days of events (one in the previous month), all streamed into every sink. The
    stream and the backfills hand embedded ClickHouse to each other every second."""
    settings = clean_sinks.model_copy(update={"clickhouse_hold_seconds": 1.0})
    seed_content(source_dsn, 30, seed=7)
    for days_ago in (0, 1, 2, 35):
        insert_day(source_dsn, utc_day(days_ago))
    drain(settings)
    assert_clickhouse_matches_postgres(settings)
    yield settings


RESOURCES = {
    "postgres": PostgresResource(),
    "clickhouse": ClickHouseResource(),
    "redis": RedisResource(),
    "kafka": KafkaResource(),
}


def materialize_days(**kwargs: Any) -> list[dg.AssetMaterialization]:
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [clickhouse_enriched_engagements], resources=RESOURCES, instance=instance, **kwargs
        )
        assert result.success
        return result.asset_materializations_for_node("clickhouse__enriched_engagements")


def test_a_deleted_day_comes_back_through_its_dagster_partition(history: Settings) -> None:
    day = utc_day(1)
    delete_day_from_clickhouse(history, day)
    with pytest.raises(AssertionError, match="missing"):
        assert_clickhouse_matches_postgres(history)

    [materialization] = materialize_days(partition_key=day.isoformat())
    assert materialization.partition == day.isoformat()
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert metadata["rows_read"] == EVENTS_PER_DAY
    assert metadata["dead_letters"] == INVALID_PER_DAY
    assert metadata["rows_written"] == EVENTS_PER_DAY - metadata["dead_letters"]
    assert metadata["tombstones"] == 0
    assert_clickhouse_matches_postgres(history)


def test_a_range_of_days_is_one_run_from_one_snapshot(history: Settings) -> None:
    """What a UI backfill of several partitions launches (BackfillPolicy.single_run)."""
    first, last = utc_day(2), utc_day(1)
    for day in (first, last):
        delete_day_from_clickhouse(history, day)
    materializations = materialize_days(
        tags={
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": last.isoformat(),
        }
    )
    assert sorted(m.partition or "" for m in materializations) == [
        first.isoformat(), last.isoformat(),
    ]  # fmt: skip
    metadata = {k: v.value for k, v in materializations[0].metadata.items()}
    assert (metadata["days"], metadata["rows_read"]) == (2, 2 * EVENTS_PER_DAY)
    assert_clickhouse_matches_postgres(history)


def test_the_lib_restores_a_day_and_a_second_run_changes_nothing(history: Settings) -> None:
    day = utc_day(2)
    delete_day_from_clickhouse(history, day)
    first = backfill_days(history, day, day, chunk_rows=150)  # several chunks per day
    assert first.rows_written == EVENTS_PER_DAY - INVALID_PER_DAY
    assert_clickhouse_matches_postgres(history)
    with clickhouse_client(history.clickhouse_dsn) as client:
        ops = client.query(
            "SELECT DISTINCT op, source_lsn FROM engagement.enriched_engagements FINAL "
            "WHERE toDate(event_ts) = {day:Date}",
            parameters={"day": day},
        ).result_rows
    assert ops == [(REPLAY_OP, first.version)]

    versions = clickhouse_versions(history)
    again = backfill_days(history, utc_day(2), utc_day(0), chunk_rows=150)
    assert (again.rows_written, again.tombstones) == (0, 0), again
    assert again.rows_read == 3 * EVENTS_PER_DAY
    assert clickhouse_versions(history) == versions
    assert_clickhouse_matches_postgres(history)
    empty = backfill_days(history, utc_day(10), utc_day(10))  # a day nobody wrote to
    assert (empty.rows_read, empty.rows_written, empty.tombstones) == (0, 0, 0)


def test_stale_rows_go_even_when_the_stream_is_behind(history: Settings, source_dsn: str) -> None:
    """Changes the stream has not applied yet: a backfill of the day alone makes ClickHouse equal
    PostgreSQL (moves write the event where it is now, with a tombstone in its old month), and
    the stream applying them afterwards, with lower versions, changes nothing."""
    day = utc_day(1)
    ids = day_ids(source_dsn, day)
    moved_month, moved_day, deleted, invalid, updated = ids[1], ids[2], ids[3], ids[4], ids[5]
    execute(
        source_dsn,
        "UPDATE engagement_events SET event_ts = event_ts - interval '40 days' WHERE id = %s",
        (moved_month,),
    )
    execute(
        source_dsn,
        "UPDATE engagement_events SET event_ts = event_ts + interval '1 day' - interval '1 hour' "
        "WHERE id = %s",
        (moved_day,),
    )
    execute(source_dsn, "DELETE FROM engagement_events WHERE id = %s", (deleted,))
    execute(source_dsn, "UPDATE engagement_events SET duration_ms = -1 WHERE id = %s", (invalid,))
    execute(
        source_dsn, "UPDATE engagement_events SET duration_ms = 12345 WHERE id = %s", (updated,)
    )

    report = backfill_days(history, day, day)
    assert report.rows_written >= 3  # updated, and the two moved events where they are now
    assert report.tombstones >= 3  # deleted, invalid, and the old month of the month move
    assert_clickhouse_matches_postgres(history)
    drain(history)
    assert_clickhouse_matches_postgres(history)


def running_stream(settings: Settings) -> AbstractContextManager[Stream]:
    return streaming(settings, run_seconds=300, name="test-stream")


def churn(dsn: str, days: list[date], stop: threading.Event, seed: int) -> int:
    """Inserts, updates, deletes, and moves to other days and months, ~100 changes/s."""
    rng = random.Random(seed)
    changes = 0
    with connect(dsn) as conn, conn.cursor() as cur:
        while not stop.is_set():
            cur.execute("SELECT id FROM engagement_events ORDER BY random() LIMIT 1")
            row = cur.fetchone()
            if row is None:
                break
            event_id = row[0]
            action = rng.choice(["insert", "duration", "delete", "move_day", "move_month"])
            if action == "insert":
                start, _ = day_bounds(rng.choice(days))
                cur.execute(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
                    "duration_ms, device, raw_payload) SELECT content_id, user_id, event_type, "
                    "%s, duration_ms, device, raw_payload FROM engagement_events WHERE id = %s",
                    (start + timedelta(seconds=rng.randint(0, 3600)), event_id),
                )
            elif action == "duration":
                cur.execute(
                    "UPDATE engagement_events SET duration_ms = %s WHERE id = %s",
                    (rng.choice([None, -3, rng.randint(0, 900_000)]), event_id),
                )
            elif action == "delete":
                cur.execute("DELETE FROM engagement_events WHERE id = %s", (event_id,))
            elif action == "move_day":
                cur.execute(
                    "UPDATE engagement_events SET event_ts = least(event_ts + %s, now()) "
                    "WHERE id = %s",
                    (rng.choice([-1, 1]) * timedelta(days=1), event_id),
                )
            else:
                # Forward only. The stream writes a month move's old-month tombstone at the same
                # LSN as the new row, and FINAL, which collapses an event across partitions,
                # breaks that tie by partition order: a move to an earlier month loses the event
                # (a stream bug, reported; not the backfill's, which avoids the tie).
                cur.execute(
                    "UPDATE engagement_events SET event_ts = event_ts + interval '33 days' "
                    "WHERE id = %s AND event_ts < now() - interval '34 days'",
                    (event_id,),
                )
            changes += 1
            time.sleep(0.01)
    return changes


def test_backfills_racing_a_live_stream_end_exact(history: Settings, source_dsn: str) -> None:
    days = [utc_day(2), utc_day(1), utc_day(0)]
    stop = threading.Event()
    counted: list[int] = []
    worker = threading.Thread(
        target=lambda: counted.append(churn(source_dsn, days, stop, seed=5)), daemon=True
    )
    with running_stream(history):
        worker.start()
        try:
            reports = [backfill_days(history, days[0], days[-1]) for _ in range(3)]
        finally:
            stop.set()
            worker.join(timeout=30)
    assert counted and counted[0] > 50, counted
    assert all(r.rows_read > 0 for r in reports)
    drain(history)
    assert_clickhouse_matches_postgres(history)


def test_restart_from_a_point_continues_every_sink_exactly(
    history: Settings, source_dsn: str
) -> None:
    drain(history)
    with running_stream(history), pytest.raises(RestartRefused, match="is consumed by pid"):
        time.sleep(2)  # the stream has opened the slot
        restart_from(history, datetime.now(UTC))

    # Changes the old slot carries but no stream applies: the restart drops that slot. They are
    # two days old, outside the live board's 10 minutes (see the README runbook for Redis).
    day = utc_day(2)
    older = day_ids(source_dsn, day)
    execute(source_dsn, "DELETE FROM engagement_events WHERE id = %s", (older[10],))
    execute(
        source_dsn, "UPDATE engagement_events SET duration_ms = 777 WHERE id = %s", (older[11],)
    )
    insert_day(source_dsn, day, n=20)

    report = restart_from(history, datetime.combine(day, datetime.min.time(), UTC))
    assert [d.day for d in report.backfill.days] == [utc_day(2), utc_day(1), utc_day(0)]
    assert report.backfill.tombstones >= 1 and report.backfill.rows_written >= 21
    checkpoints = {}
    for sink in default_sinks(history):
        try:
            checkpoints[sink.name] = sink.read_checkpoint()
        finally:
            sink.close()
    assert set(checkpoints.values()) == {report.checkpoint}, checkpoints
    assert_clickhouse_matches_postgres(history)

    # The stream continues from the new slot: changes after the restart reach every sink.
    execute(
        source_dsn, "UPDATE engagement_events SET duration_ms = 4242 WHERE id = %s", (older[12],)
    )
    insert_day(source_dsn, utc_day(0), n=30)
    drained = drain(history)
    assert drained.first_lsn is not None and drained.first_lsn > report.checkpoint
    assert_clickhouse_matches_postgres(history)
    assert_redis_matches_postgres(history)
    assert_kafka_matches_postgres(history)


def test_the_restart_job_runs_from_the_dagster_ui(history: Settings, source_dsn: str) -> None:
    """The same restart as a Dagster job: it reports the rebuilt partitions, and the stream
    continues exactly from its slot."""
    drain(history)
    today = utc_day(0)
    config = {"from_timestamp": f"{today.isoformat()}T00:00:00+00:00", "to_kafka": False}
    with dg.instance_for_test() as instance:
        result = restart_from_point.execute_in_process(
            run_config={"ops": {"restart_stream_from_point": {"config": config}}},
            resources=RESOURCES,
            instance=instance,
        )
        assert result.success
        partitions = [
            m.partition for m in result.asset_materializations_for_node("restart_stream_from_point")
        ]
    assert partitions == [today.isoformat()]
    insert_day(source_dsn, today, n=10)
    drain(history)
    assert_clickhouse_matches_postgres(history)
    assert_redis_matches_postgres(history)
    assert_kafka_matches_postgres(history)
