"""Kafka sink: `engagement.enriched.v1` and `engagement.dlq.v1`, one transaction per batch.

The batch and its checkpoint record (compacted topic `engagement._checkpoints`) commit together,
so read_committed consumers see each change exactly once; a fixed transactional.id fences any
older producer of the same slot (a zombie run) before this one writes.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import polars as pl
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from engagement_dagster.lib.sinks.base import Sink, SinkBatch

SINK_NAME = "kafka"
ENRICHED_TOPIC = "engagement.enriched.v1"
DLQ_TOPIC = "engagement.dlq.v1"
CHECKPOINT_TOPIC = "engagement._checkpoints"
SCHEMA_VERSION = 1
FLUSH_TIMEOUT_S = 10.0


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


class KafkaSink(Sink):
    name = SINK_NAME

    def __init__(
        self, client_config: dict[str, Any], *, transactional_id: str, topic_prefix: str = ""
    ) -> None:
        super().__init__()
        self.config = {**client_config, "request_timeout_ms": 15_000}
        self.transactional_id = transactional_id
        self.enriched_topic = topic_prefix + ENRICHED_TOPIC
        self.dlq_topic = topic_prefix + DLQ_TOPIC
        self.checkpoint_topic = topic_prefix + CHECKPOINT_TOPIC
        self._producer: KafkaProducer | None = None

    def setup(self) -> None:
        admin = KafkaAdminClient(**self.config)
        try:
            topics = [
                NewTopic(self.enriched_topic, num_partitions=3, replication_factor=1),
                NewTopic(self.dlq_topic, num_partitions=1, replication_factor=1),
                NewTopic(
                    self.checkpoint_topic, num_partitions=1, replication_factor=1,
                    topic_configs={"cleanup.policy": "compact"},
                ),
            ]  # fmt: skip
            for topic in topics:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics([topic])
        finally:
            admin.close()

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            producer = KafkaProducer(
                **self.config,
                transactional_id=self.transactional_id,
                acks="all",
                linger_ms=5,
                max_request_size=4 * 1024 * 1024,
                max_block_ms=10_000,  # fail the batch (and retry it), never hang on a dead broker
            )
            producer.init_transactions()  # fences older producers with this transactional.id
            self._producer = producer
        return self._producer

    def read_checkpoint(self) -> int:
        """The last committed checkpoint record for this transactional id (0 if none)."""
        consumer = KafkaConsumer(
            **self.config,
            isolation_level="read_committed",
            enable_auto_commit=False,
            consumer_timeout_ms=2000,
        )
        try:
            partition = TopicPartition(self.checkpoint_topic, 0)
            consumer.assign([partition])
            end = consumer.end_offsets([partition])[partition]
            consumer.seek_to_beginning(partition)
            lsn = 0
            while consumer.position(partition) < end:
                records = consumer.poll(timeout_ms=1000).get(partition, [])
                if not records:
                    break
                for record in records:
                    if record.key == self.transactional_id.encode() and record.value:
                        lsn = int(json.loads(record.value)["lsn"])
            return lsn
        finally:
            consumer.close()

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        producer = self.producer
        producer.begin_transaction()
        try:
            keys, values = row_messages(batch.rows)
            for key, value in zip(keys, values, strict=True):
                producer.send(self.enriched_topic, key=key, value=value)
            for letter in batch.dead_letters.iter_rows(named=True):
                producer.send(self.dlq_topic, value=json.dumps(letter, default=str).encode())
            producer.send(
                self.checkpoint_topic,
                key=self.transactional_id.encode(),
                value=json.dumps({"lsn": batch.last_lsn}).encode(),
            )
            # Bounded: with the broker gone, flush times out and the batch is retried later
            # (commit_transaction itself would wait without a limit).
            producer.flush(timeout=FLUSH_TIMEOUT_S)
            producer.commit_transaction()
        except Exception:
            self._discard_producer()
            raise

    def _discard_producer(self) -> None:
        """Drop a producer whose transaction failed. Not aborting here is safe (an abort can
        hang on a dead broker): the next producer's init_transactions, with the same
        transactional.id, makes the coordinator abort the open transaction first."""
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close(timeout=0)
            self._producer = None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None
