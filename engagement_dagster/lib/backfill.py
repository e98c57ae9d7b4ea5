"""Daily backfills of engagement.enriched_engagements, read from a PostgreSQL snapshot whose LSN
is known exactly, so that a running stream and a backfill never disagree about which row is newer.

It must never write a version that a stream could write with other data, never overwrite a newer
version, and never import Dagster (the partitioned asset and the CLI only call `backfill_days`).

Why the snapshot splits history exactly: a logical slot created with `(SNAPSHOT 'use')` in a
REPEATABLE READ transaction gives that transaction the snapshot of its consistent point X. Every
transaction whose commit record starts before X is visible in it; every other one is decoded by
any slot reading from X on, with commit LSN (what the stream stamps as source_lsn) >= X. A commit
record may start exactly at X, so the snapshot's own version is X - 1 (`SourceSnapshot.version`):
above every commit it holds, below every commit it lacks. Backfilled rows carry that version, so
in the ReplacingMergeTree the stream's later versions win and its earlier ones lose, with no tie
between different data; a restart sets the sinks' checkpoints to it, so the commit at X replays.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import TYPE_CHECKING, TypeVar

import polars as pl
import psycopg2
import psycopg2.extensions
import psycopg2.extras
from clickhouse_connect.driver.client import Client

from engagement_dagster.lib.clickhouse import ClickHouseSession
from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    DEAD_LETTERS_SCHEMA,
    DELTAS_SCHEMA,
    ENRICHED_ROWS_SCHEMA,
    IMAGE_COLUMNS,
    UTC_MICROS,
    ContentVersion,
    EnrichRules,
    content_versions,
    enrich,
    fold_content_versions,
)
from engagement_dagster.lib.kafka_config import kafka_client_config
from engagement_dagster.lib.pgoutput import format_lsn, parse_lsn
from engagement_dagster.lib.secure import pg_connect
from engagement_dagster.lib.settings import Settings, validate_identifier
from engagement_dagster.lib.sinks.base import SinkBatch
from engagement_dagster.lib.sinks.clickhouse import ClickHouseSink, insertable
from engagement_dagster.lib.sinks.kafka import KafkaSink

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("engagement.backfill")
T = TypeVar("T")

# `op` of every row a backfill writes (ClickHouse and Kafka): a read from a snapshot, as
# Debezium's "r". is_deleted says whether the snapshot holds the event.
REPLAY_OP = "r"
DEFAULT_CHUNK_ROWS = 100_000

CREATE_SNAPSHOT_SLOT = "CREATE_REPLICATION_SLOT {slot} {kind} LOGICAL pgoutput (SNAPSHOT 'use')"
SNAPSHOT_STARTED_AT = "SELECT now()"  # the transaction's start: the snapshot's commit time
CONTENT_QUERY = "SELECT id::text, content_type, length_seconds FROM content"
# Text exactly as pgoutput sends it (same output functions, TimeZone UTC, DateStyle ISO). FORCE
# QUOTE keeps NULL (unquoted empty) apart from the empty string; ORDER BY id cuts the day into
# chunks of consecutive ids, each compared with ClickHouse over its id range.
EVENTS_COPY = """
COPY (SELECT id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload
        FROM engagement_events WHERE {where} ORDER BY id)
  TO STDOUT WITH (FORMAT csv, FORCE_QUOTE *)
"""
DAY_WHERE = "event_ts >= %(start)s AND event_ts < %(end)s"
IDS_WHERE = "id = ANY(%(ids)s)"
# The day sorts in memory, not on disk.
SORT_MEMORY = "SET LOCAL work_mem = '256MB'"

# What ClickHouse holds over an id range: the live version per partition (FINAL), comparable
# column by column with enriched rows.
CLICKHOUSE_RANGE = """
SELECT event_id, toString(content_id) AS content_id, toString(user_id) AS user_id, event_type,
       event_ts, device, duration_ms, content_type, length_seconds, engagement_seconds,
       engagement_pct, raw_payload, op, source_lsn, source_committed_at, is_deleted
  FROM engagement.enriched_engagements FINAL
 WHERE event_id > {low:Int64} AND event_id <= {high:Int64} AND is_deleted = 0
