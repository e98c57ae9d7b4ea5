"""The change stream end to end on real services: every sink equals PostgreSQL, exactly once.

Covers inserts, updates (moving an event to other content, and a month later or earlier), deletes,
NULL durations, NULL and zero lengths, unknown content (no FK), unicode, 200 kB payloads, every
invalid kind of DESIGN §5, and re-running the stream over what it already applied.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg2
import pytest

from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.generator import TrafficOptions, run_traffic, seed_content
from engagement_dagster.lib.pipeline import build_stream
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.kafka import DLQ_TOPIC
from engagement_dagster.lib.source_db import (
    KeptConnection,
    connect,
    handover_poll_application_name,
    restart_distance,
    successor_application_name,
)
from engagement_dagster.lib.stream import (
    FIRST_BATCH_MAX_MS,
    HANDOVER_RESTART_BYTES,
    StreamOptions,
)
from tests.support import (
    assert_clickhouse_matches_postgres,
    assert_kafka_matches_postgres,
    assert_redis_matches_postgres,
    drain,
    sql,
)

PODCAST, NO_LENGTH, ZERO_LENGTH = (str(uuid.uuid4()) for _ in range(3))
UNKNOWN = str(uuid.uuid4())
USER = str(uuid.uuid4())
PODCAST_B = str(uuid.uuid4())
BIG_PAYLOAD = json.dumps({"notes": "ü€😀 " * 20_000, "kind": "big"}, ensure_ascii=False)  # 200 kB


@pytest.fixture(scope="module")
def stream_db(source_dsn: str, clean_sinks: Settings) -> Iterator[Settings]:
    """The test database without the FK on content_id, as real sources often are."""
    sql(
        source_dsn,
        "ALTER TABLE engagement_events DROP CONSTRAINT IF EXISTS engagement_events_content_id_fkey",
    )
    sql(source_dsn, "TRUNCATE engagement_events, content")
    drain(clean_sinks)  # the slot starts after the truncate
    yield clean_sinks


def insert_event(dsn: str, content_id: str | None, **fields: object) -> int:
    row = {
        "content_id": content_id,
        "user_id": USER,
        "event_type": "play",
        "event_ts": "now()",
        "duration_ms": 30_000,
        "device": "ios",
        "raw_payload": '{"app": "1.2"}',
        **fields,
    }
    columns = ", ".join(row)
    values = ", ".join("now()" if v == "now()" else "%s" for v in row.values())
    args = [v for v in row.values() if v != "now()"]
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO engagement_events ({columns}) VALUES ({values}) RETURNING id", args
        )
        found = cur.fetchone()
    assert found is not None
    return int(found[0])


def test_every_sink_equals_postgres_after_inserts_updates_and_deletes(
    stream_db: Settings,
) -> None:
    dsn = stream_db.pg_dsn
    sql(
        dsn,
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES "
        "(%s, 'pod', 'Épisode 東京 🎧', 'podcast', 600, now()),"
        "(%s, 'no-length', 'Newsletter', 'newsletter', NULL, now()),"
        "(%s, 'zero', 'Video', 'video', 0, now())",
        PODCAST,
        NO_LENGTH,
        ZERO_LENGTH,
    )
    plain = insert_event(dsn, PODCAST)
    insert_event(dsn, PODCAST, duration_ms=None)
    insert_event(dsn, NO_LENGTH, duration_ms=12_345)
    insert_event(dsn, ZERO_LENGTH, duration_ms=5_000)
    insert_event(dsn, UNKNOWN, event_type="click")  # valid, content fields NULL
    insert_event(dsn, PODCAST, raw_payload=json.dumps({"title": "naïve 東京 😀", "q": "a'b\"c"}))
    big = insert_event(dsn, PODCAST, raw_payload=BIG_PAYLOAD)
    moved = insert_event(dsn, PODCAST, duration_ms=90_000)
    month = insert_event(dsn, PODCAST, event_ts="2026-10-31T23:59:59Z")
    back = insert_event(dsn, PODCAST, event_ts="2026-11-01T00:00:01Z")  # moves a month back
    doomed = insert_event(dsn, NO_LENGTH)
    broken = insert_event(dsn, PODCAST)
    drain(stream_db)

    sql(dsn, "UPDATE engagement_events SET duration_ms = duration_ms + 1 WHERE id = %s", big)
    sql(dsn, "UPDATE engagement_events SET content_id = %s WHERE id = %s", ZERO_LENGTH, moved)
    sql(
        dsn,
        "UPDATE engagement_events SET event_ts = event_ts + interval '2 seconds' WHERE id = %s",
        month,
    )
    sql(
        dsn,
        "UPDATE engagement_events SET event_ts = event_ts - interval '2 seconds' WHERE id = %s",
        back,
    )
    sql(dsn, "UPDATE engagement_events SET duration_ms = NULL WHERE id = %s", plain)
    sql(dsn, "DELETE FROM engagement_events WHERE id = %s", doomed)
    sql(dsn, "UPDATE engagement_events SET duration_ms = -1 WHERE id = %s", broken)
    with connect(dsn) as conn, conn.cursor() as cur:  # several changes of a row in one txn
        conn.autocommit = False
        cur.execute(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
            "duration_ms) VALUES (%s, %s, 'pause', now(), 1) RETURNING id",
            (PODCAST, USER),
        )
        row = cur.fetchone()
        assert row is not None
        cur.execute("UPDATE engagement_events SET duration_ms = 2 WHERE id = %s", row)
        cur.execute("DELETE FROM engagement_events WHERE id = %s", row)
        cur.execute(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
            "duration_ms) VALUES (%s, %s, 'finish', now(), 3)",
            (PODCAST, USER),
        )
        conn.commit()
    seed_content(dsn, 50, seed=3)
    run_traffic(
        dsn,
        TrafficOptions(
            rate=400,
            duration_s=3,
            update_ratio=0.1,
            delete_ratio=0.05,
            invalid_ratio=0.02,
            content_update_ratio=0.0,
            seed=7,
        ),
    )
    report = drain(stream_db)
    assert report.rows > 0

    events = assert_clickhouse_matches_postgres(stream_db)
    assert events > 500
    assert_redis_matches_postgres(stream_db)
    assert_kafka_matches_postgres(stream_db)
    with clickhouse_client(stream_db.clickhouse_dsn) as client:
        toast = client.query(
            "SELECT length(raw_payload) FROM engagement.enriched_engagements FINAL "
            "WHERE event_id = {id:Int64} AND is_deleted = 0",
            parameters={"id": big},
        ).result_rows
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT octet_length(raw_payload::text) FROM engagement_events WHERE id = %s", (big,)
        )
        stored = cur.fetchall()
    assert stored[0][0] > 200_000
    assert toast == stored, "the unchanged TOASTed payload was not carried over"


def test_replaying_what_was_applied_changes_nothing(stream_db: Settings) -> None:
    """Re-run the stream from an old slot position: every sink skips below its checkpoint."""
    before = assert_kafka_matches_postgres(stream_db)
    report = drain(stream_db)
    assert report.rows == 0
    assert assert_kafka_matches_postgres(stream_db) == before
    assert_clickhouse_matches_postgres(stream_db)
    assert_redis_matches_postgres(stream_db)


def backend_pids(dsn: str, application_name: str) -> list[int]:
    rows = sql(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
        application_name,
    )
    return [pid for (pid,) in rows]


def settled_backend_pids(dsn: str, application_name: str, expected: list[int]) -> list[int]:
    """The backends once they are `expected`, or after 5 s: a closed connection's backend
    leaves pg_stat_activity a moment after the client has moved on."""
    deadline = time.monotonic() + 5
    while (pids := backend_pids(dsn, application_name)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def test_a_run_past_its_time_streams_on_until_a_successor_waits(stream_db: Settings) -> None:
    """With a handover grace, the end of a run waits for its successor, not the other way
    round: a slow run launch costs no gap. Without a successor it ends at the grace's end."""
    options = StreamOptions(run_seconds=0.5, handover_grace_seconds=30, report_every_s=60)
    stream = build_stream(stream_db, options)
    runner = threading.Thread(target=stream.run)
    started = time.monotonic()
    runner.start()
    polling_as = handover_poll_application_name(stream_db.slot)
    try:
        time.sleep(3)
        assert runner.is_alive(), "the run ended at run_seconds with no successor waiting"
        polls = backend_pids(stream_db.pg_dsn, polling_as)
        time.sleep(1)  # ten polls
        assert len(polls) == 1, f"the grace polls on one connection, not {polls}"
        assert backend_pids(stream_db.pg_dsn, polling_as) == polls, "a connection per poll"
        waiting_as = successor_application_name(stream_db.slot)
        with connect(stream_db.pg_dsn, application_name=waiting_as):
            asked = time.monotonic()
            runner.join(timeout=10)
            assert not runner.is_alive(), "a successor waited and the run did not hand over"
            assert time.monotonic() - asked < 2.0
    finally:
        stream.stop.set()
        runner.join(timeout=30)
    assert time.monotonic() - started < 15
    left = settled_backend_pids(stream_db.pg_dsn, polling_as, [])
    assert left == [], "the poll connection outlived the run"

    alone = build_stream(stream_db, StreamOptions(run_seconds=0.2, handover_grace_seconds=1.5))
    began = time.monotonic()
    alone.run()
    assert 1.5 <= time.monotonic() - began < 10, "the grace is a bound, not a wait forever"


