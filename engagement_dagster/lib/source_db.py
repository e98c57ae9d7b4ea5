"""The source database: schema of DESIGN §2, the publication and the replication slot.

`init_source` is idempotent and safe to re-run against a live system; it never drops or rewrites
data, and it refuses (with the fix) when the server cannot do logical replication.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from engagement_dagster.lib.secure import pg_connect
from engagement_dagster.lib.settings import validate_identifier

SOURCE_TABLES = ("content", "engagement_events")

CREATE_CONTENT = """
CREATE TABLE IF NOT EXISTS content (
    id             uuid PRIMARY KEY,
    slug           text UNIQUE,
    title          text,
    content_type   text,            -- podcast | newsletter | video
    length_seconds integer NULL,
    publish_ts     timestamptz
)
"""

CREATE_ENGAGEMENT_EVENTS = """
CREATE TABLE IF NOT EXISTS engagement_events (
    id          bigserial PRIMARY KEY,
    content_id  uuid REFERENCES content(id),
    user_id     uuid,
    event_type  text,               -- play | pause | finish | click
    event_ts    timestamptz,
    duration_ms integer NULL,
    device      text,
    raw_payload jsonb
)
"""

# Daily backfills read one day of events by event_ts.
CREATE_EVENT_TS_INDEX = (
    "CREATE INDEX IF NOT EXISTS engagement_events_event_ts_idx ON engagement_events (event_ts)"
)

# UPDATE and DELETE must carry the whole old row so live aggregates can retract it.
REPLICA_IDENTITY_FULL = "ALTER TABLE engagement_events REPLICA IDENTITY FULL"

PUBLICATION_TABLES = """
SELECT tablename FROM pg_publication_tables WHERE pubname = %s AND schemaname = 'public'
"""

SLOT_INFO = """
SELECT plugin, slot_type, database, active, active_pid, wal_status,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag_bytes
FROM pg_replication_slots WHERE slot_name = %s
"""


# The least a stream role needs (PostgreSQL 15): REPLICATION to open a replication connection
# and consume the slot (pgoutput checks no table privilege while decoding), CONNECT on the
# database, and SELECT on the published tables, which the stream reads for its content cache
# and a backfill reads from a snapshot. It owns nothing: the admin creates the schema, the
# publication and the slot (`db init`), so the role cannot change or drop any of them.
ROLE_ATTRIBUTES = "LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOBYPASSRLS"
ROLE_EXISTS = "SELECT rolsuper FROM pg_roles WHERE rolname = %s"


class SourceDatabaseError(RuntimeError):
    """The source database cannot serve the change stream; the message says how to fix it."""


@dataclass(frozen=True)
class SlotInfo:
    name: str
    plugin: str
    database: str
    active: bool
    active_pid: int | None
    wal_status: str | None
    lag_bytes: int | None


@dataclass(frozen=True)
class RoleReport:
    name: str
    created: bool  # False: it existed, its attributes, password and grants were reset
    database: str
    tables: tuple[str, ...]


@dataclass(frozen=True)
class InitReport:
    database_created: bool
    publication_created: bool
    publication_tables_added: tuple[str, ...]
    slot_created: bool


@contextmanager
def connect(
    dsn: str, *, autocommit: bool = True, application_name: str = "engagement"
) -> Iterator[psycopg2.extensions.connection]:
    """A short-lived connection that is always closed (TLS and password: lib/secure.py)."""
    conn = pg_connect(dsn, connect_timeout=5, application_name=application_name)
    conn.autocommit = autocommit
    try:
        yield conn
    finally:
        conn.close()


class KeptConnection:
    """One connection for a poll repeated every fraction of a second (a run in its handover
    grace looks for its successor every 0.1 s): opened at the first use and again after an
    error, closed by `close`. A connection per poll is a server backend forked each time."""

    def __init__(self, dsn: str, *, application_name: str) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self._conn: psycopg2.extensions.connection | None = None

    @contextmanager
    def use(self) -> Iterator[psycopg2.extensions.connection]:
        if self._conn is None or self._conn.closed:
            self._conn = pg_connect(
                self.dsn, connect_timeout=5, application_name=self.application_name
            )
            self._conn.autocommit = True
        try:
            yield self._conn
        except psycopg2.Error:
            self.close()  # the next use opens a fresh one
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def ensure_database(dsn: str) -> bool:
    """Create the DSN's database when the server does not have it yet; True when created."""
    name = database_name(dsn)
    try:
        with connect(dsn):
            return False
    except psycopg2.OperationalError as exc:
        if f'database "{name}" does not exist' not in str(exc):
            raise
    maintenance = psycopg2.extensions.make_dsn(dsn, dbname="postgres")
    with connect(maintenance) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return True


def database_name(dsn: str) -> str:
    """The DSN's database (libpq's default: the user name), checked like every configured
    identifier that reaches SQL."""
    params = psycopg2.extensions.parse_dsn(dsn)
    name = params.get("dbname") or params.get("user") or "postgres"
    try:
        return validate_identifier(name)
    except ValueError as exc:
        raise SourceDatabaseError(f"database name in ENGAGEMENT_PG_DSN: {exc}") from None


def slot_info(conn: psycopg2.extensions.connection, slot: str) -> SlotInfo | None:
    with conn.cursor() as cur:
        cur.execute(SLOT_INFO, (slot,))
        row = cur.fetchone()
    if row is None:
        return None
    plugin, _slot_type, database, active, active_pid, wal_status, lag_bytes = row
    return SlotInfo(slot, plugin, database, active, active_pid, wal_status, lag_bytes)