"""
# Bounds of every id ClickHouse ever held for the day, any version: cheap (partition pruning and
# the event_ts minmax index, no FINAL).
CLICKHOUSE_DAY_BOUNDS = """
SELECT min(event_id), max(event_id), count()
  FROM engagement.enriched_engagements
 WHERE event_ts >= {start:DateTime64(6, 'UTC')} AND event_ts < {end:DateTime64(6, 'UTC')}
"""

# Columns that make two versions the same row (what a re-run must not rewrite).
COMPARED = tuple(
    c for c in ENRICHED_ROWS_SCHEMA if c not in {"op", "source_lsn", "source_committed_at"}
)
_MONTH = "_month"


class BackfillError(RuntimeError):
    """A backfill cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class SourceSnapshot:
    """A REPEATABLE READ transaction on a replication connection, at a slot's consistent point.

    `version` (consistent point - 1) is what every row read from it is stamped with.
    """

    cursor: psycopg2.extensions.cursor
    slot: str
    consistent_lsn: int
    taken_at: datetime

    @property
    def version(self) -> int:
        return self.consistent_lsn - 1

    def content(self) -> pl.DataFrame:
        """Content as the snapshot sees it, valid since before anything read (LSN 0)."""
        self.cursor.execute(CONTENT_QUERY)
        rows = self.cursor.fetchall()
        return fold_content_versions(
            content_versions([ContentVersion(str(i), t, n, 0) for i, t, n in rows])
        )

    def copy_events(
        self, where: str, params: Mapping[str, object], chunk_rows: int
    ) -> Iterator[pl.DataFrame]:
        """The matching events by id, `chunk_rows` at a time, as text columns.

        COPY runs in a thread while the caller works on the previous chunk: libpq and Polars
        release the GIL, so the server's reading and our enriching and writing overlap.
        """
        query = self.cursor.mogrify(EVENTS_COPY.format(where=where), params).decode()
        chunks: queue.Queue[pl.DataFrame | BaseException | None] = queue.Queue(maxsize=2)
        stop = threading.Event()

        def hand_over(item: pl.DataFrame | BaseException | None) -> None:
            while not stop.is_set():
                try:
                    chunks.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue
            raise BackfillError("the backfill stopped reading; COPY abandoned")

        def copy() -> None:
            try:
                writer = _ChunkWriter(chunk_rows, hand_over)
                self.cursor.copy_expert(query, writer)
                writer.flush()
                hand_over(None)
            except BaseException as exc:  # handed to the reading thread, which raises it
                if not stop.is_set():
                    hand_over(exc)

        thread = threading.Thread(target=copy, name="backfill-copy", daemon=True)
        thread.start()
        try:
            while (item := chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=30)


@contextmanager
def source_snapshot(dsn: str, *, slot: str | None = None) -> Iterator[SourceSnapshot]:
    """A snapshot of the source with its exact LSN, held for the block.

    Without `slot`, a TEMPORARY slot (gone with the connection) only pins the snapshot. With it,
    a permanent slot of that name is created at the snapshot (restart from a point); the caller
    dropped any old one.
    """
    name = slot or f"engagement_backfill_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    validate_identifier(name)
    conn = pg_connect(
        dsn,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
        options="-c TimeZone=UTC -c DateStyle=ISO",
        application_name=f"engagement-backfill:{name}",
        connect_timeout=10,
    )
    try:
        cursor = conn.cursor()
        # SQL (and COPY) runs on a replication connection in database mode; psycopg2 sees it
        # as autocommit, so the transaction is opened and closed by hand.
        cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        kind = "" if slot else "TEMPORARY"
        cursor.execute(CREATE_SNAPSHOT_SLOT.format(slot=name, kind=kind))
        created = cursor.fetchone()
        if created is None:
            raise BackfillError(f"CREATE_REPLICATION_SLOT {name} returned nothing")
        cursor.execute(SNAPSHOT_STARTED_AT)
        started = cursor.fetchone()
        taken_at = started[0].astimezone(UTC) if started else datetime.now(UTC)
        cursor.execute(SORT_MEMORY)
        snapshot = SourceSnapshot(cursor, name, parse_lsn(created[1]), taken_at)
        log.info("snapshot at %s (slot %s)", format_lsn(snapshot.consistent_lsn), name)
        yield snapshot
        cursor.execute("COMMIT")
    finally:
        conn.close()


