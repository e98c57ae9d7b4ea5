"""Helpers that tests share: resetting the test database and its replication slots."""

from __future__ import annotations

import psycopg2.extensions
from psycopg2 import sql

from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect, init_source

DROP_SLOTS_OF_DATABASE = """
SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
 WHERE database = %(db)s AND active_pid IS NOT NULL;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %(db)s;
"""


def reset_test_database(settings: Settings, *, recreate: bool = True) -> None:
    """Drop the test database and its slots (which would pin WAL), then init it again."""
    dbname = psycopg2.extensions.parse_dsn(settings.pg_dsn)["dbname"]
    assert dbname.endswith("_test"), f"refusing to drop {dbname!r}: not a test database"
    maintenance = psycopg2.extensions.make_dsn(settings.pg_dsn, dbname="postgres")
    with connect(maintenance) as conn, conn.cursor() as cur:
        cur.execute(DROP_SLOTS_OF_DATABASE, {"db": dbname})
        cur.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )
    if recreate:
        init_source(settings.pg_dsn, slot=settings.slot, publication=settings.publication)
