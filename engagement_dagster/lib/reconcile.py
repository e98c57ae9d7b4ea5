"""Reconciliation of one closed 10-minute window across PostgreSQL and the three sinks: the
"nothing lost, nothing doubled" counts behind the `window_reconciles_across_sinks` check.

Only reads: it never writes to a source or a sink, never touches the replication slot beyond
reading its position, and every wait (chDB lock, checkpoints, Kafka) is bounded.

What is compared, for the window [start, start + 10m) by event time: the number of current
(not deleted) valid events and their engagement in integer milliseconds (sum of duration_ms,
NULL as 0, the unit the rollups and the Redis stats hashes add up exactly).

- PostgreSQL: the window's rows read in one REPEATABLE READ snapshot, validated by the stream's
  own code (lib/enrich.py, the configured rules), as a backfill reads them. Its LSN T is the WAL
  insert position taken right after the snapshot: every commit the snapshot shows is below it.
- ClickHouse: enriched_engagements as of T: per event the newest version with source_lsn <= T,
  ReplacingMergeTree's rule (version, then the later partition, then the later insert), so the
  count is FINAL's whenever the sink is not ahead of the snapshot and a change committed while
  the check runs cannot make it differ.
- Redis: the window's stats hashes, one per content of the window (all of them, not just the top
  100; `read_window` reads them through the `_members` set). A closed window holds what its
  rollup wrote (asof_lsn of engagement._rollup_10m_windows), an open one what the stream applied.
- Kafka: see `read_kafka_window`.

A sink that differs is "behind" rather than "lost" when it has not applied everything up to T
(its checkpoint, or the slot's confirmed position, which moves only past what every sink applied,
is below T): the check waits for it (bounded) and reads again, and reports it as behind if it is
still short, or, for a closed Redis window, when it holds exactly the window as of its rollup and
the window changed since (a re-roll is due). Counts that agree need no wait at all.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import polars as pl
import psycopg2.extensions
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from engagement_dagster.lib import rollups
from engagement_dagster.lib.backfill import DAY_WHERE, EVENTS_COPY
from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    IMAGE_COLUMNS,
    UTC_MICROS,
    EnrichRules,
    content_versions,
    enrich,
    fold_content_versions,
)
from engagement_dagster.lib.kafka_config import librdkafka_config
from engagement_dagster.lib.pgoutput import format_lsn, parse_lsn
from engagement_dagster.lib.pipeline import enrich_rules, kafka_sink
from engagement_dagster.lib.secure import redis_client
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.kafka import KafkaSink
from engagement_dagster.lib.sinks.kafka_confluent import ConfluentKafkaSink, last_checkpoint
from engagement_dagster.lib.sinks.kafka_contract import KafkaTopics
from engagement_dagster.lib.sinks.redis import read_checkpoint as read_redis_checkpoint
from engagement_dagster.lib.sinks.redis import read_window
from engagement_dagster.lib.source_db import connect
from engagement_dagster.lib.windows import window_members_key

Status = Literal["equal", "differs", "behind", "unavailable"]

# The snapshot is taken by the first statement that needs one; the WAL insert position is read
# inside it, so every commit the snapshot shows lies below it (T).
SNAPSHOT_LSN = "SELECT pg_current_wal_insert_lsn()::text, now()"
SLOT_POSITION = """
SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = %s
"""

# The window in ClickHouse as of an LSN: every event that has a version in the window, its newest
# version at or below the LSN (ties: the later partition, then the later insert, as FINAL), kept
# when that version is live and in the window. Plus the earliest commit time of any version in
# the window (where the Kafka read starts).
CLICKHOUSE_AS_OF = """
SELECT count(), toInt64(sum(coalesce(latest.3, 0)))
  FROM (
    SELECT argMax(tuple(is_deleted, event_ts, duration_ms, content_id),
                  tuple(source_lsn, toYYYYMM(event_ts), ingested_at)) AS latest
      FROM engagement.enriched_engagements
     WHERE event_id IN (SELECT event_id FROM engagement.enriched_engagements
                         WHERE event_ts >= toDateTime64({start:UInt32}, 6, 'UTC')
                           AND event_ts < toDateTime64({end:UInt32}, 6, 'UTC'))
       AND source_lsn <= {asof:UInt64}
     GROUP BY event_id
  )
 WHERE latest.1 = 0 AND latest.4 IS NOT NULL
   AND latest.2 >= toDateTime64({start:UInt32}, 6, 'UTC')
   AND latest.2 < toDateTime64({end:UInt32}, 6, 'UTC')