class _ChunkWriter(io.RawIOBase):
    """The file psycopg2's COPY writes into, one row per write(): parses every chunk_rows."""

    def __init__(self, chunk_rows: int, on_chunk: Callable[[pl.DataFrame], None]) -> None:
        super().__init__()
        self.chunk_rows = chunk_rows
        self.on_chunk = on_chunk
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        parts = self.parts
        parts.append(data)
        if len(parts) >= self.chunk_rows:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if not self.parts:
            return
        text = pl.read_csv(
            io.BytesIO(b"".join(self.parts)),
            has_header=False,
            new_columns=list(IMAGE_COLUMNS),
            schema=dict.fromkeys(IMAGE_COLUMNS, pl.String()),
            quote_char='"',
        )
        self.parts = []
        self.on_chunk(text)


@dataclass(frozen=True)
class DayReport:
    day: date
    rows_read: int  # events of the day in the snapshot
    dead_letters: int  # of those, invalid (the stream recorded them when they were written)
    rows_written: int  # live versions written: missing or different in ClickHouse
    tombstones: int  # stale ClickHouse rows removed (deleted, moved or invalid in the source)
    kafka_messages: int
    seconds: float


@dataclass(frozen=True)
class BackfillReport:
    consistent_lsn: int
    version: int
    days: tuple[DayReport, ...]
    seconds: float

    @property
    def rows_read(self) -> int:
        return sum(d.rows_read for d in self.days)

    @property
    def rows_written(self) -> int:
        return sum(d.rows_written for d in self.days)

    @property
    def tombstones(self) -> int:
        return sum(d.tombstones for d in self.days)

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0


def days_between(first_day: date, last_day: date) -> list[date]:
    if last_day < first_day:
        raise BackfillError(f"last day {last_day} is before first day {first_day}")
    return [first_day + timedelta(days=i) for i in range((last_day - first_day).days + 1)]


def backfill_days(
    settings: Settings,
    first_day: date,
    last_day: date,
    *,
    to_kafka: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    rules: EnrichRules | None = None,
) -> BackfillReport:
    """Make ClickHouse hold exactly what one new snapshot of the source holds for these UTC days.

    Safe while the stream runs and idempotent: a second run writes nothing new when nothing
    changed. `to_kafka` also replays the days to engagement.enriched.v1 (op "r").
    """
    with source_snapshot(settings.pg_dsn) as snapshot:
        return backfill_in_snapshot(
            snapshot, settings, first_day, last_day,
            to_kafka=to_kafka, chunk_rows=chunk_rows, rules=rules,
        )  # fmt: skip


def backfill_in_snapshot(
    snapshot: SourceSnapshot,
    settings: Settings,
    first_day: date,
    last_day: date,
    *,
    to_kafka: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    rules: EnrichRules | None = None,
) -> BackfillReport:
    """`backfill_days` inside a snapshot the caller holds (restart uses its new slot's)."""
    started = time.monotonic()
    days = days_between(first_day, last_day)
    rules = rules or EnrichRules(event_types=settings.event_types)
    tables = ClickHouseSink(settings.clickhouse_dsn)
    try:
        tables.setup()
    finally:
        tables.close()  # releases embedded ClickHouse's file lock for the session below
    warehouse = _Warehouse(
        ClickHouseSession(settings.clickhouse_dsn, hold_s=settings.clickhouse_hold_seconds)
    )
    kafka = _replay_sink(settings, first_day, last_day) if to_kafka else None
    try:
        if kafka is not None:
            kafka.setup()
        content = snapshot.content()
        reports = tuple(
            _DayBackfill(snapshot, day, content, rules, warehouse, kafka, chunk_rows).run()
            for day in days
        )
    finally:
        warehouse.close()
        if kafka is not None:
            kafka.close()
    return BackfillReport(
        snapshot.consistent_lsn, snapshot.version, reports, time.monotonic() - started
    )


