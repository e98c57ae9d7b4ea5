"""Helpers that tests share: resetting the test database and its replication slots, running
SQL, inserting events, running a stream in a thread, and comparing the sinks with PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg2.extensions
from psycopg2 import sql as pgsql

from engagement_dagster.lib.pipeline import build_stream
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect, init_source
from engagement_dagster.lib.stream import Stream, StreamOptions, StreamReport

DROP_SLOTS_OF_DATABASE = """
SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
 WHERE database = %(db)s AND active_pid IS NOT NULL;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %(db)s;
"""


# Advisory locks on the shared PostgreSQL server: every test session holds SERVICES shared while
# it uses the services, and its namespace's key (the test database) exclusively.
SERVICES_LOCK = (0x656E67, 0)
NAMESPACE_LOCK = 0x656E68
HOLDERS = """
SELECT DISTINCT a.application_name, a.backend_start
  FROM pg_locks l JOIN pg_stat_activity a USING (pid)
 WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %(class)s::oid
   AND l.objid = hashtext(%(db)s)::oid AND a.pid <> pg_backend_pid()
"""


class ServicesClaim:
    """This test session's claim on the shared local services, held on one PostgreSQL connection
    for the session: two sessions on one namespace would drop each other's database, flush each
    other's Redis and remove each other's slots mid-test, so the second one fails at once, saying
    who holds it; and a session leaves running the services it started while another uses them."""

    def __init__(self, settings: Settings) -> None:
        self.dbname = psycopg2.extensions.parse_dsn(settings.pg_dsn)["dbname"]
        maintenance = psycopg2.extensions.make_dsn(settings.pg_dsn, dbname="postgres")
        self._stack = ExitStack()
        self.conn = self._stack.enter_context(
            connect(maintenance, application_name=f"engagement tests pid {os.getpid()}")
        )
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock_shared(%s, %s)", SERVICES_LOCK)
            cur.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (NAMESPACE_LOCK, self.dbname)
            )
            row = cur.fetchone()
            if row and row[0]:
                return
            cur.execute(HOLDERS, {"class": NAMESPACE_LOCK, "db": self.dbname})
            holders = "; ".join(
                f"{name} (since {start:%H:%M:%S})" for name, start in cur.fetchall()
            )
        self.release()
        raise RuntimeError(
            f"another test session uses the test database {self.dbname} on these services: "
            f"{holders or 'it just ended'}. Wait for it to end, or give this session its own "
            "namespace: ENGAGEMENT_TEST_NAMESPACE=<name> make test"
        )

    def sole_user(self) -> bool:
        """True when no other test session (of any namespace) is using the services now, or
        when this session's claim was cut (the server restarted): nobody can be told apart."""
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s, %s)", SERVICES_LOCK)
                row = cur.fetchone()
        except psycopg2.Error:
            return True
        return bool(row and row[0])

    def release(self) -> None:
        self._stack.close()  # closing the connection releases its locks


def reset_test_database(settings: Settings, *, recreate: bool = True) -> None:
    """Drop the test database and its slots (which would pin WAL), then init it again."""
    dbname = psycopg2.extensions.parse_dsn(settings.pg_dsn)["dbname"]
    assert dbname.endswith("_test"), f"refusing to drop {dbname!r}: not a test database"
    maintenance = psycopg2.extensions.make_dsn(settings.pg_dsn, dbname="postgres")
    with connect(maintenance) as conn, conn.cursor() as cur:
        cur.execute(DROP_SLOTS_OF_DATABASE, {"db": dbname})
        cur.execute(
            pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(dbname))
        )
    if recreate:
        init_source(settings.pg_dsn, slot=settings.slot, publication=settings.publication)


# --- the source database, directly -------------------------------------------------------