def successor_application_name(slot: str) -> str:
    """The application_name of a successor run's connection while it waits for `slot`: how the
    run holding the slot sees that it may hand over (`successor_waiting`)."""
    return f"engagement-successor:{slot}"[:63]


def handover_poll_application_name(slot: str) -> str:
    """The application_name of the connection a run in its handover grace polls with."""
    return f"engagement-handover:{slot}"[:63]


def successor_waiting(conn: psycopg2.extensions.connection, slot: str) -> bool:
    """True when a successor run is connected and waiting for `slot`."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = %s)",
            (successor_application_name(slot),),
        )
        row = cur.fetchone()
    return bool(row and row[0])


def restart_distance(conn: psycopg2.extensions.connection, slot: str) -> int | None:
    """WAL bytes a new consumer of `slot` decodes again before it reaches what the last one
    confirmed (None: no such slot). Decoding restarts at restart_lsn, which PostgreSQL moves
    only past a running-xacts record: every 15 s on a busy server, and at checkpoints."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = cur.fetchone()
    return None if row is None or row[0] is None else max(0, int(row[0]))


def check_logical_replication(conn: psycopg2.extensions.connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SHOW wal_level")
        row = cur.fetchone()
    wal_level = row[0] if row else "unknown"
    if wal_level != "logical":
        raise SourceDatabaseError(
            f"PostgreSQL has wal_level={wal_level}; the change stream needs logical decoding. "
            "Fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL "
            "(the local service started by `engagement services up` already has it)."
        )


def init_source(dsn: str, *, slot: str, publication: str) -> InitReport:
    """Create (or complete) the tables, replica identity, publication and slot.

    The publication is created before the slot: pgoutput resolves the publication with the
    catalog as of each change, so a slot older than its publication cannot decode its first
    changes.
    """
    validate_identifier(slot)
    validate_identifier(publication)
    database_name(dsn)
    database_created = ensure_database(dsn)
    with connect(dsn) as conn, conn.cursor() as cur:
        check_logical_replication(conn)
        # Serialize concurrent `db init` runs (make run and a test, say) on one advisory lock.
        cur.execute("SELECT pg_advisory_lock(hashtext('engagement db init'))")
        try:
            cur.execute(CREATE_CONTENT)
            cur.execute(CREATE_ENGAGEMENT_EVENTS)
            cur.execute(CREATE_EVENT_TS_INDEX)
            cur.execute(REPLICA_IDENTITY_FULL)
            publication_created, added = _ensure_publication(cur, publication)
            slot_created = _ensure_slot(conn, slot)
        finally:
            cur.execute("SELECT pg_advisory_unlock(hashtext('engagement db init'))")
    return InitReport(database_created, publication_created, added, slot_created)


def _ensure_publication(
    cur: psycopg2.extensions.cursor, publication: str
) -> tuple[bool, tuple[str, ...]]:
    cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
    tables = sql.SQL(", ").join(sql.Identifier(t) for t in SOURCE_TABLES)
    if cur.fetchone() is None:
        cur.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(publication), tables
            )
        )
        return True, ()
    cur.execute(PUBLICATION_TABLES, (publication,))
    present = {row[0] for row in cur.fetchall()}
    missing = tuple(t for t in SOURCE_TABLES if t not in present)
    if missing:
        cur.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(publication),
                sql.SQL(", ").join(sql.Identifier(t) for t in missing),
            )
        )
    return False, missing


def _ensure_slot(conn: psycopg2.extensions.connection, slot: str) -> bool:
    existing = slot_info(conn, slot)
    if existing is not None:
        if existing.plugin != "pgoutput":
            raise SourceDatabaseError(
                f"replication slot {slot!r} exists with plugin {existing.plugin!r}, not pgoutput. "
                f"Fix: drop it (SELECT pg_drop_replication_slot('{slot}')) or set ENGAGEMENT_SLOT "
                "to another name."
            )
        if existing.database != conn.get_dsn_parameters().get("dbname"):
            raise SourceDatabaseError(
                f"replication slot {slot!r} belongs to database {existing.database!r}. "
                "Fix: set ENGAGEMENT_SLOT to a name unique to this database."
            )
        return False
    with conn.cursor() as cur:
        try:
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        except psycopg2.errors.DuplicateObject:
            return False  # created by a concurrent init between our check and create
    return True


def create_stream_role(dsn: str, name: str, password: str) -> RoleReport:
    """Create (or reset) the least-privilege role a stream run connects as: ROLE_ATTRIBUTES,
    CONNECT on the DSN's database, USAGE on schema public, SELECT on the source tables. Run as
    the admin of `db init`, after it. The password reaches the server only as a SCRAM verifier
    computed here, so no statement log or pg_stat_statements ever holds it."""
    validate_identifier(name)
    database = database_name(dsn)
    if not password:
        raise SourceDatabaseError(f"refusing to give role {name!r} an empty password")
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(ROLE_EXISTS, (name,))
        row = cur.fetchone()
        if row is not None and row[0]:
            raise SourceDatabaseError(
                f"role {name!r} is a superuser; refusing to turn it into the stream role. "
                "Choose another name."
            )
        verifier = psycopg2.extensions.encrypt_password(
            password, name, scope=conn, algorithm="scram-sha-256"
        )
        role = sql.Identifier(name)
        statement = "CREATE ROLE {} WITH " if row is None else "ALTER ROLE {} WITH "
        cur.execute(
            sql.SQL(statement + ROLE_ATTRIBUTES + " PASSWORD {}").format(
                role, sql.Literal(verifier)
            )
        )
        cur.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), role)
        )
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
        tables = sql.SQL(", ").join(sql.Identifier(t) for t in SOURCE_TABLES)
        cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(tables, role))
    return RoleReport(name, row is None, database, SOURCE_TABLES)