def _replay_sink(settings: Settings, first_day: date, last_day: date) -> KafkaSink:
    """A producer of its own: the stream's transactional.id would fence the stream. Runs of the
    same days share one, so a stale run of those days is fenced by the newer."""
    return KafkaSink(
        kafka_client_config(settings),
        transactional_id=f"engagement-backfill-{settings.slot}-{first_day}-{last_day}",
        topic_prefix=settings.kafka_topic_prefix,
    )


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, dt_time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


class _DayBackfill:
    """One day: chunks of the snapshot compared with ClickHouse over their id ranges."""

    def __init__(
        self,
        snapshot: SourceSnapshot,
        day: date,
        content: pl.DataFrame,
        rules: EnrichRules,
        warehouse: _Warehouse,
        kafka: KafkaSink | None,
        chunk_rows: int,
    ) -> None:
        self.snapshot = snapshot
        self.day = day
        self.start, self.end = day_bounds(day)
        self.content = content
        self.rules = rules
        self.warehouse = warehouse
        self.kafka = kafka
        self.chunk_rows = chunk_rows
        self.low: int | None = None  # ids at or below it are done
        self.ch_low, self.ch_high = self._clickhouse_day_bounds()
        self.stale: list[pl.DataFrame] = []  # ClickHouse rows of the day the snapshot lacks
        self.dead_letters = self.rows_written = self.tombstones = self.kafka_messages = 0

    def run(self) -> DayReport:
        started = time.monotonic()
        params = {"start": self.start, "end": self.end}
        rows_read = 0
        for text in self.snapshot.copy_events(DAY_WHERE, params, self.chunk_rows):
            rows_read += text.height
            self._chunk(text)
        if self.ch_high is not None and (self.low is None or self.low < self.ch_high):
            self._chunk(None)  # ids above the last chunk that ClickHouse has for the day
        self._resolve_stale()
        self.warehouse.wait()
        report = DayReport(
            self.day, rows_read, self.dead_letters, self.rows_written, self.tombstones,
            self.kafka_messages, time.monotonic() - started,
        )  # fmt: skip
        log.info("backfill %s", report)
        return report

    def _clickhouse_day_bounds(self) -> tuple[int | None, int | None]:
        parameters = {"start": self.start, "end": self.end}
        result = self.warehouse.read(
            lambda client: client.query(CLICKHOUSE_DAY_BOUNDS, parameters=parameters).result_rows
        )
        low, high, count = result[0]
        return (int(low), int(high)) if count else (None, None)

    def _chunk(self, text: pl.DataFrame | None) -> None:
        """Write what ClickHouse lacks for this chunk's ids; note what it holds too many of.

        A chunk owns the ids in (low, high]: the first from below anything ClickHouse holds for
        the day, the last (text None) up to the highest id ClickHouse holds for it.
        """
        rows = self._enrich(text) if text is not None else _empty_rows()
        read_ids = text["id"].cast(pl.Int64, strict=False) if text is not None else None
        low = self.low
        if low is None:
            lowest = [self.ch_low, _int_or_none(read_ids.min() if read_ids is not None else None)]
            low = min(v for v in lowest if v is not None) - 1
        high = _int_or_none(read_ids.max()) if read_ids is not None else self.ch_high
        high = max(low, high if high is not None else low)
        held = self._clickhouse_range(low, high)
        self.low = high
        plan = plan_chunk(rows, held, self.snapshot.version, self.start, self.end)
        self.stale.append(plan.stale)
        tombstones = self._tombstones(plan.moved_out, self.snapshot.version - 1)
        self._write(pl.concat([plan.to_write, tombstones]), replay=pl.concat([rows, tombstones]))
        self.rows_written += plan.to_write.height
        self.tombstones += tombstones.height

    def _enrich(self, text: pl.DataFrame) -> pl.DataFrame:
        """Valid rows of a chunk, enriched by the stream's code as inserts at the snapshot."""
        changes = text.with_columns(
            seq=pl.int_range(text.height, dtype=pl.UInt32),
            op=pl.lit("insert"),
            source_lsn=pl.lit(self.snapshot.version, pl.UInt64),
            source_committed_at=pl.lit(self.snapshot.taken_at, UTC_MICROS),
            **{f"old_{name}": pl.lit(None, pl.String) for name in IMAGE_COLUMNS},
        ).select(CHANGES_SCHEMA.names())
        enriched = enrich(changes, self.content, self.rules)
        self.dead_letters += enriched.dead_letters.height
        return enriched.rows.with_columns(op=pl.lit(REPLAY_OP))

    def _clickhouse_range(self, low: int, high: int) -> pl.DataFrame:
        table = self.warehouse.read(
            lambda client: client.query_arrow(
                CLICKHOUSE_RANGE, parameters={"low": low, "high": high}, use_strings=True
            )
        )
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame.select(
            pl.col(name).cast(dtype) for name, dtype in ENRICHED_ROWS_SCHEMA.items()
        )

    def _resolve_stale(self) -> None:
        """ClickHouse rows of the day the snapshot's day lacks: the event moved to another day
        (write where it is now, and a tombstone if that is another month), or it is gone or
        invalid in the source (a tombstone)."""
        stale = pl.concat(self.stale) if self.stale else _empty_rows()
        if stale.height == 0:
            return
        ids = stale["event_id"].to_list()
        found = list(self.snapshot.copy_events(IDS_WHERE, {"ids": ids}, self.chunk_rows))
        current = pl.concat([self._enrich(text) for text in found]) if found else _empty_rows()
        resolved = resolve_stale(stale, current)
        tombstones = pl.concat(
            [
                self._tombstones(resolved.gone, self.snapshot.version),
                self._tombstones(resolved.moved_out, self.snapshot.version - 1),
            ]
        )
        batch = pl.concat([resolved.to_write, tombstones])
        self._write(batch, replay=batch)
        self.rows_written += resolved.to_write.height
        self.tombstones += tombstones.height

    def _tombstones(self, rows: pl.DataFrame, version: int) -> pl.DataFrame:
        """Tombstones of ClickHouse rows: same key and event time, so each lands in the partition
        of the version it deletes.

        `version` is the snapshot's for an event the snapshot lacks. For a copy in another month
        of an event the snapshot holds elsewhere it is one less: FINAL collapses an event across
        partitions too, and on a version tie the later partition wins, whatever the insert order
        (measured in chDB), so a tombstone tied with the live row would delete the event when it
        moved to an earlier month. version - 1 is still above every version the snapshot holds
        (a commit record is many bytes long; the one before the consistent point ends below it).
        """
        return rows.with_columns(
            op=pl.lit(REPLAY_OP),
            source_lsn=pl.lit(version, pl.UInt64),
            source_committed_at=pl.lit(self.snapshot.taken_at, UTC_MICROS),
            is_deleted=pl.lit(1, pl.UInt8),
        )

    def _write(self, rows: pl.DataFrame, *, replay: pl.DataFrame) -> None:
        if rows.height:
            self.warehouse.insert(insertable(rows).to_arrow())
        if self.kafka is not None and replay.height:
            self.kafka.write(
                SinkBatch(
                    last_lsn=self.snapshot.version,
                    rows=replay,
                    deltas=DELTAS_SCHEMA.to_frame(),
                    dead_letters=DEAD_LETTERS_SCHEMA.to_frame(),
                ),
                0,
            )
            self.kafka_messages += replay.height