def sql(dsn: str, statement: str, *args: object) -> list[tuple[Any, ...]]:
    """Run one statement (args as its parameters); its rows, or [] when it returns none."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement, args or None)
        return cur.fetchall() if cur.description else []


def insert_event(
    dsn: str, content_id: str | None, user_id: str, at: datetime, duration_ms: int | None
) -> int:
    """One 'play' event from the web at `at`; its id."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
            "duration_ms, device) VALUES (%s, %s, 'play', %s, %s, 'web') RETURNING id",
            (content_id, user_id, at, duration_ms),
        )
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


# --- one test module's pipeline starts afresh --------------------------------------------

_EPOCH = {"lsn": 0}
TERMINATE_SLOT_USER = """
SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
 WHERE slot_name = %s AND active_pid IS NOT NULL
"""
SLOT_IN_USE = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s AND active"
DROP_SLOT = """
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s
"""  # Kafka messages at or below this LSN belong to earlier test modules


def start_pipeline_epoch(settings: Settings) -> None:
    """Empty the source tables and recreate the slot at the current WAL position."""
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(TERMINATE_SLOT_USER, (settings.slot,))
        for _ in range(50):
            cur.execute(SLOT_IN_USE, (settings.slot,))
            row = cur.fetchone()
            if not row or row[0] == 0:
                break
            time.sleep(0.1)
        cur.execute(DROP_SLOT, (settings.slot,))
        cur.execute("TRUNCATE engagement_events, content")
        cur.execute("SELECT pg_current_wal_lsn()::text")
        lsn = cur.fetchone()
    init_source(settings.pg_dsn, slot=settings.slot, publication=settings.publication)
    from engagement_dagster.lib.pgoutput import parse_lsn

    _EPOCH["lsn"] = parse_lsn(lsn[0]) if lsn else 0


def drain(settings: Settings) -> StreamReport:
    """Run the stream in this process until it has caught up with the slot; no sink may fail."""
    stream = build_stream(
        settings, StreamOptions(linger_seconds=0, run_seconds=180, report_every_s=60)
    )
    report = stream.run()
    assert report.caught_up, report
    assert not any(report.sink_errors.values()), report.sink_errors
    return report


@contextmanager
def streaming(settings: Settings, *, run_seconds: float, name: str) -> Iterator[Stream]:
    """A stream run tailing the slot in a daemon thread; on exit it finishes its batch and stops.

    The run must still be going, without an error, when the block ends; after the stop it must
    have ended without an error and with no sink failing."""
    stream = build_stream(settings, StreamOptions(run_seconds=run_seconds, report_every_s=60))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            stream.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield stream
        assert thread.is_alive() and not errors, f"the stream stopped: {errors}"
    finally:
        stream.stop.set()
        thread.join(timeout=120)
    assert not thread.is_alive() and not errors, errors
    assert not any(stream.report.sink_errors.values()), stream.report.sink_errors


# --- what the sinks should hold, computed from PostgreSQL, and what they do hold -----------

# DESIGN §5 validity, as SQL over the source table (the pipeline never relies on constraints).
VALID_EVENT = """
    e.event_ts IS NOT NULL AND e.content_id IS NOT NULL
    AND e.event_type IN ('play', 'pause', 'finish', 'click')
    AND (e.duration_ms IS NULL OR e.duration_ms >= 0)
    AND e.event_ts <= now() + interval '1 day'
    AND (e.raw_payload IS NULL OR jsonb_typeof(e.raw_payload) = 'object')
"""

EXPECTED_ROWS = f"""
SELECT e.id, e.content_id::text, e.user_id::text, e.event_type, e.event_ts, e.device,
       e.duration_ms, c.content_type, c.length_seconds, e.raw_payload::text
  FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id
 WHERE {VALID_EVENT}
 ORDER BY e.id
"""

CLICKHOUSE_ROWS = """
SELECT event_id, toString(content_id), toString(user_id), event_type, event_ts, device,
       duration_ms, content_type, length_seconds, raw_payload, engagement_seconds,
       engagement_pct
  FROM engagement.enriched_engagements FINAL
 WHERE is_deleted = 0
 ORDER BY event_id
"""

