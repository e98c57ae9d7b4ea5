"""`window_reconciles_across_sinks` on real services: nothing lost, nothing doubled.

Known events in closed windows of the week before last (inserts, an update moving an event out
of the window and one into it, a delete, an invalid row, unknown content) are streamed and rolled
up; the check passes with every count equal to PostgreSQL's. Then one sink at a time is changed
behind the pipeline's back and the check fails naming that sink, and only it; a change the
stream has not applied yet is reported as behind, not as lost.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from engagement_dagster.assets.rollups import WINDOW_FMT, reconcile_check_result
from engagement_dagster.definitions import defs
from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.pipeline import default_sinks, enrich_rules
from engagement_dagster.lib.reconcile import (
    Count,
    ReconcileLimits,
    ReconcileTargets,
    Reconciliation,
    reconcile_window,
)
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.kafka_contract import KafkaTopics
from engagement_dagster.lib.source_db import connect
from engagement_dagster.lib.stream import Stream, StreamOptions
from engagement_dagster.lib.windows import window_members_key, window_start, window_stats_key
from tests.support import VALID_EVENT, drain, insert_event, sql

A, B, UNKNOWN = (str(uuid.uuid4()) for _ in range(3))
USER = str(uuid.uuid4())
# Tuesday 13:20 of the week before last: closed long ago, and no other test module's window.
W = window_start("1w", datetime.now(UTC)) - timedelta(days=13, hours=-13, minutes=-20)
W2 = W + timedelta(minutes=30)  # the window events move to and from
W3 = W + timedelta(hours=2)  # the window whose Kafka message goes missing
FK = "engagement_events_content_id_fkey"  # unknown content must still count
FAST = ReconcileLimits(wait_s=10.0, poll_s=0.2)


def event(dsn: str, content_id: str | None, at: datetime, duration_ms: int | None) -> int:
    return insert_event(dsn, content_id, USER, at, duration_ms)


def truth(dsn: str, start: datetime) -> Count:
    """The window's valid current events, straight from PostgreSQL (tests' own SQL)."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT count(*), coalesce(sum(coalesce(e.duration_ms, 0)), 0) "
            f"FROM engagement_events e WHERE {VALID_EVENT} "
            "AND e.event_ts >= %s AND e.event_ts < %s",
            (start, start + timedelta(minutes=10)),
        )
        row = cur.fetchone()
    assert row is not None
    return Count(int(row[0]), int(row[1]))


@pytest.fixture(scope="module")
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture(scope="module")
def ids(clean_sinks: Settings) -> dict[str, int]:
    """The module's events, streamed twice: inserts, then updates and a delete."""
    dsn = clean_sinks.pg_dsn
    sql(dsn, "ALTER TABLE engagement_events DROP CONSTRAINT IF EXISTS " + FK)
    sql(
        dsn,
        "INSERT INTO content (id, slug, title, content_type, length_seconds) VALUES "
        "(%s, 'rec-a', 'A', 'podcast', 600), (%s, 'rec-b', 'B', 'video', 300)",
        A, B,
    )  # fmt: skip
    events = {
        "a1": event(dsn, A, W + timedelta(seconds=10), 30_000),
        "a2": event(dsn, A, W + timedelta(seconds=70), None),
        "b1": event(dsn, B, W + timedelta(seconds=200), 12_345),
        "deleted": event(dsn, B, W + timedelta(seconds=260), 5_000),
        "moved_out": event(dsn, A, W + timedelta(seconds=320), 7_000),
        "moved_in": event(dsn, B, W2 + timedelta(seconds=5), 4_000),
        "unknown": event(dsn, UNKNOWN, W + timedelta(seconds=599), 10_000),
        "invalid": event(dsn, A, W + timedelta(seconds=400), -5),  # a dead letter
        "w2": event(dsn, A, W2 + timedelta(seconds=100), 1_000),
    }
    drain(clean_sinks)
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE engagement_events SET event_ts = event_ts + interval '30 minutes' "
            "WHERE id = %s",
            (events["moved_out"],),
        )
        cur.execute(
            "UPDATE engagement_events SET event_ts = %s WHERE id = %s",
            (W + timedelta(seconds=500), events["moved_in"]),
        )
        cur.execute(
            "UPDATE engagement_events SET duration_ms = 31000 WHERE id = %s", (events["a1"],)
        )
        cur.execute("DELETE FROM engagement_events WHERE id = %s", (events["deleted"],))
    drain(clean_sinks)
    return events


