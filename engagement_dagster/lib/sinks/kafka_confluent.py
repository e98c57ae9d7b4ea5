"""Kafka sink on librdkafka (confluent-kafka): lib/sinks/kafka.py's topics, keys, JSON values
(kafka_contract.py) and one transaction per batch, with the client's work done in C threads
instead of the stream's GIL.

It must never commit rows without their checkpoint record, never wait on a broker without a time
limit, and never reuse a producer whose transaction failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from engagement_dagster.lib.sinks.base import Sink, SinkBatch
from engagement_dagster.lib.sinks.kafka_contract import (
    REPLICATION_FACTOR,
    SINK_NAME,
    KafkaTopics,
    checkpoint_key,
    checkpoint_lsn,
    checkpoint_value,
    dead_letter_values,
    row_messages,
)

log = logging.getLogger(__name__)

# librdkafka properties of the stream's transactional producer, measured with bench/kafka_sink.py
# (see the README); a sink's `producer_config` overrides them (the bench compares codecs that way).
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,  # a batch is sent whole right after it is produced: wait little
    # 7x fewer bytes than none at no measurable cost; zstd (15x, as fast) would need every
    # consumer to read zstd, which kafka-python does only with an extra package.
    "compression.type": "lz4",
    "socket.nagle.disable": True,  # as kafka-python (TCP_NODELAY): small commits go out at once
    # Java's (and kafka-python's) partitioner, so a key lands on the same partition whichever
    # client wrote it; librdkafka's own default (CRC32) would move every content_id.
    "partitioner": "murmur2_random",
    # Successes need no report: commit_transaction fails the batch if any message failed.
    "delivery.report.only.error": True,
    "transaction.timeout.ms": 30_000,  # a zombie's open transaction blocks readers at most this
    "message.timeout.ms": 30_000,
    "message.max.bytes": 4 * 1024 * 1024,  # as kafka-python's max_request_size: 200 kB payloads
}
SERIALIZE_ROWS = 50_000  # rows turned into messages at a time, within one transaction
TIMEOUT_S = 10.0  # init, commit, abort and checkpoint reads: a dead broker fails the batch
BUFFER_FULL_WAIT_S = 0.05


class KafkaSinkError(RuntimeError):
    """A Kafka call of the sink failed or timed out; the stream retries the batch with backoff."""


def last_checkpoint(
    consumer: Consumer, topic: str, transactional_id: str, timeout_s: float
) -> int | None:
    """The LSN of the producer's newest checkpoint record in the compacted `topic` (0: none),
    read from the start to the committed end by a read_committed consumer with partition EOF
    on; None when the end was not reached within timeout_s."""
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    key = checkpoint_key(transactional_id)
    deadline = time.monotonic() + timeout_s
    lsn = 0
    while time.monotonic() < deadline:
        message = consumer.poll(0.5)  # (consume() would wait out its timeout every time)
        if message is None:
            continue
        error = message.error()
        if error is not None and error.code() == KafkaError._PARTITION_EOF:
            return lsn
        if error is not None:
            raise KafkaException(error)
        value = message.value()
        if message.key() == key and value:
            lsn = checkpoint_lsn(value)
    return None


class ConfluentKafkaSink(Sink):
    """The Kafka sink with a confluent-kafka transactional producer (see module docstring)."""

    name = SINK_NAME

    def __init__(
        self,
        client_config: dict[str, Any],
        *,
        transactional_id: str,
        topic_prefix: str = "",
        timeout_s: float = TIMEOUT_S,
        producer_config: dict[str, Any] | None = None,
    ) -> None:
        """client_config: connection and security properties (lib/kafka_config.py), for the
        producer, the checkpoint reader and the admin client alike."""
        super().__init__()
        self.config = {**client_config, "logger": log}  # librdkafka logs via Python logging
        self.producer_config = {**PRODUCER_DEFAULTS, **(producer_config or {})}
        self.transactional_id = transactional_id
        self.timeout_s = timeout_s
        self.topics = KafkaTopics.with_prefix(topic_prefix)
        self._producer: Producer | None = None

    def setup(self) -> None:
        admin = AdminClient(self.config)
        topics = [
            NewTopic(
                spec.name, num_partitions=spec.partitions,
                replication_factor=REPLICATION_FACTOR, config=dict(spec.config),
            )
            for spec in self.topics.specs()
        ]  # fmt: skip
        futures = admin.create_topics(topics, request_timeout=self.timeout_s)
        for topic, future in futures.items():
            try:
                future.result(timeout=self.timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise self._error(f"could not create topic {topic}", exc) from exc
            except TimeoutError as exc:
                raise self._error(
                    f"could not create topic {topic}",
                    TimeoutError(f"no answer in {self.timeout_s} s"),
                ) from exc

    @property
    def producer(self) -> Producer:
        """The transactional producer, created on first use; its init_transactions fences every
        older producer of this transactional.id and settles (aborts, or completes a commit
        already requested) the transaction such a producer left open."""
        if self._producer is None:
            producer = Producer(
                {
                    **self.config,
                    **self.producer_config,
                    "transactional.id": self.transactional_id,
                }
            )
            try:
                producer.init_transactions(self.timeout_s)
            except KafkaException as exc:
                raise self._error("init_transactions failed", exc) from exc
            self._producer = producer
        return self._producer

    def read_checkpoint(self) -> int:
        """The last committed checkpoint record for this transactional id (0 if none).

        The producer is initialised first: a transaction of ours still being settled (a commit
        that timed out on our side may still complete) is decided before we read, so the read
        cannot miss a batch that ends up committed and write it a second time.
        """
        self.producer  # noqa: B018 - fence and settle before reading, see above
        consumer = Consumer(
            {
                **self.config,
                "group.id": f"{self.transactional_id}.checkpoint-reader",  # never joins or commits
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,  # tells where the committed records end
                "fetch.wait.max.ms": 10,  # the broker answers at once at the end: 0.5 s less
            }
        )
        try:
            lsn = last_checkpoint(
                consumer, self.topics.checkpoint, self.transactional_id, self.timeout_s
            )
        except KafkaException as exc:
            raise self._error("reading the checkpoint failed", exc) from exc
        finally:
            consumer.close()
        if lsn is not None:
            return lsn
        raise KafkaSinkError(
            f"sink kafka: the end of {self.topics.checkpoint} was not reached within "
            f"{self.timeout_s:.0f} s; is the broker at {self.config.get('bootstrap.servers')} up?"
        )

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        producer = self.producer
        try:
            producer.begin_transaction()
            # Serialized a slice at a time: a million-row transaction's JSON would be ~0.8 GB.
            for rows in batch.rows.iter_slices(SERIALIZE_ROWS):
                keys, values = row_messages(rows)
                self._produce(self.topics.enriched, zip(keys, values, strict=True))
            letters = ((None, letter) for letter in dead_letter_values(batch.dead_letters))
            self._produce(self.topics.dlq, letters)
            record = (checkpoint_key(self.transactional_id), checkpoint_value(batch.last_lsn))
            self._produce(self.topics.checkpoint, [record])
            # Flushes, then commits; bounded, and a timeout is a failure like any other.
            producer.commit_transaction(self.timeout_s)
        except (KafkaException, BufferError) as exc:
            self._discard_producer()
            raise self._error(f"transaction up to LSN {batch.last_lsn} failed", exc) from exc
        except BaseException:
            self._discard_producer()
            raise

    def _produce(self, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> None:
        """Queue messages in librdkafka; when its queue is full, let it send and try again."""
        producer = self.producer
        for key, value in messages:
            deadline = None  # per message: a large batch may wait many times, each one briefly
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:
                    deadline = deadline or time.monotonic() + self.timeout_s
                    if time.monotonic() > deadline:
                        raise
                    producer.poll(BUFFER_FULL_WAIT_S)
        producer.poll(0)  # serve error reports and logs

    def _discard_producer(self) -> None:
        """Abort (bounded) and drop a producer whose transaction failed. If the abort does not
        get through, the next producer's init_transactions aborts the transaction instead."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.abort_transaction(min(self.timeout_s, 5.0))
        except KafkaException as exc:
            log.warning("sink kafka: abort after a failed transaction failed too: %s", exc)
        producer.purge(in_queue=True, in_flight=True, blocking=False)

    def _error(self, what: str, exc: BaseException) -> KafkaSinkError:
        return KafkaSinkError(
            f"sink kafka ({self.transactional_id} at {self.config.get('bootstrap.servers')}): "
            f"{what}: {exc}"
        )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.timeout_s)  # nothing is open between batches
            self._producer = None