def test_a_kept_connection_is_opened_again_after_an_error(stream_db: Settings) -> None:
    dsn, name = stream_db.pg_dsn, "engagement-test-kept"
    kept = KeptConnection(dsn, application_name=name)
    with kept.use() as conn:
        first = conn.get_backend_pid()
    with kept.use() as conn:
        assert conn.get_backend_pid() == first
    sql(dsn, "SELECT pg_terminate_backend(%s)", first)
    with pytest.raises(psycopg2.OperationalError), kept.use() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    with kept.use() as conn:
        again = conn.get_backend_pid()
    assert again != first
    assert settled_backend_pids(dsn, name, [again]) == [again]
    kept.close()
    assert settled_backend_pids(dsn, name, []) == []


def test_content_changes_reach_later_events_only(stream_db: Settings) -> None:
    dsn = stream_db.pg_dsn
    content = str(uuid.uuid4())
    sql(
        dsn,
        "INSERT INTO content (id, slug, content_type, length_seconds) "
        "VALUES (%s, %s, 'video', 100)",
        content,
        f"as-of-{content}",
    )
    before = insert_event(dsn, content, duration_ms=50_000)
    sql(dsn, "UPDATE content SET length_seconds = 200 WHERE id = %s", content)
    after = insert_event(dsn, content, duration_ms=50_000)
    drain(stream_db)
    with clickhouse_client(stream_db.clickhouse_dsn) as client:
        rows = client.query(
            "SELECT event_id, length_seconds, engagement_pct FROM engagement.enriched_engagements "
            "FINAL WHERE content_id = {c:UUID} ORDER BY event_id",
            parameters={"c": content},
        ).result_rows
    assert rows == [(before, 100, 50.0), (after, 200, 25.0)]
    # The other tests compare with the current content: leave no event enriched before a change.
    sql(dsn, "DELETE FROM engagement_events WHERE id = %s", before)
    drain(stream_db)


