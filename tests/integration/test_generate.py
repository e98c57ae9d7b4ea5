"""The traffic generator against the real PostgreSQL: what lands in the tables matches its report.

Each test removes the events and content it added and restores content it changed, so the shared
test database is left as the next test expects.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2.extensions
import pytest
from psycopg2 import sql

from engagement_dagster.lib.generator import (
    INVALID_KINDS,
    GeneratorError,
    TrafficOptions,
    TrafficReport,
    content_has_foreign_key,
    run_traffic,
    seed_content,
)
from engagement_dagster.lib.source_db import CREATE_CONTENT, CREATE_ENGAGEMENT_EVENTS, connect

# Each DESIGN §5 defect as SQL, to find the invalid rows the generator wrote.
DEFECT_SQL = {
    "null_event_ts": "event_ts IS NULL",
    "future_event_ts": "event_ts > now() + interval '1 year'",
    "negative_duration": "duration_ms < 0",
    "null_content_id": "content_id IS NULL",
    "unknown_event_type": "event_type NOT IN ('play', 'pause', 'finish', 'click')",
    "undecodable_payload": "jsonb_typeof(raw_payload) <> 'object'",
}
ANY_DEFECT = " OR ".join(f"coalesce({c}, false)" for c in DEFECT_SQL.values())
WATCH_SLOT = "engagement_generate_watch"


def scalar(cur: psycopg2.extensions.cursor, query: str, *params: object) -> int:
    cur.execute(query, params)
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


@contextmanager
def leaves_tables_as_found(dsn: str) -> Iterator[psycopg2.extensions.cursor]:
    """Yield a cursor; afterwards delete the events and content added, restore changed content."""
    with connect(dsn) as conn, conn.cursor() as cur:
        last_event = scalar(cur, "SELECT coalesce(max(id), 0) FROM engagement_events")
        cur.execute("CREATE TEMP TABLE content_before AS SELECT * FROM content")
        try:
            yield cur
        finally:
            cur.execute("DELETE FROM engagement_events WHERE id > %s", (last_event,))
            cur.execute("DELETE FROM content WHERE id NOT IN (SELECT id FROM content_before)")
            cur.execute(
                """UPDATE content c SET title = b.title, length_seconds = b.length_seconds
                     FROM content_before b
                    WHERE c.id = b.id
                      AND (c.title, c.length_seconds) IS DISTINCT FROM (b.title, b.length_seconds)
                """
            )
            cur.execute("DROP TABLE content_before")


def column(decoded_row: str, name: str) -> str | None:
    """One column's value in a row as test_decoding prints it (absent or null: None)."""
    match = re.search(rf" {name}\[[^\]]+\]:('[^']*'|[^ ]+)", decoded_row)
    return None if match is None or match.group(1) == "null" else match.group(1)


def watched_transactions(cur: psycopg2.extensions.cursor) -> list[list[str]]:
    """The changes of each transaction decoded from WATCH_SLOT, as test_decoding prints them."""
    cur.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (WATCH_SLOT,))
    transactions: list[list[str]] = []
    for (line,) in cur.fetchall():
        if line.startswith("BEGIN"):
            transactions.append([])
        elif line.startswith("table "):
            transactions[-1].append(line)
    return [t for t in transactions if t]


