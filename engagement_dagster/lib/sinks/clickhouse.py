"""ClickHouse sink: enriched rows and dead letters into the `engagement` database, exactly once.

Rows are versioned by source_lsn in a ReplacingMergeTree, so a replayed batch only re-inserts
versions that collapse; the checkpoint row is written after the data, never before it.
"""

from __future__ import annotations

import polars as pl

from engagement_dagster.lib.clickhouse import ClickHouseSession
from engagement_dagster.lib.sinks.base import Sink, SinkBatch

SINK_NAME = "clickhouse"

CREATE_DATABASE = "CREATE DATABASE IF NOT EXISTS engagement"

# Monthly partitions by event time; ReplacingMergeTree collapses versions within a partition,
# so an UPDATE that moves an event to another month also writes a tombstone of its old version
# into the old month (the stream does that from the old row that REPLICA IDENTITY FULL gives).
CREATE_ENRICHED = """
CREATE TABLE IF NOT EXISTS engagement.enriched_engagements (
    event_id            Int64,
    content_id          Nullable(UUID),
    user_id             Nullable(UUID),
    event_type          LowCardinality(String),
    event_ts            DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1)),
    device              LowCardinality(Nullable(String)),
    duration_ms         Nullable(Int32) CODEC(ZSTD(1)),
    content_type        LowCardinality(Nullable(String)),
    length_seconds      Nullable(Int32) CODEC(ZSTD(1)),
    engagement_seconds  Nullable(Float64) CODEC(Gorilla, ZSTD(1)),
    engagement_pct      Nullable(Float64) CODEC(Gorilla, ZSTD(1)),
    raw_payload         Nullable(String) CODEC(ZSTD(3)),
    op                  LowCardinality(String),
    source_lsn          UInt64 CODEC(Delta, ZSTD(1)),
    source_committed_at DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1)),
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1)),
    is_deleted          UInt8,
    INDEX content_id_bloom content_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX event_type_set event_type TYPE set(16) GRANULARITY 4,
    INDEX event_ts_minmax event_ts TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree(source_lsn, is_deleted)
PARTITION BY toYYYYMM(event_ts)
ORDER BY event_id
"""

CREATE_DEAD_LETTERS = """
CREATE TABLE IF NOT EXISTS engagement.dead_letters (
    lsn                 UInt64,
    event_id            Nullable(Int64),
    reason              LowCardinality(String),
    op                  LowCardinality(String),
    raw_change          String CODEC(ZSTD(3)),
    source_committed_at DateTime64(6, 'UTC'),
    first_seen_at       DateTime64(3, 'UTC') DEFAULT now64(3),
    replayed_at         Nullable(DateTime64(3, 'UTC')),
    revision            UInt32 DEFAULT 0
)
ENGINE = ReplacingMergeTree(revision)
ORDER BY (lsn, reason, raw_change)
"""

CREATE_CHECKPOINTS = """
CREATE TABLE IF NOT EXISTS engagement._checkpoints (
    sink       LowCardinality(String),
    lsn        UInt64,
    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(lsn)
ORDER BY sink
"""

ENRICHED_COLUMNS = (
    "event_id", "content_id", "user_id", "event_type", "event_ts", "device", "duration_ms",
    "content_type", "length_seconds", "engagement_seconds", "engagement_pct", "raw_payload",
    "op", "source_lsn", "source_committed_at", "is_deleted",
)  # fmt: skip

DEAD_LETTER_COLUMNS = ("lsn", "event_id", "reason", "op", "raw_change", "source_committed_at")

READ_CHECKPOINT = "SELECT max(lsn) FROM engagement._checkpoints WHERE sink = {sink:String}"


def insertable(rows: pl.DataFrame) -> pl.DataFrame:
    """Tombstones of invalid rows may lack an event time or type; the table's key needs both.

    A tombstone with no event time lands in the 1970-01 partition, where no live version of
    its event can be: it changes no query result, and keeps the insert from failing.
    """
    return rows.select(ENRICHED_COLUMNS).with_columns(
        pl.col("event_ts").fill_null(pl.lit(0).cast(pl.Datetime("us", "UTC"))),
        pl.col("event_type").fill_null(""),
        pl.col("op").fill_null(""),
    )


class ClickHouseSink(Sink):
    """Writes one batch per call inside one short chDB section (lib/clickhouse.py)."""

    name = SINK_NAME

    def __init__(self, dsn: str, *, hold_s: float = 10.0) -> None:
        super().__init__()
        self.dsn = dsn
        self.session = ClickHouseSession(dsn, hold_s=hold_s)

    def setup(self) -> None:
        with self.session.use() as client:
            for ddl in (CREATE_DATABASE, CREATE_ENRICHED, CREATE_DEAD_LETTERS, CREATE_CHECKPOINTS):
                client.command(ddl)

    def read_checkpoint(self) -> int:
        with self.session.use() as client:
            rows = client.query(READ_CHECKPOINT, parameters={"sink": self.name}).result_rows
        return int(rows[0][0] or 0) if rows else 0

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        with self.session.use() as client:
            if batch.rows.height:
                client.insert_arrow(
                    "engagement.enriched_engagements", insertable(batch.rows).to_arrow()
                )
            if batch.dead_letters.height:
                letters = batch.dead_letters.rename({"source_lsn": "lsn"})
                letters = letters.select(DEAD_LETTER_COLUMNS)
                client.insert_arrow("engagement.dead_letters", letters.to_arrow())
            # After the data: a crash before this line replays the batch into the same versions.
            client.insert_arrow(
                "engagement._checkpoints",
                pl.DataFrame(
                    {"sink": [self.name], "lsn": [batch.last_lsn]},
                    schema={"sink": pl.String, "lsn": pl.UInt64},
                ).to_arrow(),
            )

    def tick(self) -> None:
        """Let other processes at the embedded database: when idle, and every hold_s."""
        self.session.release_if_due()

    def close(self) -> None:
        self.session.release()