def run_window(instance: dg.DagsterInstance, start: datetime) -> dict[str, dg.AssetCheckEvaluation]:
    result = defs.resolve_job_def("rollup_windows").execute_in_process(
        partition_key=start.strftime(WINDOW_FMT), instance=instance
    )
    assert result.success
    return {
        e.check_name: e
        for e in (ev.event_specific_data for ev in result.all_events)
        if isinstance(e, dg.AssetCheckEvaluation)
    }


def check(settings: Settings, start: datetime) -> tuple[Reconciliation, dg.AssetCheckResult]:
    """The check's body for one window, as the UI's "Execute checks" runs it (an in-process run
    of a checks-only selection cannot take a partition in Dagster 1.13)."""
    result = reconcile_window(ReconcileTargets.from_settings(settings), start, limits=FAST)
    return result, reconcile_check_result(result)


def statuses(result: Reconciliation) -> dict[str, str]:
    return {s.sink: s.status for s in result.sinks}


EQUAL = {"clickhouse": "equal", "redis": "equal", "kafka": "equal"}


# --- the tests ---------------------------------------------------------------------------------


def test_the_check_passes_in_the_rollup_job_with_every_count_equal(
    clean_sinks: Settings, ids: dict[str, int], instance: dg.DagsterInstance
) -> None:
    want = truth(clean_sinks.pg_dsn, W)
    assert want == Count(5, 31_000 + 12_345 + 4_000 + 10_000)  # a1, a2, b1, moved_in, unknown
    for start in (W, W2):
        evaluation = run_window(instance, start)["window_reconciles_across_sinks"]
        assert evaluation.passed, evaluation.description
        metadata = evaluation.metadata
        expected = truth(clean_sinks.pg_dsn, start)
        for source in ("postgres", "clickhouse", "redis", "kafka"):
            assert metadata[f"{source}_events"] == dg.MetadataValue.int(expected.events)
            assert metadata[f"{source}_engagement_ms"] == dg.MetadataValue.int(
                expected.engagement_ms
            )
        for sink in ("clickhouse", "redis", "kafka"):
            assert metadata[f"{sink}_events_diff"] == dg.MetadataValue.int(0)
        assert metadata["kafka_doubled"] == dg.MetadataValue.int(0)
        assert isinstance(metadata["kafka_messages_read"], dg.IntMetadataValue)
        assert metadata["kafka_messages_read"].value >= expected.events

    result, outcome = check(clean_sinks, W)
    assert outcome.passed and result.reads == 1 and result.waited_s == 0
    assert result.postgres == want and statuses(result) == EQUAL
    assert all(s.count == want for s in result.sinks)
    assert result.kafka_read_from is not None and result.kafka_read_from < W


def test_a_row_deleted_from_clickhouse_fails_the_check_naming_clickhouse(
    clean_sinks: Settings, ids: dict[str, int]
) -> None:
    dsn = clean_sinks.clickhouse_dsn
    newer = (
        "INSERT INTO engagement.enriched_engagements SELECT * REPLACE ({deleted:UInt8} AS "
        "is_deleted, source_lsn + 1 AS source_lsn) FROM engagement.enriched_engagements "
        "WHERE event_id = {id:Int64} ORDER BY source_lsn DESC LIMIT 1"
    )
    with clickhouse_client(dsn) as client:  # a tombstone nobody asked for
        client.command(newer, parameters={"deleted": 1, "id": ids["b1"]})
    result, outcome = check(clean_sinks, W)
    assert not outcome.passed and outcome.severity == dg.AssetCheckSeverity.ERROR
    assert statuses(result) == {**EQUAL, "clickhouse": "differs"}, result.summary()
    assert result.sink("clickhouse").difference(result.postgres) == Count(-1, -12_345)
    assert "clickhouse differs: 1 event fewer and 12345 ms fewer" in result.summary()
    assert outcome.metadata["clickhouse_events_diff"] == dg.MetadataValue.int(-1)
    assert result.reads == 2  # read again after the wait: not a race

    with clickhouse_client(dsn) as client:  # ClickHouse is right again: a newer live version
        client.command(newer, parameters={"deleted": 0, "id": ids["b1"]})
    assert check(clean_sinks, W)[1].passed