class _Warehouse:
    """ClickHouse for one backfill, used from a thread of its own (a chDB session is not
    thread-safe): an insert runs while the next chunk is read and enriched, and a read waits
    for the inserts queued before it, raising the first that failed."""

    def __init__(self, session: ClickHouseSession) -> None:
        self.session = session
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backfill-clickhouse")
        self.pending: list[Future[None]] = []

    def read(self, query: Callable[[Client], T]) -> T:
        self.wait()
        return self.pool.submit(self._use, query).result()

    def insert(self, table: pa.Table) -> None:
        def insert(client: Client) -> None:
            client.insert_arrow("engagement.enriched_engagements", table)

        self.pending.append(self.pool.submit(self._use, insert))

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()

    def _use(self, work: Callable[[Client], T]) -> T:
        with self.session.use() as client:
            return work(client)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.submit(self.session.release).result()
            self.pool.shutdown()


@dataclass(frozen=True)
class ChunkPlan:
    to_write: pl.DataFrame  # snapshot rows ClickHouse lacks or holds differently
    moved_out: pl.DataFrame  # ClickHouse versions of the chunk's events in another month
    stale: pl.DataFrame  # ClickHouse rows of the day whose event the chunk lacks


def plan_chunk(
    rows: pl.DataFrame, held: pl.DataFrame, version: int, start: datetime, end: datetime
) -> ChunkPlan:
    """Compare a chunk of snapshot rows with ClickHouse's live rows over the same ids.

    ClickHouse versions at or above the snapshot's are newer than it (a live stream wrote them)
    and are left alone; so is a version equal to the snapshot row in every column, which makes
    a re-run write nothing.
    """
    if held.height == 0:  # a day ClickHouse does not hold yet: everything is written
        empty = held.clear()
        return ChunkPlan(to_write=rows, moved_out=empty, stale=empty)
    rows = rows.with_columns(_month())
    held = held.with_columns(_month())
    older = held.filter(pl.col("source_lsn") < version)
    same = rows.join(held, on=list(COMPARED), how="semi", nulls_equal=True)
    newer = held.filter(pl.col("source_lsn") >= version).select("event_id", _MONTH)
    to_write = rows.join(same.select("event_id"), on="event_id", how="anti").join(
        newer, on=["event_id", _MONTH], how="anti"
    )
    homes = rows.select("event_id", home=pl.col(_MONTH))
    elsewhere = older.join(homes, on="event_id").filter(pl.col(_MONTH) != pl.col("home"))
    in_day = (pl.col("event_ts") >= start) & (pl.col("event_ts") < end)
    stale = older.filter(in_day).join(rows, on="event_id", how="anti")
    return ChunkPlan(
        to_write=to_write.drop(_MONTH),
        moved_out=elsewhere.drop(_MONTH, "home"),
        stale=stale.drop(_MONTH),
    )