INVALID_ROWS = {
    "null_event_ts": {"event_ts": None},
    "future_event_ts": {"event_ts": "2036-01-01T00:00:00Z"},
    "negative_duration": {"duration_ms": -5},
    "null_content_id": {"content_id": None},
    "unknown_event_type": {"event_type": "teleport"},
    "undecodable_payload": {"raw_payload": '"just a string"'},
}


def test_poison_input_goes_to_both_dead_letter_queues_and_the_stream_goes_on(
    stream_db: Settings,
) -> None:
    from kafka import KafkaConsumer

    from engagement_dagster.lib.kafka_config import kafka_client_config

    dsn = stream_db.pg_dsn
    ids = {}
    for reason, fields in INVALID_ROWS.items():
        fields = dict(fields)
        content = fields.pop("content_id", PODCAST)
        ids[reason] = insert_event(dsn, content, **fields)  # type: ignore[arg-type]
    after = insert_event(dsn, PODCAST, duration_ms=4_000)
    drain(stream_db)
    with clickhouse_client(stream_db.clickhouse_dsn) as client:
        letters = dict(
            client.query(
                "SELECT event_id, reason FROM engagement.dead_letters FINAL "
                "WHERE event_id IN {ids:Array(Int64)}",
                parameters={"ids": list(ids.values())},
            ).result_rows
        )
        valid_after = client.query(
            "SELECT count() FROM engagement.enriched_engagements FINAL "
            "WHERE event_id = {id:Int64} AND is_deleted = 0",
            parameters={"id": after},
        ).result_rows
    assert letters == {event_id: reason for reason, event_id in ids.items()}
    assert valid_after == [(1,)]
    consumer = KafkaConsumer(
        stream_db.kafka_topic_prefix + DLQ_TOPIC,
        **kafka_client_config(stream_db),
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    dlq = [json.loads(m.value) for m in consumer]
    consumer.close()
    by_event = {d["event_id"]: d for d in dlq if d["event_id"] in set(ids.values())}
    assert {eid: d["reason"] for eid, d in by_event.items()} == letters
    for letter in by_event.values():
        raw = json.loads(letter["raw_change"])
        assert raw["op"] == "insert" and "event_type" in json.dumps(raw)
    assert_clickhouse_matches_postgres(stream_db)


def test_a_handover_waits_until_the_slot_restarts_close_to_its_position(
    stream_db: Settings,
) -> None:
    """With handover_restart_wait_seconds, the run hands over once the successor would re-decode
    at most HANDOVER_RESTART_BYTES of WAL (PostgreSQL moves restart_lsn every 15 s), not at
    once: here 8 MB of WAL written just before the successor arrives."""
    options = StreamOptions(
        run_seconds=0.5, handover_grace_seconds=60, handover_restart_wait_seconds=40
    )
    stream = build_stream(stream_db, options)
    runner = threading.Thread(target=stream.run)
    runner.start()
    try:
        time.sleep(2)
        with connect(stream_db.pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS wal_filler")  # not published: WAL, no changes
            cur.execute("CREATE TABLE wal_filler AS SELECT repeat('x', 800) AS f, g "
                        "FROM generate_series(1, 10000) AS g")  # fmt: skip
        time.sleep(1)  # the stream confirms past it (idle: to the WAL end)
        with connect(stream_db.pg_dsn, application_name=successor_application_name(stream_db.slot)):
            runner.join(timeout=50)
            assert not runner.is_alive(), "no handover within the restart wait"
            with connect(stream_db.pg_dsn) as conn:
                distance = restart_distance(conn, stream_db.slot)
    finally:
        stream.stop.set()
        runner.join(timeout=30)
    assert distance is not None and distance <= HANDOVER_RESTART_BYTES, distance


def test_the_first_batch_after_the_slot_opens_is_cut_short(stream_db: Settings) -> None:
    """At a handover the sinks have waited since the last run's last batch: the first batch
    after the slot opens is cut FIRST_BATCH_MAX_MS after its first transaction, the next ones
    after batch_max_ms. A backlog of 60,000 rows in 3,000 transactions is waiting."""
    assert FIRST_BATCH_MAX_MS < 100
    with connect(stream_db.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO content (id, slug, title, content_type, length_seconds) "
            "VALUES (%s, %s, 'Backlog', 'video', 60)",
            (PODCAST_B, f"b-{PODCAST_B}"),
        )
        for _ in range(3000):  # autocommit: one transaction each
            cur.execute(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
                "duration_ms, device, raw_payload) SELECT %s, %s, 'play', now(), g, 'web', '{}' "
                "FROM generate_series(1, 20) AS g",
                (PODCAST_B, USER),
            )
    stream = build_stream(stream_db, StreamOptions(batch_max_ms=2000, batch_max_rows=100_000))
    try:
        stream._open_cursor()
        first, second = stream._read_batch(), stream._read_batch()
    finally:
        stream.cursor.close()
        for worker in stream.workers:
            worker.sink.close()
    # Reading 60,000 rows takes this stream far longer than 25 ms, and less than 2 s. (With the
    # native decoder the first 25 ms took 505 of 1,000 transactions of this kind: what the
    # socket held, and more; 20,000 rows were too few to tell the two windows apart.)
    assert 0 < len(first) < len(second), (len(first), len(second))
    assert len(first) + len(second) == 3001  # the content row's and the 3,000 inserts
    drain(stream_db)