# The live board holds the events of the whole seconds (now - 600, now], as the sink buckets them.
EXPECTED_BOARD = f"""
SELECT e.content_id::text, sum(coalesce(e.duration_ms, 0)) / 1000.0, count(*)
  FROM engagement_events e
 WHERE {VALID_EVENT}
   AND floor(extract(epoch FROM e.event_ts)) > %(now)s - 600
   AND floor(extract(epoch FROM e.event_ts)) <= %(now)s
 GROUP BY 1
"""


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def expected_pct(duration_ms: int | None, length_seconds: int | None) -> float | None:
    if duration_ms is None or length_seconds is None or length_seconds <= 0:
        return None
    return round(100 * (duration_ms / 1000.0) / length_seconds, 2)


def postgres_rows(dsn: str) -> list[tuple[Any, ...]]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        cur.execute(EXPECTED_ROWS)
        rows = cur.fetchall()
    return [(*r[:4], _naive_utc(r[4]), *r[5:]) for r in rows]


def clickhouse_rows(dsn: str) -> list[tuple[Any, ...]]:
    from engagement_dagster.lib.clickhouse import clickhouse_client

    with clickhouse_client(dsn) as client:
        return [tuple(r) for r in client.query(CLICKHOUSE_ROWS).result_rows]


def assert_clickhouse_matches_postgres(settings: Settings) -> int:
    """ClickHouse FINAL (live rows) equals PostgreSQL's valid events on every column."""
    expected = postgres_rows(settings.pg_dsn)
    actual = clickhouse_rows(settings.clickhouse_dsn)
    assert [r[0] for r in actual] == [r[0] for r in expected], _id_diff(expected, actual)
    for want, got in zip(expected, actual, strict=True):
        assert got[:10] == want, f"event {want[0]}: ClickHouse {got[:10]} != PostgreSQL {want}"
        seconds = None if want[6] is None else want[6] / 1000.0
        assert got[10] == seconds, f"event {want[0]}: engagement_seconds {got[10]} != {seconds}"
        pct = expected_pct(want[6], want[8])
        assert (got[11] is None) == (pct is None), f"event {want[0]}: pct {got[11]} vs {pct}"
        if pct is not None:  # float ties may round either way in the last place
            assert abs(got[11] - pct) <= 0.0100001, f"event {want[0]}: pct {got[11]} vs {pct}"
    return len(expected)


def _id_diff(expected: list[tuple[Any, ...]], actual: list[tuple[Any, ...]]) -> str:
    want, got = {r[0] for r in expected}, {r[0] for r in actual}
    return (
        f"{len(want)} events in PostgreSQL, {len(got)} in ClickHouse; "
        f"missing {sorted(want - got)[:10]}, extra {sorted(got - want)[:10]}"
    )


