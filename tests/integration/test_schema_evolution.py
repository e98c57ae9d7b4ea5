"""Schema evolution of engagement_events on real services (README, Schema evolution).

An added column keeps a live stream running under traffic and every sink exact; an integer
widened to bigint is read as before; a needed column dropped, or retyped to a type the stream
cannot read exactly, makes each change a `schema_mismatch` dead letter (ClickHouse and Kafka,
exactly once, the slot moving on) until the table is fixed, and the documented recovery (a
backfill of the days) makes every sink exact again. Every Kafka message meets its JSON Schema.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from engagement_dagster.lib.backfill import backfill_days
from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.contract import current_schemas
from engagement_dagster.lib.generator import TrafficOptions, run_traffic, seed_content
from engagement_dagster.lib.pgoutput import parse_lsn
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.kafka_contract import DLQ_TOPIC, ENRICHED_TOPIC
from engagement_dagster.lib.source_db import connect, init_source
from engagement_dagster.lib.stream import Stream
from tests.support import (
    assert_clickhouse_matches_postgres,
    assert_kafka_matches_postgres,
    assert_redis_matches_postgres,
    drain,
    kafka_versions,
    sql,
    streaming,
)

TRAFFIC = TrafficOptions(
    rate=150, update_ratio=0.1, delete_ratio=0.05, content_update_ratio=0.0, seed=23
)
# Changes made while the table does not fit are dead letters, which Redis never gets (as for
# every dead letter): they touch events two hours old, outside the live board's ten minutes,
# so the board is compared exactly; closed windows are rewritten from ClickHouse by the rollups.
OLD = "now() - interval '2 hours'"


def wal_lsn(dsn: str) -> int:
    return parse_lsn(sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0])


@pytest.fixture(scope="module")
def evolving(source_dsn: str, clean_sinks: Settings) -> Iterator[Settings]:
    seed_content(source_dsn, 40, seed=17)
    drain(clean_sinks)
    yield clean_sinks
    # Leave the table as `engagement db init` makes it for the modules after this one (their
    # clean_sinks fixture starts a new slot, so nothing of this is replayed to them).
    sql(source_dsn, "DROP TABLE engagement_events")
    init_source(source_dsn, slot=clean_sinks.slot, publication=clean_sinks.publication)


def live_stream(settings: Settings) -> AbstractContextManager[Stream]:
    """A stream run tailing the slot in a thread; on exit it finishes its batch and stops."""
    return streaming(settings, run_seconds=600, name="schema-evolution-stream")


def wait_until(what: str, condition: Any, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


@contextmanager
def traffic(settings: Settings) -> Iterator[None]:
    """The generator's realistic traffic (inserts, updates, deletes) until the block ends."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_traffic(settings.pg_dsn, TRAFFIC, stop=stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="schema-evolution-traffic", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors


def assert_every_sink_equals_postgres(settings: Settings) -> None:
    assert_clickhouse_matches_postgres(settings)
    assert_redis_matches_postgres(settings)
    assert_kafka_matches_postgres(settings)