"""
CLICKHOUSE_EARLIEST_COMMIT = """
SELECT count(), min(source_committed_at) FROM engagement.enriched_engagements
 WHERE event_ts >= toDateTime64({start:UInt32}, 6, 'UTC')
   AND event_ts < toDateTime64({end:UInt32}, 6, 'UTC')
"""

# The fields of an `engagement.enriched.v1` value the reconciliation reads (the rest is ignored).
KAFKA_FIELDS = pl.Schema(
    {
        "event_id": pl.Int64(),
        "content_id": pl.String(),
        "event_ts": pl.String(),
        "duration_ms": pl.Int64(),
        "source_lsn": pl.UInt64(),
        "is_deleted": pl.Int64(),  # (Polars' ndjson reader cannot read straight into UInt8)
    }
)
KAFKA_TS_FORMAT = "%Y-%m-%dT%H:%M:%S%.fZ"
PARSE_EVERY = 50_000  # messages parsed into columns at a time: memory stays a few bytes a message


class ReconcileError(RuntimeError):
    """A source could not be read within the limits; the message says which and what to do."""


@dataclass(frozen=True)
class Count:
    """Current valid events of the window and their engagement in integer milliseconds."""

    events: int
    engagement_ms: int

    def minus(self, other: Count) -> Count:
        return Count(self.events - other.events, self.engagement_ms - other.engagement_ms)


@dataclass(frozen=True)
class SinkCount:
    """One sink's count and verdict. `applied_lsn`: what the sink has applied in full (its
    checkpoint, or the slot's position if higher; a closed Redis window: its rollup's asof_lsn)."""

    sink: str
    count: Count | None  # None: could not be read (see detail)
    applied_lsn: int | None
    status: Status
    detail: str = ""

    def difference(self, postgres: Count) -> Count | None:
        return None if self.count is None else self.count.minus(postgres)


@dataclass(frozen=True)
class Reconciliation:
    """The window's counts in PostgreSQL and each sink, and whether they reconcile."""

    window_start: datetime
    postgres_lsn: int
    postgres: Count
    sinks: tuple[SinkCount, ...]
    kafka_doubled: int  # messages of the window delivered more than once (read_committed)
    kafka_messages_read: int
    kafka_read_from: datetime | None
    waited_s: float
    reads: int  # 1, or 2 when a difference was read again after waiting

    @property
    def passed(self) -> bool:
        return self.kafka_doubled == 0 and all(s.status == "equal" for s in self.sinks)

    def with_status(self, status: Status) -> tuple[str, ...]:
        return tuple(s.sink for s in self.sinks if s.status == status)

    def sink(self, name: str) -> SinkCount:
        return next(s for s in self.sinks if s.sink == name)

    def summary(self) -> str:
        """One line per sink that does not reconcile, or that all do."""
        if self.passed:
            return (
                f"PostgreSQL, ClickHouse, Redis and Kafka agree: {self.postgres.events} events, "
                f"{self.postgres.engagement_ms} ms; nothing doubled in Kafka"
            )
        return "\n".join(f"{s.sink} {s.status}: {s.detail}" for s in self.sinks if s.detail)


@dataclass(frozen=True)
class ReconcileTargets:
    """Where PostgreSQL and the sinks are, and the rules the stream validates with."""

    pg_dsn: str
    slot: str
    clickhouse_dsn: str
    redis_url: str
    kafka_config: Mapping[str, Any]  # librdkafka properties (lib/kafka_config.py)
    enriched_topic: str
    checkpoint_topic: str
    kafka_transactional_id: str  # the stream's producer: its records in the checkpoint topic
    rules: EnrichRules
    lateness_s: int
    redis_ttl_s: int  # of the 10m window keys: an older window's keys are gone by design

    @classmethod
    def from_settings(cls, settings: Settings) -> ReconcileTargets:
        sink = kafka_sink(settings)  # only for its producer's identity: it opens no connection
        assert isinstance(sink, KafkaSink | ConfluentKafkaSink)
        topics = KafkaTopics.with_prefix(settings.kafka_topic_prefix)
        return cls(
            pg_dsn=settings.pg_dsn,
            slot=settings.slot,
            clickhouse_dsn=settings.clickhouse_dsn,
            redis_url=settings.redis_url,
            kafka_config=librdkafka_config(settings),
            enriched_topic=topics.enriched,
            checkpoint_topic=topics.checkpoint,
            kafka_transactional_id=sink.transactional_id,
            rules=enrich_rules(settings),
            lateness_s=settings.rollup_lateness_seconds,
            redis_ttl_s=settings.window_ttls["10m"],
        )


