"""What the Kafka sinks write, whichever client library writes it: topic names and settings,
message keys and JSON values, and the records of the compacted checkpoint topic.

kafka.py (kafka-python) and kafka_confluent.py (librdkafka) both build their bytes here, so the
two can never put different bytes on the wire; it must never import a Kafka client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import polars as pl

SINK_NAME = "kafka"
ENRICHED_TOPIC = "engagement.enriched.v1"
DLQ_TOPIC = "engagement.dlq.v1"
CHECKPOINT_TOPIC = "engagement._checkpoints"
SCHEMA_VERSION = 1
REPLICATION_FACTOR = 1


@dataclass(frozen=True)
class TopicSpec:
    """One topic as the sinks create it (if it does not exist yet)."""

    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KafkaTopics:
    """The sink's three topics under one prefix (a test session's, or none)."""

    enriched: str
    dlq: str
    checkpoint: str

    @classmethod
    def with_prefix(cls, prefix: str = "") -> KafkaTopics:
        return cls(prefix + ENRICHED_TOPIC, prefix + DLQ_TOPIC, prefix + CHECKPOINT_TOPIC)

    def specs(self) -> tuple[TopicSpec, ...]:
        return (
            TopicSpec(self.enriched, partitions=3),
            TopicSpec(self.dlq, partitions=1),
            # Compacted: only the last record of each producer (its key) has to stay.
            TopicSpec(self.checkpoint, partitions=1, config={"cleanup.policy": "compact"}),
        )


def row_messages(rows: pl.DataFrame) -> tuple[list[bytes | None], list[bytes]]:
    """Keys (content_id) and JSON values of the enriched rows, serialized column-wise by Polars."""
    if rows.height == 0:
        return [], []
    values = (
        rows.with_columns(
            pl.col("event_ts", "source_committed_at").dt.to_string("%Y-%m-%dT%H:%M:%S%.6fZ"),
            schema_version=pl.lit(SCHEMA_VERSION),
        )
        .write_ndjson()
        .splitlines()
    )
    keys = [k.encode() if k is not None else None for k in rows["content_id"].to_list()]
    return keys, [v.encode() for v in values]


def dead_letter_values(letters: pl.DataFrame) -> Iterator[bytes]:
    """The JSON value of each dead letter (they have no key)."""
    for letter in letters.iter_rows(named=True):
        yield json.dumps(letter, default=str).encode()


def checkpoint_key(transactional_id: str) -> bytes:
    """Each producer keeps its own checkpoint record, keyed by its transactional.id."""
    return transactional_id.encode()


def checkpoint_value(lsn: int) -> bytes:
    return json.dumps({"lsn": lsn}).encode()


def checkpoint_lsn(value: bytes) -> int:
    """The LSN of a checkpoint record written by `checkpoint_value`."""
    return int(json.loads(value)["lsn"])