@dataclass(frozen=True)
class StalePlan:
    to_write: pl.DataFrame  # the events' rows where the snapshot holds them now
    gone: pl.DataFrame  # stale rows of events the snapshot lacks (deleted, or now invalid)
    moved_out: pl.DataFrame  # stale rows of events now in another month


def resolve_stale(stale: pl.DataFrame, current: pl.DataFrame) -> StalePlan:
    """Stale ClickHouse rows against the snapshot's valid rows of the same events (any day)."""
    stale = stale.with_columns(_month())
    current_homes = current.with_columns(_month()).select("event_id", home=pl.col(_MONTH))
    moved_month = stale.join(current_homes, on="event_id").filter(pl.col(_MONTH) != pl.col("home"))
    gone = stale.join(current_homes, on="event_id", how="anti")
    return StalePlan(
        to_write=current.join(stale.select("event_id"), on="event_id", how="semi"),
        gone=gone.drop(_MONTH),
        moved_out=moved_month.drop(_MONTH, "home"),
    )


def _month() -> pl.Expr:
    """The monthly partition of a row (toYYYYMM(event_ts)), where versions collapse."""
    return (pl.col("event_ts").dt.year() * 100 + pl.col("event_ts").dt.month()).alias(_MONTH)


def _empty_rows() -> pl.DataFrame:
    return ENRICHED_ROWS_SCHEMA.to_frame()


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]