@dataclass(frozen=True)
class ReconcileLimits:
    wait_s: float = 60.0  # for sinks behind PostgreSQL's LSN, once something differs
    poll_s: float = 1.0
    kafka_margin_s: float = 60.0  # read Kafka from this long before the earliest commit
    kafka_deadline_s: float = 60.0  # reading the enriched topic to its end
    kafka_max_messages: int = 5_000_000  # a larger range fails at once, saying so
    kafka_timeout_s: float = 10.0  # metadata, offsets and the checkpoint record


# --- PostgreSQL -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresRead:
    lsn: int  # T: every commit the snapshot shows lies below it
    read_at: datetime
    count: Count


def read_postgres(dsn: str, start: datetime, end: datetime, rules: EnrichRules) -> PostgresRead:
    """The window's valid current events, from one snapshot, with its LSN."""
    with connect(dsn, autocommit=False, application_name="engagement-reconcile") as conn:
        conn.set_session(
            isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ, readonly=True
        )
        with conn.cursor() as cur:
            # Text exactly as pgoutput sends it (lib/backfill.py's COPY): UTC, ISO dates.
            cur.execute("SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'")
            cur.execute(SNAPSHOT_LSN)
            row = cur.fetchone()
            assert row is not None
            lsn, read_at = parse_lsn(row[0]), row[1].astimezone(UTC)
            buffer = io.BytesIO()
            query = cur.mogrify(EVENTS_COPY.format(where=DAY_WHERE), {"start": start, "end": end})
            cur.copy_expert(query.decode(), buffer)
        conn.rollback()
    return PostgresRead(lsn, read_at, postgres_count(buffer.getvalue(), lsn, read_at, rules))


def postgres_count(csv: bytes, lsn: int, read_at: datetime, rules: EnrichRules) -> Count:
    """Count the valid events of EVENTS_COPY's CSV as the stream would: each row enriched as an
    insert committed at `read_at` (the future-time rule's reference, as a backfill's)."""
    if not csv:
        return Count(0, 0)
    text = pl.read_csv(
        io.BytesIO(csv),
        has_header=False,
        new_columns=list(IMAGE_COLUMNS),
        schema=dict.fromkeys(IMAGE_COLUMNS, pl.String()),
        quote_char='"',
    )
    changes = text.with_columns(
        seq=pl.int_range(text.height, dtype=pl.UInt32),
        op=pl.lit("insert"),
        source_lsn=pl.lit(lsn, pl.UInt64),
        source_committed_at=pl.lit(read_at, UTC_MICROS),
        **{f"old_{name}": pl.lit(None, pl.String) for name in IMAGE_COLUMNS},
    ).select(CHANGES_SCHEMA.names())
    # Content only adds columns: validity and duration do not depend on it.
    rows = enrich(changes, fold_content_versions(content_versions([])), rules).rows
    live = rows.filter(pl.col("is_deleted") == 0)
    return Count(live.height, int(live["duration_ms"].fill_null(0).cast(pl.Int64).sum()))


@dataclass(frozen=True)
class SlotPosition:
    confirmed_lsn: int  # everything below it is applied by every sink
    active: bool  # a stream run is consuming the slot


def read_slot(dsn: str, slot: str) -> SlotPosition:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(SLOT_POSITION, (slot,))
        row = cur.fetchone()
    if row is None or row[0] is None:
        return SlotPosition(0, False)
    return SlotPosition(parse_lsn(row[0]), bool(row[1]))