def postgres_board(dsn: str, now_s: int | None = None) -> dict[str, tuple[float, int]]:
    """The live board as PostgreSQL computes it for the second `now_s` (default: now)."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(EXPECTED_BOARD, {"now": int(time.time()) if now_s is None else now_s})
        return {cid: (float(seconds), int(n)) for cid, seconds, n in cur.fetchall()}


def redis_board(url: str) -> dict[str, tuple[float, int]]:
    from engagement_dagster.lib.secure import redis_client
    from engagement_dagster.lib.sinks.redis import TOP_EVENTS, TOP_SECONDS

    client = redis_client(url, decode_responses=True)
    try:
        seconds = dict(client.zrange(TOP_SECONDS, 0, -1, withscores=True))
        events = dict(client.zrange(TOP_EVENTS, 0, -1, withscores=True))
        assert client.ttl(TOP_SECONDS) > 0 or not seconds, "the live board has no TTL"
    finally:
        client.close()
    return {cid: (float(seconds.get(cid, 0.0)), int(events[cid])) for cid in events}


def live_boards(settings: Settings) -> tuple[dict[str, tuple[float, int]], ...]:
    """(PostgreSQL's, Redis's) live board for one second: Redis's slid to it as the stream does.

    Both read the same whole-second window, so an event within a second of the window's edge
    is on both or neither (a second read of the clock for PostgreSQL would cut it apart). Call it
    with no stream running: a stream would slide the board on to its own clock."""
    from engagement_dagster.lib.sinks.redis import BOARD_STATE, RedisSink

    now_s = int(time.time())
    sink = RedisSink(settings.redis_url)
    try:
        sink.refresh(now_s=now_s)
        held = sink.client.hmget(BOARD_STATE, ["low", "high"])
    finally:
        sink.close()
    assert [int(v or 0) for v in held] == [now_s - 600, now_s], f"board slid to {held}, not {now_s}"
    return postgres_board(settings.pg_dsn, now_s), redis_board(settings.redis_url)


def assert_redis_matches_postgres(settings: Settings) -> None:
    """engagement:top:10m (seconds) and :events equal PostgreSQL over the last 10 minutes."""
    want, got = live_boards(settings)
    assert set(got) == set(want), f"contents differ: {set(want) ^ set(got)}"
    for cid, (seconds, events) in want.items():
        assert got[cid][1] == events, f"{cid}: {got[cid][1]} events in Redis, {events} in PG"
        assert abs(got[cid][0] - seconds) < 1e-6, f"{cid}: {got[cid][0]} s != {seconds} s"


def kafka_versions(settings: Settings) -> list[dict[str, Any]]:
    """Every committed message of the enriched topic (read_committed), in partition order."""
    import json

    from kafka import KafkaConsumer

    from engagement_dagster.lib.kafka_config import kafka_client_config
    from engagement_dagster.lib.sinks.kafka import ENRICHED_TOPIC

    consumer = KafkaConsumer(
        settings.kafka_topic_prefix + ENRICHED_TOPIC,
        **kafka_client_config(settings),
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    try:
        versions = [json.loads(message.value) for message in consumer]
    finally:
        consumer.close()
    return [v for v in versions if v["source_lsn"] > _EPOCH["lsn"]]


def assert_kafka_matches_postgres(settings: Settings) -> int:
    """Each change once (no version twice); the latest version of each event is PostgreSQL's."""
    versions = kafka_versions(settings)
    keys = [
        (v["event_id"], v["source_lsn"], (v["event_ts"] or "")[:7], v["is_deleted"])
        for v in versions
    ]
    duplicates = {k for k in keys if keys.count(k) > 1} if len(set(keys)) != len(keys) else set()
    assert not duplicates, f"versions delivered twice: {sorted(duplicates)[:5]}"
    latest: dict[int, dict[str, Any]] = {}
    for v in versions:
        held = latest.get(v["event_id"])
        # Higher LSN wins; at one LSN (a month move) the live version beats the tombstone.
        if held is None or (v["source_lsn"], -v["is_deleted"]) > (
            held["source_lsn"],
            -held["is_deleted"],
        ):
            latest[v["event_id"]] = v
    live = {eid: v for eid, v in latest.items() if v["is_deleted"] == 0}
    expected = postgres_rows(settings.pg_dsn)
    assert sorted(live) == [r[0] for r in expected], _id_diff(expected, [(i,) for i in live])
    for row in expected:
        v = live[row[0]]
        assert (v["content_id"], v["user_id"], v["event_type"], v["duration_ms"]) == (
            row[1], row[2], row[3], row[6]
        ), f"event {row[0]}: Kafka {v} != PostgreSQL {row}"  # fmt: skip
        assert v["raw_payload"] == row[9]
        # "r": replayed by a backfill or a restart from a snapshot (lib/backfill.py)
        assert v["op"] in {"insert", "update", "r"} and v["schema_version"] == 1
    return len(versions)


# Metric samples: value by (sample name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """One scrape of a Prometheus endpoint: value by (sample name, sorted labels)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