def test_seeded_traffic_lands_as_reported(source_dsn: str) -> None:
    with leaves_tables_as_found(source_dsn) as cur:
        content_before = scalar(cur, "SELECT count(*) FROM content")
        assert seed_content(source_dsn, content_before + 500, seed=101) == 500
        assert seed_content(source_dsn, content_before + 500, seed=101) == 0
        cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE length_seconds IS NULL),"
            "       count(*) FILTER (WHERE publish_ts >= now()),"
            "       count(DISTINCT content_type)"
            "  FROM content WHERE id NOT IN (SELECT id FROM content_before)"
        )
        added, null_length, future, types = cur.fetchone() or (0, 0, 0, 0)
        assert added == 500
        assert 0.05 <= null_length / added <= 0.15
        assert future == 0 and types == 3
        assert content_has_foreign_key(source_dsn)

        # A temporary slot (dropped with this connection) shows the transactions as committed.
        cur.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'test_decoding', true)", (WATCH_SLOT,)
        )
        last_event = scalar(cur, "SELECT coalesce(max(id), 0) FROM engagement_events")
        progress: list[TrafficReport] = []
        options = TrafficOptions(
            rate=300,
            duration_s=3,
            update_ratio=0.08,
            delete_ratio=0.04,
            invalid_ratio=0.05,
            content_update_ratio=0.01,
            seed=102,
        )
        report = run_traffic(source_dsn, options, on_progress=progress.append)

        assert 2.9 <= report.elapsed_s <= 3.5
        assert 300 * 0.85 <= report.events_per_s <= 300 * 1.15
        assert min(report.updated, report.deleted, report.invalid, report.transactions) > 0
        assert len(progress) >= 3
        assert [p.transactions for p in progress] == sorted(p.transactions for p in progress)
        assert progress[-1] == report

        new_events = f"FROM engagement_events WHERE id > {last_event:d}"
        live = scalar(cur, f"SELECT count(*) {new_events}")
        assert live == report.inserted + report.invalid - report.deleted
        assert scalar(cur, f"SELECT count(*) {new_events} AND ({ANY_DEFECT})") == report.invalid
        for kind in INVALID_KINDS:
            assert scalar(cur, f"SELECT count(*) {new_events} AND {DEFECT_SQL[kind]}") > 0, kind
        # Late events are at most minutes old; everything valid is from around now.
        assert (
            scalar(cur, f"SELECT count(*) {new_events} AND event_ts < now() - interval '10 min'")
            == 0
        )

        transactions = watched_transactions(cur)
        changes = [change for t in transactions for change in t]
        assert len(transactions) == report.transactions
        assert max(len(t) for t in transactions) <= options.max_events_per_txn
        assert sum(len(t) <= 3 for t in transactions) > 0.8 * len(transactions)

        def count(prefix: str) -> int:
            return sum(c.startswith(prefix) for c in changes)

        assert count("table public.engagement_events: INSERT") == report.inserted + report.invalid
        assert count("table public.engagement_events: DELETE") == report.deleted
        assert count("table public.content: UPDATE") == report.content_updated
        updates = [c for c in changes if c.startswith("table public.engagement_events: UPDATE")]
        assert len(updates) == report.updated
        moved = retimed = 0
        for update in updates:
            # test_decoding prints the old row (REPLICA IDENTITY FULL) without its NULL columns.
            old, new = update.split(" new-tuple: ")
            moved += column(old, "content_id") != column(new, "content_id")
            retimed += column(old, "duration_ms") != column(new, "duration_ms")
            assert column(old, "content_id") != column(new, "content_id") or (
                column(old, "duration_ms") != column(new, "duration_ms")
            ), f"an UPDATE that changed nothing: {update}"
        assert moved > 0 and retimed > 0
        cur.execute("SELECT pg_drop_replication_slot(%s)", (WATCH_SLOT,))


def test_stop_ends_traffic_promptly(source_dsn: str) -> None:
    with leaves_tables_as_found(source_dsn) as cur:
        if scalar(cur, "SELECT count(*) FROM content") == 0:
            seed_content(source_dsn, 50, seed=103)
        stop = threading.Event()
        reports: list[TrafficReport] = []
        options = TrafficOptions(rate=400, workers=2, delete_ratio=0.05, seed=104)
        runner = threading.Thread(
            target=lambda: reports.append(run_traffic(source_dsn, options, stop=stop))
        )
        runner.start()
        time.sleep(1.5)
        stop.set()
        stopped_at = time.monotonic()
        runner.join(timeout=5)
        assert not runner.is_alive(), "run_traffic ignored stop"
        assert time.monotonic() - stopped_at < 1.0
        (report,) = reports
        assert 1.0 <= report.elapsed_s < 2.0
        assert report.transactions > 0 and report.inserted > 0


@pytest.fixture
def scratch_dsn(source_dsn: str) -> Iterator[str]:
    """An empty database on the same server, without schema; dropped afterwards."""
    name = "engagement_generate_scratch_test"
    maintenance = psycopg2.extensions.make_dsn(source_dsn, dbname="postgres")
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with connect(maintenance) as conn, conn.cursor() as cur:
        cur.execute(drop)
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg2.extensions.make_dsn(source_dsn, dbname=name)
    finally:
        with connect(maintenance) as conn, conn.cursor() as cur:
            cur.execute(drop)


def test_clear_errors_and_unknown_content_without_a_foreign_key(scratch_dsn: str) -> None:
    with pytest.raises(GeneratorError, match="engagement db init"):
        seed_content(scratch_dsn, 10)
    events_without_fk = CREATE_ENGAGEMENT_EVENTS.replace(" REFERENCES content(id)", "")
    assert events_without_fk != CREATE_ENGAGEMENT_EVENTS
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute(CREATE_CONTENT)
        cur.execute(events_without_fk)
    assert not content_has_foreign_key(scratch_dsn)
    with pytest.raises(GeneratorError, match="seed"):
        run_traffic(scratch_dsn, TrafficOptions(duration_s=1))

    assert seed_content(scratch_dsn, 50, seed=105) == 50
    report = run_traffic(scratch_dsn, TrafficOptions(rate=2_000, duration_s=1.5, seed=106))
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FILTER (WHERE content_id NOT IN (SELECT id FROM content)),"
            "       count(*) FROM engagement_events"
        )
        orphans, total = cur.fetchone() or (0, 0)
    assert total == report.inserted - report.deleted
    assert 0 < orphans < 0.02 * total