# --- ClickHouse -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClickHouseRead:
    checkpoint: int
    count: Count  # as of PostgreSQL's LSN
    earliest_commit: datetime | None  # of any version in the window
    rollup_asof: int | None  # the window's rollup (what a closed Redis window holds)
    at_rollup: Count | None  # the window as of that rollup


def read_clickhouse(dsn: str, start: datetime, end: datetime, asof: int) -> ClickHouseRead:
    """One short chDB section: the checkpoint first (rows below it are there), then the counts."""
    params = {"start": int(start.timestamp()), "end": int(end.timestamp())}
    with clickhouse_client(dsn) as client:
        rollups.ensure_tables(client)
        checkpoint = rollups.read_clickhouse_checkpoint(client)
        count = _clickhouse_as_of(client, params, asof)
        versions, earliest = client.query(
            CLICKHOUSE_EARLIEST_COMMIT, parameters=params
        ).result_rows[0]
        rollup_asof = rollups.rolled_up(client, start)
        at_rollup = _clickhouse_as_of(client, params, rollup_asof) if rollup_asof else None
    return ClickHouseRead(
        checkpoint,
        count,
        earliest.replace(tzinfo=UTC) if versions and earliest is not None else None,
        rollup_asof,
        at_rollup,
    )


def _clickhouse_as_of(client: Client, params: Mapping[str, int], asof: int) -> Count:
    events, ms = client.query(CLICKHOUSE_AS_OF, parameters={**params, "asof": asof}).result_rows[0]
    return Count(int(events), int(ms or 0))


# --- Redis ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisRead:
    checkpoint: int
    count: Count
    keys_exist: bool  # the window's member set is there (it expires with the window's TTL)


