"""`engagement db init` on a real server: schema, identity, publication, slot; re-runnable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect, init_source, slot_info

BIN = Path(sys.executable).parent


def _query(dsn: str, sql: str, *args: object) -> list[tuple]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def _engagement(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "engagement"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_schema_is_the_one_of_the_design(source_dsn: str) -> None:
    columns = _query(
        source_dsn,
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
    )
    assert columns == [
        ("content", "id", "uuid"),
        ("content", "slug", "text"),
        ("content", "title", "text"),
        ("content", "content_type", "text"),
        ("content", "length_seconds", "integer"),
        ("content", "publish_ts", "timestamp with time zone"),
        ("engagement_events", "id", "bigint"),
        ("engagement_events", "content_id", "uuid"),
        ("engagement_events", "user_id", "uuid"),
        ("engagement_events", "event_type", "text"),
        ("engagement_events", "event_ts", "timestamp with time zone"),
        ("engagement_events", "duration_ms", "integer"),
        ("engagement_events", "device", "text"),
        ("engagement_events", "raw_payload", "jsonb"),
    ]
    identity = _query(
        source_dsn, "SELECT relreplident FROM pg_class WHERE relname = %s", "engagement_events"
    )
    assert identity == [("f",)], "engagement_events must have REPLICA IDENTITY FULL"


def test_publication_and_slot_exist(source_dsn: str, settings: Settings) -> None:
    tables = _query(
        source_dsn,
        "SELECT tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1",
        settings.publication,
    )
    assert tables == [("content",), ("engagement_events",)]
    with connect(source_dsn) as conn:
        slot = slot_info(conn, settings.slot)
    assert slot is not None
    assert slot.plugin == "pgoutput"
    assert slot.database == source_dsn.rsplit("/", 1)[1]


def test_init_is_idempotent_and_repairs_the_publication(
    source_dsn: str, settings: Settings
) -> None:
    with connect(source_dsn) as conn, conn.cursor() as cur:
        cur.execute(f"ALTER PUBLICATION {settings.publication} DROP TABLE content")
        cur.execute("ALTER TABLE engagement_events REPLICA IDENTITY DEFAULT")
        cur.execute("INSERT INTO content (id, slug) VALUES (gen_random_uuid(), 'kept-by-init')")
    report = init_source(source_dsn, slot=settings.slot, publication=settings.publication)
    assert not report.database_created
    assert not report.publication_created
    assert not report.slot_created
    assert report.publication_tables_added == ("content",)
    assert _query(source_dsn, "SELECT count(*) FROM content WHERE slug = 'kept-by-init'") == [(1,)]
    assert _query(
        source_dsn, "SELECT relreplident FROM pg_class WHERE relname = %s", "engagement_events"
    ) == [("f",)]
    again = init_source(source_dsn, slot=settings.slot, publication=settings.publication)
    assert again.publication_tables_added == ()
    with connect(source_dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM content WHERE slug = 'kept-by-init'")


def test_cli_honours_slot_and_publication_names(source_dsn: str) -> None:
    done = _engagement(
        "db",
        "init",
        ENGAGEMENT_SLOT="engagement_other_slot",
        ENGAGEMENT_PUBLICATION="engagement_other_pub",
    )
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "engagement_other_slot created" in done.stdout
        assert _query(
            source_dsn,
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s",
            "engagement_other_slot",
        ) == [("pgoutput",)]
        assert _query(
            source_dsn,
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s",
            "engagement_other_pub",
        ) == [(2,)]
        rerun = _engagement(
            "db",
            "init",
            ENGAGEMENT_SLOT="engagement_other_slot",
            ENGAGEMENT_PUBLICATION="engagement_other_pub",
        )
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "engagement_other_slot exists" in rerun.stdout
    finally:
        with connect(source_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot('engagement_other_slot')")
            cur.execute("DROP PUBLICATION IF EXISTS engagement_other_pub")


def test_cli_rejects_an_unsafe_slot_name(source_dsn: str) -> None:
    done = _engagement("db", "init", ENGAGEMENT_SLOT="x; DROP TABLE content")
    assert done.returncode != 0
    assert "not a valid identifier" in done.stdout + done.stderr
    assert _query(source_dsn, "SELECT count(*) FROM pg_class WHERE relname = 'content'") == [(1,)]


def test_init_creates_a_missing_database(services: Settings) -> None:
    from psycopg2.extensions import make_dsn

    dsn = make_dsn(services.pg_dsn, dbname="engagement_fresh_test")
    maintenance = make_dsn(services.pg_dsn, dbname="postgres")
    try:
        report = init_source(dsn, slot="engagement_fresh_slot", publication="engagement_fresh_pub")
        assert report.database_created and report.slot_created and report.publication_created
    finally:
        with connect(maintenance) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pg_drop_replication_slot('engagement_fresh_slot') "
                "FROM pg_replication_slots WHERE slot_name = 'engagement_fresh_slot'"
            )
            cur.execute("DROP DATABASE IF EXISTS engagement_fresh_test WITH (FORCE)")
