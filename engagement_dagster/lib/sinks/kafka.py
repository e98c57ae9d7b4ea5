"""Kafka sink: `engagement.enriched.v1` and `engagement.dlq.v1`, one transaction per batch.

The batch and its checkpoint record (compacted topic `engagement._checkpoints`) commit together,
so read_committed consumers see each change exactly once; a fixed transactional.id fences any
older producer of the same slot (a zombie run) before this one writes.
"""

from __future__ import annotations

import contextlib
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from engagement_dagster.lib.sinks.base import Sink, SinkBatch
from engagement_dagster.lib.sinks.kafka_contract import (
    CHECKPOINT_TOPIC,
    DLQ_TOPIC,
    ENRICHED_TOPIC,
    REPLICATION_FACTOR,
    SCHEMA_VERSION,
    SINK_NAME,
    KafkaTopics,
    checkpoint_key,
    checkpoint_lsn,
    checkpoint_value,
    dead_letter_values,
    row_messages,
)

__all__ = [  # the contract's names (kafka_contract.py) stay importable from here
    "CHECKPOINT_TOPIC",
    "DLQ_TOPIC",
    "ENRICHED_TOPIC",
    "FLUSH_TIMEOUT_S",
    "SCHEMA_VERSION",
    "SINK_NAME",
    "KafkaSink",
    "row_messages",
]

FLUSH_TIMEOUT_S = 10.0


class KafkaSink(Sink):
    name = SINK_NAME

    def __init__(
        self, client_config: dict[str, Any], *, transactional_id: str, topic_prefix: str = ""
    ) -> None:
        super().__init__()
        self.config = {**client_config, "request_timeout_ms": 15_000}
        self.transactional_id = transactional_id
        self.topics = KafkaTopics.with_prefix(topic_prefix)
        self._producer: KafkaProducer | None = None

    def setup(self) -> None:
        admin = KafkaAdminClient(**self.config)
        try:
            for spec in self.topics.specs():
                topic = NewTopic(
                    spec.name, num_partitions=spec.partitions,
                    replication_factor=REPLICATION_FACTOR, topic_configs=dict(spec.config),
                )  # fmt: skip
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
        record = self.last_checkpoint_record()
        return checkpoint_lsn(record) if record else 0

    def last_checkpoint_record(self) -> bytes | None:
        """The value of the last committed record of this transactional id in the checkpoint
        topic (None if none): the stream's LSN, or what another writer (a dlq replay) noted."""
        consumer = KafkaConsumer(
            **self.config,
            isolation_level="read_committed",
            enable_auto_commit=False,
            consumer_timeout_ms=2000,
        )
        try:
            partition = TopicPartition(self.topics.checkpoint, 0)
            consumer.assign([partition])
            end = consumer.end_offsets([partition])[partition]
            consumer.seek_to_beginning(partition)
            key, last = checkpoint_key(self.transactional_id), None
            while consumer.position(partition) < end:
                records = consumer.poll(timeout_ms=1000).get(partition, [])
                if not records:
                    break
                for record in records:
                    if record.key == key and record.value:
                        last = record.value
            return last
        finally:
            consumer.close()

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        producer = self.producer
        producer.begin_transaction()
        try:
            keys, values = row_messages(batch.rows)
            for key, value in zip(keys, values, strict=True):
                producer.send(self.topics.enriched, key=key, value=value)
            for letter in dead_letter_values(batch.dead_letters):
                producer.send(self.topics.dlq, value=letter)
            producer.send(
                self.topics.checkpoint,
                key=checkpoint_key(self.transactional_id),
                value=checkpoint_value(batch.last_lsn),
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