def dlq_letters(settings: Settings) -> list[dict[str, Any]]:
    from kafka import KafkaConsumer

    from engagement_dagster.lib.kafka_config import kafka_client_config

    consumer = KafkaConsumer(
        settings.kafka_topic_prefix + DLQ_TOPIC,
        **kafka_client_config(settings),
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    try:
        return [json.loads(message.value) for message in consumer]
    finally:
        consumer.close()


def assert_messages_meet_their_schemas(
    settings: Settings, enriched: list[dict[str, Any]], letters: list[dict[str, Any]]
) -> None:
    schemas = {s.topic: Draft202012Validator(s.schema) for s in current_schemas()}
    assert enriched, "no enriched message to check"
    for topic, messages in ((ENRICHED_TOPIC, enriched), (DLQ_TOPIC, letters)):
        for message in messages:
            errors = [e.message for e in schemas[topic].iter_errors(message)]
            assert not errors, f"{topic} message {message}: {errors}"


def mismatch_window(settings: Settings, after: int, upto: int) -> dict[str, Any]:
    """What the sinks hold of the changes committed in (after, upto]: ClickHouse dead letters
    and rows, Kafka dead letters and enriched messages."""
    with clickhouse_client(settings.clickhouse_dsn) as client:
        letters = client.query(
            "SELECT lsn, event_id, reason, op, raw_change FROM engagement.dead_letters FINAL "
            "WHERE lsn > {a:UInt64} AND lsn <= {b:UInt64} ORDER BY lsn, op, event_id",
            parameters={"a": after, "b": upto},
        ).result_rows
        rows = client.query(
            "SELECT count() FROM engagement.enriched_engagements "
            "WHERE source_lsn > {a:UInt64} AND source_lsn <= {b:UInt64}",
            parameters={"a": after, "b": upto},
        ).result_rows[0][0]
    kafka_letters = [d for d in dlq_letters(settings) if after < d["source_lsn"] <= upto]
    kafka_rows = [v for v in kafka_versions(settings) if after < v["source_lsn"] <= upto]
    return {
        "clickhouse_letters": [tuple(r) for r in letters],
        "clickhouse_rows": rows,
        "kafka_letters": kafka_letters,
        "kafka_rows": kafka_rows,
    }


def assert_each_change_is_one_mismatch_letter(
    settings: Settings, after: int, upto: int, expected: list[tuple[str, int]]
) -> list[dict[str, Any]]:
    """Every event change of the window is a schema_mismatch dead letter, in ClickHouse and in
    Kafka exactly once, and none of them is an enriched row anywhere. Returns the raw changes."""
    held = mismatch_window(settings, after, upto)
    assert held["clickhouse_rows"] == 0 and held["kafka_rows"] == []
    got = sorted((op, event_id) for _, event_id, _, op, _ in held["clickhouse_letters"])
    assert got == sorted(expected)
    assert {reason for _, _, reason, _, _ in held["clickhouse_letters"]} == {"schema_mismatch"}
    in_kafka = sorted((d["op"], d["event_id"]) for d in held["kafka_letters"])
    assert in_kafka == sorted(expected), "Kafka's dead letters differ (lost or doubled)"
    assert {d["reason"] for d in held["kafka_letters"]} == {"schema_mismatch"}
    return [json.loads(raw) for *_, raw in held["clickhouse_letters"]]


def start_from_old_events(settings: Settings, count: int) -> list[int]:
    """Every event deleted (through the stream), then `count` events two hours old."""
    dsn = settings.pg_dsn
    sql(dsn, "DELETE FROM engagement_events")
    content = [r[0] for r in sql(dsn, "SELECT id::text FROM content ORDER BY id LIMIT 5")]
    ids = [
        sql(
            dsn,
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
            f"duration_ms, device, raw_payload) VALUES (%s, gen_random_uuid(), 'play', {OLD}, "
            """%s, 'web', '{"old": true}') RETURNING id""",
            content[i % len(content)],
            1000 * (i + 1),
        )[0][0]
        for i in range(count)
    ]
    drain(settings)
    assert_every_sink_equals_postgres(settings)
    return ids


def recover_days(settings: Settings) -> None:
    """README, Schema evolution: after the table is fixed, rebuild the days the changes made
    meanwhile touched, in ClickHouse and Kafka."""
    today = datetime.now(UTC).date()  # two days back: the date cast is in the server's zone
    backfill_days(settings, today - timedelta(days=2), today, to_kafka=True)


def test_a_column_added_mid_stream_keeps_every_sink_exact(
    evolving: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """ADD COLUMN under traffic while a stream run tails the slot, once on its own and once
    inside a transaction that updates and deletes rows written before it: both row shapes
    and old images of both shapes in one transaction, so in one batch."""
    dsn = evolving.pg_dsn
    caplog.set_level(logging.WARNING, logger="engagement.stream")
    with live_stream(evolving) as stream, traffic(evolving):
        wait_until("the stream has applied traffic", lambda: stream.report.rows > 50)
        sql(dsn, "ALTER TABLE engagement_events ADD COLUMN country text")
        with connect(dsn, autocommit=False) as conn, conn.cursor() as cur:
            # The lock first: the ALTER then waits for the traffic instead of deadlocking it.
            cur.execute("LOCK TABLE engagement_events IN ACCESS EXCLUSIVE MODE")
            cur.execute("SELECT id FROM engagement_events ORDER BY id LIMIT 3")
            old = [r[0] for r in cur.fetchall()]
            cur.execute("UPDATE engagement_events SET duration_ms = 111 WHERE id = %s", old[:1])
            cur.execute("ALTER TABLE engagement_events ADD COLUMN score numeric DEFAULT 0")
            cur.execute(
                "UPDATE engagement_events SET duration_ms = 222, country = 'FR' WHERE id = %s",
                old[:1],
            )
            cur.execute("DELETE FROM engagement_events WHERE id = %s", old[1:2])
            cur.execute(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
                "duration_ms, device, country, score) SELECT content_id, user_id, 'finish', "
                "now(), 5000, 'tv', 'DE', 9.5 FROM engagement_events WHERE id = %s",
                old[2:3],
            )
            conn.commit()
        altered = wal_lsn(dsn)
        wait_until("the stream has applied traffic after the ALTERs", lambda: (
            stream.report.acknowledged_lsn > altered and stream.report.rows > 400
        ))  # fmt: skip
    drain(evolving)

    assert_every_sink_equals_postgres(evolving)
    enriched = kafka_versions(evolving)
    assert not any({"country", "score"} & set(message) for message in enriched)
    assert_messages_meet_their_schemas(evolving, enriched, dlq_letters(evolving))
    notices = [
        r.getMessage() for r in caplog.records if "contract does not carry" in r.getMessage()
    ]
    assert len(notices) == 2, notices  # once per version of the table, whatever the batches
    assert "country (text)" in notices[0] and "score (numeric)" in notices[1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_duration_widened_to_bigint_is_read_as_before(evolving: Settings) -> None:
    """integer -> bigint under traffic and a live stream: every value the contract's Int32 holds
    flows as before; a larger one is a per-row dead letter (undecodable_payload), not lost."""
    dsn = evolving.pg_dsn
    with live_stream(evolving) as stream, traffic(evolving):
        wait_until("the stream has applied traffic", lambda: stream.report.rows > 50)
        sql(dsn, "ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE bigint")
        (huge,) = sql(
            dsn,
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
            "duration_ms) SELECT content_id, user_id, 'play', now(), 3000000000 "
            "FROM engagement_events LIMIT 1 RETURNING id",
        )[0]
        altered = wal_lsn(dsn)
        wait_until("the stream has applied traffic after the ALTER", lambda: (
            stream.report.acknowledged_lsn > altered
        ))  # fmt: skip
    drain(evolving)
    with clickhouse_client(evolving.clickhouse_dsn) as client:
        letters = client.query(
            "SELECT reason FROM engagement.dead_letters FINAL WHERE event_id = {id:Int64}",
            parameters={"id": huge},
        ).result_rows
    assert letters and {reason for (reason,) in letters} == {"undecodable_payload"}
    sql(dsn, "DELETE FROM engagement_events WHERE id = %s", huge)  # valid in PostgreSQL's eyes
    drain(evolving)
    assert_every_sink_equals_postgres(evolving)


def test_a_dropped_needed_column_dead_letters_each_change_and_the_stream_goes_on(
    evolving: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = evolving.pg_dsn
    old = start_from_old_events(evolving, 6)
    caplog.set_level(logging.WARNING, logger="engagement.stream")
    with live_stream(evolving) as stream:
        before = wal_lsn(dsn)
        sql(dsn, "ALTER TABLE engagement_events DROP COLUMN duration_ms")
        (new,) = sql(
            dsn,
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, device) "
            f"SELECT content_id, user_id, 'pause', {OLD}, 'ios' FROM engagement_events "
            "WHERE id = %s RETURNING id",
            old[0],
        )[0]
        sql(dsn, "UPDATE engagement_events SET event_type = 'finish' WHERE id = ANY(%s)", old[:2])
        sql(dsn, "DELETE FROM engagement_events WHERE id = %s", old[2])
        last = wal_lsn(dsn)  # below the commit of the next transaction, the last one
        fresh = sql(
            dsn,
            "INSERT INTO content (id, slug, content_type, length_seconds) VALUES "
            "(gen_random_uuid(), 'added-while-broken', 'video', 50) RETURNING id::text",
        )[0][0]
        upto = wal_lsn(dsn)
        # The slot moves past the changes: every sink holds them (as dead letters).
        wait_until("the slot is past the changes", lambda: stream.report.acknowledged_lsn > last)
    expected = [("insert", new), ("update", old[0]), ("update", old[1]), ("delete", old[2])]
    raws = assert_each_change_is_one_mismatch_letter(evolving, before, upto, expected)
    assert all("duration_ms" not in raw and "device" in raw for raw in raws)
    (update,) = [r for r in raws if r["op"] == "update" and r["id"] == str(old[1])]
    assert (update["event_type"], update["old_event_type"]) == ("finish", "play")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        "schema mismatch: engagement_events has no column duration_ms (dropped or renamed): "
        "restore it with ALTER TABLE engagement_events ADD COLUMN duration_ms integer."
    )

    # Fixed: the column is back (its values are gone with the DROP, as PostgreSQL says so).
    sql(dsn, "ALTER TABLE engagement_events ADD COLUMN duration_ms integer")
    with traffic(evolving):
        time.sleep(2)
    (watched,) = sql(
        dsn,
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms) "
        "VALUES (%s, gen_random_uuid(), 'play', now(), 42000) RETURNING id",
        fresh,
    )[0]
    drain(evolving)
    with clickhouse_client(evolving.clickhouse_dsn) as client:
        enriched = client.query(
            "SELECT content_type, engagement_pct FROM engagement.enriched_engagements FINAL "
            "WHERE event_id = {id:Int64} AND is_deleted = 0",
            parameters={"id": watched},
        ).result_rows
    assert enriched == [("video", 84.0)], "content added while the events did not fit was lost"
    recover_days(evolving)
    assert_every_sink_equals_postgres(evolving)


def test_retyped_columns_that_do_not_read_exactly_are_dead_letters_until_fixed(
    evolving: Settings,
) -> None:
    """duration_ms to text, then event_ts to date: each change meanwhile a schema_mismatch dead
    letter; typed back, the stream reads the table again, and a backfill of the days repairs
    what the changes meanwhile (and the date cast, which rewrote every row without a change
    event) did to ClickHouse and Kafka."""
    dsn = evolving.pg_dsn
    old = start_from_old_events(evolving, 4)

    before = wal_lsn(dsn)
    sql(dsn, "ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE text")
    sql(dsn, "UPDATE engagement_events SET duration_ms = '2500' WHERE id = %s", old[0])
    drain(evolving)
    upto = wal_lsn(dsn)
    raws = assert_each_change_is_one_mismatch_letter(evolving, before, upto, [("update", old[0])])
    assert (raws[0]["duration_ms"], raws[0]["old_duration_ms"]) == ("2500", "1000")
    sql(
        dsn,
        "ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE integer "
        "USING duration_ms::integer",
    )

    before = wal_lsn(dsn)
    sql(dsn, "ALTER TABLE engagement_events ALTER COLUMN event_ts TYPE date")
    sql(dsn, "DELETE FROM engagement_events WHERE id = %s", old[1])
    drain(evolving)
    upto = wal_lsn(dsn)
    raws = assert_each_change_is_one_mismatch_letter(evolving, before, upto, [("delete", old[1])])
    assert len(raws[0]["event_ts"]) == len("2026-11-24")
    sql(dsn, "ALTER TABLE engagement_events ALTER COLUMN event_ts TYPE timestamptz")

    with traffic(evolving):
        time.sleep(2)
    drain(evolving)
    recover_days(evolving)
    assert_every_sink_equals_postgres(evolving)
    assert_messages_meet_their_schemas(evolving, kafka_versions(evolving), dlq_letters(evolving))