def read_redis(url: str, start: datetime) -> RedisRead:
    client = redis_client(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        checkpoint = read_redis_checkpoint(client)  # first: what the stream applied is there
        frame = read_window(client, "10m", start)
        exists = bool(client.exists(window_members_key("10m", start)))
    finally:
        client.close()
    ms = (frame["engagement_seconds_sum"] * 1000).round(0).cast(pl.Int64).sum()
    return RedisRead(checkpoint, Count(int(frame["events"].sum()), int(ms)), exists)


# --- Kafka ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaRead:
    count: Count  # as of PostgreSQL's LSN
    doubled: int
    messages: int
    read_from: datetime
    truncated: bool  # retention deleted messages from where the read should have started


def _consumer(config: Mapping[str, Any], purpose: str, **extra: Any) -> Consumer:
    return Consumer(
        {
            **config,
            "group.id": f"engagement-reconcile-{purpose}-{uuid.uuid4().hex[:8]}",  # never joins
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,  # tells where the committed records end
            **extra,
        }
    )


def _partitions(consumer: Consumer, topic: str, timeout_s: float) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        return []
    return sorted(metadata.partitions)


def read_kafka_checkpoint(targets: ReconcileTargets, timeout_s: float) -> int:
    """The stream producer's last committed checkpoint record (0: none). Read with a consumer
    only: the confluent sink's own read initialises its producer, which would fence the live
    stream's."""
    consumer = _consumer(targets.kafka_config, "checkpoint", **{"fetch.wait.max.ms": 10})
    try:
        if not _partitions(consumer, targets.checkpoint_topic, timeout_s):
            return 0
        lsn = last_checkpoint(
            consumer, targets.checkpoint_topic, targets.kafka_transactional_id, timeout_s
        )
    finally:
        consumer.close()
    if lsn is not None:
        return lsn
    raise ReconcileError(
        f"kafka: the end of {targets.checkpoint_topic} was not reached within {timeout_s:.0f} s; "
        f"is the broker at {targets.kafka_config.get('bootstrap.servers')} up?"
    )


def read_kafka_window(
    targets: ReconcileTargets,
    start: datetime,
    end: datetime,
    *,
    asof: int,
    earliest_commit: datetime | None,
    limits: ReconcileLimits,
) -> KafkaRead:
    """The window as Kafka consumers see it (read_committed), as of PostgreSQL's LSN.

    A message's record timestamp is its produce time, never before its change's commit time.
    So each partition is read from (lower bound - margin) to its current end, where the lower
    bound is the earliest commit time of any version ClickHouse holds in the window, and never
    later than the window start; per event the newest message (source_lsn <= asof; a live version
    beats a tombstone at the same LSN) counts when it is live and in the window. `doubled`: extra
    copies of one (event_id, source_lsn, is_deleted, month) among the range's messages whose
    event time is in the window.

    What it can detect: an event whose newest message is missing (the older version, or nothing,
    counts instead), a delete never delivered, a version delivered twice, for every event
    committed after the lower bound: all events of the window that ClickHouse still knows, and
    every event committed after the window start (live traffic always is).
    What it cannot: a message lost for an event committed before (window start - margin) that
    ClickHouse does not hold either (a forward-dated event both sinks lost: ClickHouse's own
    count shows it), a loss that leaves count and milliseconds unchanged (an update of another
    column), duplicates outside the range read, and messages retention already deleted (the
    result says `truncated`, not lost).
    """
    lower = min(start, earliest_commit) if earliest_commit is not None else start
    read_from = lower - timedelta(seconds=limits.kafka_margin_s)
    topic, timeout_s = targets.enriched_topic, limits.kafka_timeout_s
    consumer = _consumer(targets.kafka_config, "window")
    try:
        partitions = _partitions(consumer, topic, timeout_s)
        if not partitions:
            raise ReconcileError(
                f"kafka: topic {topic} does not exist; has the stream run with this "
                "ENGAGEMENT_KAFKA_TOPIC_PREFIX?"
            )
        ms = int(read_from.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, ms) for p in partitions], timeout=timeout_s
        )
        assign, planned, truncated = [], 0, False
        for tp in found:
            if tp.error is not None:
                raise ReconcileError(f"kafka: no offset by time for {topic}: {tp.error}")
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=timeout_s, cached=False
            )
            first = high if tp.offset < 0 else tp.offset
            truncated |= low > 0 and first == low  # the log starts after what we wanted
            if first < high:
                assign.append(TopicPartition(topic, tp.partition, first))
                planned += high - first
        if planned > limits.kafka_max_messages:
            raise ReconcileError(
                f"kafka: {planned} messages of {topic} since {read_from:%Y-%m-%d %H:%M:%S} UTC "
                f"(the earliest commit of the window's versions, minus {limits.kafka_margin_s:.0f}"
                f" s) exceed the limit of {limits.kafka_max_messages}; raise kafka_max_messages "
                "in the check's config for this partition"
            )
        values = _read_to_end(consumer, assign, limits.kafka_deadline_s, topic)
    finally:
        consumer.close()
    count, doubled = kafka_count(values, start, end, asof)
    return KafkaRead(count, doubled, sum(v.height for v in values), read_from, truncated)


def _read_to_end(
    consumer: Consumer, assign: Sequence[TopicPartition], deadline_s: float, topic: str
) -> list[pl.DataFrame]:
    """Every committed message from the assigned offsets to each partition's end, as columns."""
    if not assign:
        return []
    consumer.assign(list(assign))
    pending = {tp.partition for tp in assign}
    deadline = time.monotonic() + deadline_s
    frames: list[pl.DataFrame] = []
    values: list[bytes] = []
    read = 0
    while pending:
        if time.monotonic() > deadline:
            raise ReconcileError(
                f"kafka: {topic} was not read to its end within {deadline_s:.0f} s ({read} "
                f"messages read, partitions {sorted(pending)} unfinished); raise "
                "kafka_deadline_seconds in the check's config, or check the broker"
            )
        for message in consumer.consume(num_messages=10_000, timeout=0.5):
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                pending.discard(message.partition())
            elif error is not None:
                raise ReconcileError(f"kafka: reading {topic} failed: {error}")
            elif message.partition() in pending and (value := message.value()):
                values.append(value)
                read += 1
        if len(values) >= PARSE_EVERY:
            frames.append(kafka_frame(values))
            values = []
    if values:
        frames.append(kafka_frame(values))
    return frames


def kafka_frame(values: Iterable[bytes]) -> pl.DataFrame:
    """The fields the count needs from `engagement.enriched.v1` JSON values."""
    frame = pl.read_ndjson(io.BytesIO(b"\n".join(values)), schema=KAFKA_FIELDS)
    return frame.with_columns(
        pl.col("event_ts").str.to_datetime(KAFKA_TS_FORMAT, time_zone="UTC", time_unit="us"),
        pl.col("is_deleted").cast(pl.UInt8),
    )