def test_a_redis_stats_hash_changed_or_a_member_removed_fails_the_check_naming_redis(
    clean_sinks: Settings, ids: dict[str, int], instance: dg.DagsterInstance
) -> None:
    store = redis.Redis.from_url(clean_sinks.redis_url)
    try:
        assert store.hincrby(window_stats_key("10m", W, A), "events", 1) == 3
        result, outcome = check(clean_sinks, W)
        assert not outcome.passed and statuses(result) == {**EQUAL, "redis": "differs"}
        assert result.sink("redis").difference(result.postgres) == Count(1, 0)
        assert outcome.metadata["redis_events_diff"] == dg.MetadataValue.int(1)

        run_window(instance, W)  # the rollup rewrites the window's keys
        assert check(clean_sinks, W)[1].passed
        assert store.srem(window_members_key("10m", W), B) == 1
        result, outcome = check(clean_sinks, W)
        assert not outcome.passed and statuses(result) == {**EQUAL, "redis": "differs"}
        assert result.sink("redis").difference(result.postgres) == Count(-2, -16_345)
    finally:
        store.close()
    run_window(instance, W)
    assert check(clean_sinks, W)[1].passed


def test_a_change_the_stream_has_not_applied_is_behind_not_lost(
    clean_sinks: Settings, ids: dict[str, int], instance: dg.DagsterInstance
) -> None:
    late = event(clean_sinks.pg_dsn, B, W + timedelta(seconds=450), 2_000)
    result, outcome = check(clean_sinks, W)
    assert not outcome.passed and outcome.severity == dg.AssetCheckSeverity.WARN
    assert statuses(result) == {"clickhouse": "behind", "redis": "behind", "kafka": "behind"}
    assert all(s.difference(result.postgres) == Count(-1, -2_000) for s in result.sinks)
    assert "no stream run is consuming the slot" in result.summary()

    drain(clean_sinks)  # ClickHouse and Kafka have it; the window's Redis keys wait for a re-roll
    result, _ = check(clean_sinks, W)
    assert statuses(result) == {**EQUAL, "redis": "behind"}, result.summary()
    assert "re-rolls it" in result.sink("redis").detail
    run_window(instance, W)
    assert check(clean_sinks, W)[1].passed
    assert late


def test_a_kafka_message_delivered_twice_fails_the_check_naming_kafka(
    clean_sinks: Settings, ids: dict[str, int]
) -> None:
    topic = KafkaTopics.with_prefix(clean_sinks.kafka_topic_prefix).enriched
    key, value = committed_message(clean_sinks, topic, ids["b1"])
    producer = Producer(
        {
            "bootstrap.servers": clean_sinks.kafka_bootstrap,
            "transactional.id": f"engagement-test-duplicate-{uuid.uuid4().hex[:8]}",
        }
    )
    producer.init_transactions(10)
    producer.begin_transaction()
    producer.produce(topic, value, key)
    producer.commit_transaction(10)

    result, outcome = check(clean_sinks, W)
    assert not outcome.passed and outcome.severity == dg.AssetCheckSeverity.ERROR
    assert statuses(result) == {**EQUAL, "kafka": "differs"}, result.summary()
    assert result.kafka_doubled == 1 and result.sink("kafka").count == result.postgres
    assert "1 message delivered twice" in result.summary()
    assert outcome.metadata["kafka_doubled"] == dg.MetadataValue.int(1)


def test_a_kafka_message_that_never_arrived_fails_the_check_naming_kafka(
    clean_sinks: Settings, ids: dict[str, int], instance: dg.DagsterInstance
) -> None:
    missing = event(clean_sinks.pg_dsn, A, W3 + timedelta(seconds=30), 9_000)
    # A stream that lost its Kafka sink: the slot moves on without it.
    sinks = [s for s in default_sinks(clean_sinks) if s.name != "kafka"]
    report = Stream(
        dsn=clean_sinks.pg_dsn,
        slot=clean_sinks.slot,
        publication=clean_sinks.publication,
        sinks=sinks,
        options=StreamOptions(linger_seconds=0, run_seconds=120),
        rules=enrich_rules(clean_sinks),
    ).run()
    assert report.caught_up
    run_window(instance, W3)
    result, outcome = check(clean_sinks, W3)
    assert result.postgres == Count(1, 9_000)
    assert not outcome.passed and statuses(result) == {**EQUAL, "kafka": "differs"}
    assert result.sink("kafka").difference(result.postgres) == Count(-1, -9_000)
    assert outcome.metadata["kafka_events"] == dg.MetadataValue.int(0)
    assert missing


def committed_message(settings: Settings, topic: str, event_id: int) -> tuple[bytes, bytes]:
    """The key and value of the newest committed message of one event."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"engagement-test-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        pending, found = set(partitions), None
        while pending:
            message = consumer.poll(5)
            assert message is not None, "the enriched topic was not read to its end"
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                pending.discard(message.partition())
                continue
            assert error is None, error
            value = message.value()
            if value and json.loads(value)["event_id"] == event_id:
                found = (message.key(), value)
    finally:
        consumer.close()
    assert found is not None and found[0] is not None
    return found[0], found[1]