def kafka_count(
    frames: Sequence[pl.DataFrame], start: datetime, end: datetime, asof: int
) -> tuple[Count, int]:
    """The window's live events by each event's newest message at or below `asof`, and how many
    messages of the window were delivered more than once."""
    if not frames or not any(f.height for f in frames):
        return Count(0, 0), 0
    messages = pl.concat(frames)
    in_window = pl.col("event_ts").is_between(start, end, closed="left")
    doubled = (
        messages.filter(in_window)
        .group_by("event_id", "source_lsn", "is_deleted", pl.col("event_ts").dt.strftime("%Y%m"))
        .len()
        .select((pl.col("len") - 1).sum())
        .item()
    )
    newest = (
        messages.filter(pl.col("source_lsn") <= asof)
        .sort("source_lsn", pl.col("is_deleted"), descending=[False, True])
        .unique("event_id", keep="last", maintain_order=True)
        .filter(in_window & (pl.col("is_deleted") == 0) & pl.col("content_id").is_not_null())
    )
    ms = newest["duration_ms"].fill_null(0).sum()
    return Count(newest.height, int(ms)), int(doubled or 0)


# --- verdicts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What one read of a sink gave, before the verdict.

    `applied_lsn`: what it has applied in full (None: unknown). `lag_explains`: True when the
    difference is known to be a lag (the sink holds exactly an older state of the window), False
    when known not to be, None when the LSNs must tell. `same_as`: the sink it was built from
    and agrees with (a closed Redis window and the ClickHouse rollup): it shares its verdict.
    """

    sink: str
    count: Count | None
    applied_lsn: int | None
    lag_explains: bool | None = None
    same_as: str | None = None
    note: str = ""  # why count is None, or context for a difference
    extra_differences: tuple[str, ...] = ()  # differences beyond the count (Kafka's doubles)


def verdicts(
    postgres: Count, postgres_lsn: int, observations: Sequence[Observation], *, stream_active: bool
) -> tuple[SinkCount, ...]:
    """Each sink: equal to PostgreSQL; behind it (it has not applied everything up to
    PostgreSQL's LSN, and a lag explains the difference); differs (lost or doubled); or
    unavailable (could not be compared)."""
    differing = {
        o.sink
        for o in observations
        if o.count is not None and (o.count != postgres or o.extra_differences)
    }
    # Sinks judged by LSNs. When all of them differ and no stream run consumes the slot,
    # PostgreSQL changed after what the stream applied: a loss in each of them at once is not.
    tracked = [
        o for o in observations if o.count is not None and o.lag_explains is None and not o.same_as
    ]
    most_applied = max((o.applied_lsn or 0 for o in tracked), default=0)
    all_differ = bool(tracked) and all(o.sink in differing for o in tracked)
    results: dict[str, SinkCount] = {}
    for o in sorted(observations, key=lambda o: o.same_as is not None):  # leaders first
        if o.count is None:
            results[o.sink] = SinkCount(o.sink, None, o.applied_lsn, "unavailable", o.note)
        elif o.sink not in differing:
            results[o.sink] = SinkCount(o.sink, o.count, o.applied_lsn, "equal")
        else:
            leader = results.get(o.same_as) if o.same_as else None
            if leader is not None and leader.status == "behind":
                lag: str | None = f"{o.note}, and {leader.sink} is behind"
            elif leader is not None:
                lag = None
            else:
                lag = _lag(o, postgres_lsn, most_applied, all_differ, stream_active=stream_active)
            results[o.sink] = _differing(o, postgres, postgres_lsn, lag)
    return tuple(results[o.sink] for o in observations)


def _lag(
    o: Observation, postgres_lsn: int, most_applied: int, all_differ: bool, *, stream_active: bool
) -> str | None:
    """Why the sink's difference is a lag, or None when it is not one."""
    if o.extra_differences or o.lag_explains is False:
        return None
    if o.lag_explains:
        return o.note
    if o.applied_lsn is not None and o.applied_lsn >= postgres_lsn:
        return None  # it holds everything PostgreSQL showed
    if stream_active:
        return "still short after waiting for the running stream"
    if (o.applied_lsn or 0) < most_applied:
        return f"the other sinks have applied up to {format_lsn(most_applied)}"
    if all_differ:
        return (
            "every sink differs alike: PostgreSQL changed after what the stream applied, and "
            "no stream run is consuming the slot"
        )
    return None


def _differing(o: Observation, postgres: Count, postgres_lsn: int, lag: str | None) -> SinkCount:
    assert o.count is not None
    diff = o.count.minus(postgres)
    parts = (*o.extra_differences, _difference(diff)) if diff != Count(0, 0) else ()
    what = "; ".join(parts or o.extra_differences)
    applied = "?" if o.applied_lsn is None else format_lsn(o.applied_lsn)
    where = f"applied up to {applied}, PostgreSQL read at {format_lsn(postgres_lsn)}"
    if lag is not None:
        detail = f"{what} ({where}): {lag}; re-run the check once it caught up"
        return SinkCount(o.sink, o.count, o.applied_lsn, "behind", detail)
    note = f"; {o.note}" if o.note else ""
    return SinkCount(o.sink, o.count, o.applied_lsn, "differs", f"{what} ({where}{note})")


def _difference(diff: Count) -> str:
    """'1 event fewer and 30000 ms fewer than PostgreSQL'; zero parts left out."""
    events = f"{abs(diff.events)} event{'' if abs(diff.events) == 1 else 's'}"
    parts = [
        f"{amount} {'fewer' if n < 0 else 'more'}"
        for n, amount in (
            (diff.events, events),
            (diff.engagement_ms, f"{abs(diff.engagement_ms)} ms"),
        )
        if n
    ]
    return " and ".join(parts) + " than PostgreSQL"


# --- the reconciliation ---------------------------------------------------------------------------


def reconcile_window(
    targets: ReconcileTargets,
    start: datetime,
    *,
    limits: ReconcileLimits | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    clock: Callable[[], float] = time.monotonic,
) -> Reconciliation:
    """Reconcile the 10-minute window at `start`: read everything once; if anything differs,
    wait (up to limits.wait_s) for the sinks to apply what PostgreSQL showed, and read again."""
    limits = limits or ReconcileLimits()
    end = rollups.window_end("10m", start)
    began = clock()
    result = _read_all(targets, start, end, limits, now(), waited_s=0.0, reads=1)
    if result.passed:
        return result
    _wait_for_sinks(targets, result.postgres_lsn, began + limits.wait_s, limits, clock)
    return _read_all(targets, start, end, limits, now(), waited_s=clock() - began, reads=2)


def _read_all(
    targets: ReconcileTargets,
    start: datetime,
    end: datetime,
    limits: ReconcileLimits,
    now: datetime,
    *,
    waited_s: float,
    reads: int,
) -> Reconciliation:
    postgres = read_postgres(targets.pg_dsn, start, end, targets.rules)
    slot = read_slot(targets.pg_dsn, targets.slot)  # first: the sinks hold at least this
    clickhouse = read_clickhouse(targets.clickhouse_dsn, start, end, postgres.lsn)
    store = read_redis(targets.redis_url, start)
    kafka, kafka_seen = _kafka_observation(targets, start, end, postgres, clickhouse, slot, limits)
    observations = [
        Observation("clickhouse", clickhouse.count, max(clickhouse.checkpoint, slot.confirmed_lsn)),
        _redis_observation(targets, start, now, store, clickhouse, slot),
        kafka_seen,
    ]
    sinks = verdicts(postgres.count, postgres.lsn, observations, stream_active=slot.active)
    return Reconciliation(
        window_start=start,
        postgres_lsn=postgres.lsn,
        postgres=postgres.count,
        sinks=sinks,
        kafka_doubled=kafka.doubled if kafka else 0,
        kafka_messages_read=kafka.messages if kafka else 0,
        kafka_read_from=kafka.read_from if kafka else None,
        waited_s=waited_s,
        reads=reads,
    )


def _kafka_observation(
    targets: ReconcileTargets,
    start: datetime,
    end: datetime,
    postgres: PostgresRead,
    clickhouse: ClickHouseRead,
    slot: SlotPosition,
    limits: ReconcileLimits,
) -> tuple[KafkaRead | None, Observation]:
    """Kafka's count, its checkpoint read first (the messages below it are all there)."""
    try:
        checkpoint = read_kafka_checkpoint(targets, limits.kafka_timeout_s)
        kafka = read_kafka_window(
            targets, start, end, asof=postgres.lsn,
            earliest_commit=clickhouse.earliest_commit, limits=limits,
        )  # fmt: skip
    except (ReconcileError, KafkaException) as exc:
        return None, Observation("kafka", None, None, note=str(exc))
    applied = max(checkpoint, slot.confirmed_lsn)
    plural = "message" if kafka.doubled == 1 else "messages"
    doubled = (f"{kafka.doubled} {plural} delivered twice",) if kafka.doubled else ()
    if kafka.truncated and kafka.count != postgres.count and not doubled:
        note = (
            "retention deleted messages from where the read starts "
            f"({kafka.read_from:%Y-%m-%d %H:%M:%S} UTC): not comparable"
        )
        return kafka, Observation("kafka", None, applied, note=note)
    return kafka, Observation("kafka", kafka.count, applied, extra_differences=doubled)


def _redis_observation(
    targets: ReconcileTargets,
    start: datetime,
    now: datetime,
    store: RedisRead,
    clickhouse: ClickHouseRead,
    slot: SlotPosition,
) -> Observation:
    """Redis follows its checkpoint while the window is open to the stream; once closed, it
    holds what the window's rollup wrote (as of the rollup's asof_lsn)."""
    if now < rollups.closes_at("10m", start, targets.lateness_s):
        return Observation("redis", store.count, max(store.checkpoint, slot.confirmed_lsn))
    end = rollups.window_end("10m", start)
    if not store.keys_exist and now > end + timedelta(seconds=targets.redis_ttl_s):
        if clickhouse.count == Count(0, 0):  # an empty window has no keys either
            return Observation("redis", store.count, clickhouse.rollup_asof, same_as="clickhouse")
        note = f"the window's keys expired ({targets.redis_ttl_s} s after its end): not comparable"
        return Observation("redis", None, clickhouse.rollup_asof, note=note)
    asof = clickhouse.rollup_asof
    if asof is None:
        note = "the window closed and was never rolled up: changes after its close are not in Redis"
        return Observation("redis", store.count, None, lag_explains=True, note=note)
    rolled = f"its rollup at {format_lsn(asof)}"
    if store.count != clickhouse.at_rollup:  # not what its rollup wrote: Redis's own doing
        note = f"differs from {rolled}"
        return Observation("redis", store.count, asof, lag_explains=False, note=note)
    if clickhouse.at_rollup != clickhouse.count:
        note = f"holds {rolled} and the window changed since: late_change_sensor re-rolls it"
        return Observation("redis", store.count, asof, lag_explains=True, note=note)
    note = f"holds {rolled}, which is what ClickHouse holds"
    return Observation("redis", store.count, asof, same_as="clickhouse", note=note)


def _wait_for_sinks(
    targets: ReconcileTargets,
    lsn: int,
    deadline: float,
    limits: ReconcileLimits,
    clock: Callable[[], float],
) -> None:
    """Until every sink (or the slot, which passes only what all applied) reaches `lsn`, the
    deadline passes, or no stream run has consumed the slot for three polls in a row."""
    idle_polls = 0
    while clock() < deadline:
        slot = read_slot(targets.pg_dsn, targets.slot)
        if slot.confirmed_lsn >= lsn:
            return
        idle_polls = 0 if slot.active else idle_polls + 1
        if idle_polls >= 3:
            return
        with clickhouse_client(targets.clickhouse_dsn) as client:
            clickhouse = rollups.read_clickhouse_checkpoint(client)
        client_redis = redis_client(targets.redis_url, socket_timeout=10)
        try:
            redis_lsn = read_redis_checkpoint(client_redis)
        finally:
            client_redis.close()
        try:
            kafka = read_kafka_checkpoint(targets, limits.kafka_timeout_s)
        except (ReconcileError, KafkaException):
            kafka = 0  # down: wait for it like for any sink behind
        if min(clickhouse, redis_lsn, kafka) >= lsn:
            return
        time.sleep(limits.poll_s)
