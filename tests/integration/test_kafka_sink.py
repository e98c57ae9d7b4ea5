"""The confluent-kafka sink against the real broker: exactly once under replay, checkpoints read
back (also across the two producer libraries), fencing, failures, and the message contract.

Every test writes under its own topic prefix (inside the session's), so tests never read each
other's messages; the session fixture deletes the topics at the end.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import polars as pl
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from engagement_dagster.lib.enrich import (
    DEAD_LETTERS_SCHEMA,
    DELTAS_SCHEMA,
    ENRICHED_ROWS_SCHEMA,
)
from engagement_dagster.lib.kafka_config import kafka_client_config, librdkafka_config
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.base import SinkBatch
from engagement_dagster.lib.sinks.kafka import (
    CHECKPOINT_TOPIC,
    DLQ_TOPIC,
    ENRICHED_TOPIC,
    KafkaSink,
    row_messages,
)
from engagement_dagster.lib.sinks.kafka_confluent import ConfluentKafkaSink, KafkaSinkError

CONTENTS = [str(uuid.uuid4()) for _ in range(30)]  # all 3 partitions, but for 3 in 100,000
COMMITTED_AT = datetime(2026, 11, 3, 12, 0, 0, 123_456, tzinfo=UTC)

Record = tuple[int, bytes | None, bytes]  # partition, key, value


def enriched(lsns: range) -> pl.DataFrame:
    """One enriched row per LSN, with the awkward values: unicode, NULL content and NULLs."""
    n = len(lsns)
    return pl.DataFrame(
        {
            "event_id": [lsn * 10 for lsn in lsns],
            "content_id": [None if i % 11 == 5 else CONTENTS[i % 30] for i in range(n)],
            "user_id": [str(uuid.UUID(int=i + 1)) for i in range(n)],
            "event_type": ["play"] * n,
            "event_ts": [COMMITTED_AT] * n,
            "device": ["ios"] * n,
            "duration_ms": [None if i % 5 == 0 else i * 100 for i in range(n)],
            "content_type": ["podcast"] * n,
            "length_seconds": [1800] * n,
            "engagement_seconds": [None if i % 5 == 0 else i / 10 for i in range(n)],
            "engagement_pct": [None if i % 5 == 0 else round(i / 180, 2) for i in range(n)],
            "raw_payload": [
                json.dumps({"note": f"ü€😀 {i}"}, ensure_ascii=False) for i in range(n)
            ],
            "op": ["insert"] * n,
            "source_lsn": list(lsns),
            "source_committed_at": [COMMITTED_AT] * n,
            "is_deleted": [0] * n,
        },
        schema=ENRICHED_ROWS_SCHEMA,
    )


def batch(lsns: range, *, dead: int = 0) -> SinkBatch:
    """Rows at `lsns`, plus `dead` dead letters at the last LSNs of the range."""
    letters = pl.DataFrame(
        {
            "source_lsn": list(lsns)[-dead:] if dead else [],
            "event_id": list(range(dead)),
            "reason": ["negative_duration"] * dead,
            "op": ["insert"] * dead,
            "raw_change": ['{"duration_ms": -1}'] * dead,
            "source_committed_at": [COMMITTED_AT] * dead,
        },
        schema=DEAD_LETTERS_SCHEMA,
    )
    return SinkBatch(
        last_lsn=lsns[-1],
        rows=enriched(lsns),
        deltas=pl.DataFrame(schema=DELTAS_SCHEMA),
        dead_letters=letters,
    )


@pytest.fixture
def kafka(services: Settings) -> Settings:
    """Settings with a topic prefix of this test's own."""
    prefix = f"{services.kafka_topic_prefix}ks{uuid.uuid4().hex[:6]}."
    return services.model_copy(update={"kafka_topic_prefix": prefix})


def confluent_sink(
    settings: Settings, transactional_id: str = "", **kw: object
) -> ConfluentKafkaSink:
    sink = ConfluentKafkaSink(
        librdkafka_config(settings),
        transactional_id=transactional_id or f"test-{settings.kafka_topic_prefix}",
        topic_prefix=settings.kafka_topic_prefix,
        **kw,  # type: ignore[arg-type]
    )
    sink.setup()
    return sink


@pytest.fixture
def sink(kafka: Settings) -> Iterator[ConfluentKafkaSink]:
    sink = confluent_sink(kafka)
    yield sink
    sink.close()


def committed(settings: Settings, topic: str, partitions: int = 1) -> list[Record]:
    """Every committed record of the topic (read_committed), partition by partition."""
    consumer = Consumer(
        {
            **librdkafka_config(settings),
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    name = settings.kafka_topic_prefix + topic
    consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in range(partitions)])
    records: list[Record] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + 20
    try:
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, f"{name}: end not reached in 20 s"
            message = consumer.poll(0.5)
            if message is None:
                continue
            error, partition = message.error(), message.partition() or 0
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                at_end.add(partition)
            elif error is not None:
                raise KafkaException(error)
            else:
                records.append((partition, message.key(), message.value() or b""))
    finally:
        consumer.close()
    return records


def enriched_lsns(settings: Settings) -> list[int]:
    records = committed(settings, ENRICHED_TOPIC, partitions=3)
    return sorted(json.loads(value)["source_lsn"] for _, _, value in records)


def test_replayed_batches_are_delivered_once(kafka: Settings, sink: ConfluentKafkaSink) -> None:
    assert sink.apply(batch(range(1, 41), dead=2))
    assert not sink.apply(batch(range(1, 41), dead=2))  # the same batch again: nothing
    assert sink.apply(batch(range(21, 61)))  # overlaps: only 41..60 are new
    restarted = confluent_sink(kafka)  # a new run of the same slot replays from the slot
    try:
        assert not restarted.apply(batch(range(1, 61)))
        assert restarted.apply(batch(range(1, 81)))
    finally:
        restarted.close()
    assert enriched_lsns(kafka) == list(range(1, 81))
    assert [json.loads(v)["source_lsn"] for _, _, v in committed(kafka, DLQ_TOPIC)] == [39, 40]


def test_an_aborted_transaction_leaves_nothing_and_the_retry_delivers_once(
    kafka: Settings, sink: ConfluentKafkaSink
) -> None:
    assert sink.apply(batch(range(1, 11)))
    too_big = batch(range(11, 21))
    rows = too_big.rows.with_columns(
        raw_payload=pl.when(pl.col("source_lsn") == 20)
        .then(pl.lit("x" * (5 * 1024 * 1024)))  # over message.max.bytes: the 10th message fails
        .otherwise(pl.col("raw_payload"))
    )
    with pytest.raises(KafkaSinkError, match="transaction up to LSN 20 failed"):
        sink.apply(SinkBatch(20, rows, too_big.deltas, too_big.dead_letters))
    assert sink.apply(batch(range(11, 21)))  # checkpoint read again, fresh producer
    assert enriched_lsns(kafka) == list(range(1, 21))


def test_a_batch_larger_than_the_producer_queue_is_delivered_whole(kafka: Settings) -> None:
    """librdkafka's queue holds fewer messages than the batch: the sink waits for room."""
    small = confluent_sink(kafka, producer_config={"queue.buffering.max.messages": 100})
    try:
        assert small.apply(batch(range(1, 2001)))
    finally:
        small.close()
    assert enriched_lsns(kafka) == list(range(1, 2001))


def test_checkpoint_is_read_back_per_transactional_id(
    kafka: Settings, sink: ConfluentKafkaSink
) -> None:
    other = confluent_sink(kafka, transactional_id=f"other-{kafka.kafka_topic_prefix}")
    try:
        assert other.read_checkpoint() == 0
        sink.apply(batch(range(1, 6)))
        sink.apply(batch(range(6, 9)))
        other.apply(batch(range(100, 101)))
    finally:
        other.close()
    fresh = confluent_sink(kafka)
    try:
        assert fresh.read_checkpoint() == 8
    finally:
        fresh.close()
    records = committed(kafka, CHECKPOINT_TOPIC)
    assert [json.loads(v) for _, _, v in records] == [{"lsn": 5}, {"lsn": 8}, {"lsn": 100}]


def test_a_switch_of_library_resumes_from_the_same_checkpoint(kafka: Settings) -> None:
    """kafka-python and confluent-kafka sinks of one slot share checkpoint and fencing."""
    transactional_id = f"switch-{kafka.kafka_topic_prefix}"
    old = KafkaSink(
        kafka_client_config(kafka),
        transactional_id=transactional_id,
        topic_prefix=kafka.kafka_topic_prefix,
    )
    old.setup()
    try:
        assert old.apply(batch(range(1, 31)))
    finally:
        old.close()
    new = confluent_sink(kafka, transactional_id=transactional_id)
    try:
        assert new.read_checkpoint() == 30
        assert not new.apply(batch(range(1, 31)))
        assert new.apply(batch(range(1, 51)))
    finally:
        new.close()
    back = KafkaSink(
        kafka_client_config(kafka),
        transactional_id=transactional_id,
        topic_prefix=kafka.kafka_topic_prefix,
    )
    try:
        assert back.read_checkpoint() == 50
    finally:
        back.close()
    assert enriched_lsns(kafka) == list(range(1, 51))


def test_messages_are_the_contract_bytes_on_the_same_partitions_as_kafka_python(
    kafka: Settings, sink: ConfluentKafkaSink
) -> None:
    """Values are row_messages' bytes exactly; keys land where kafka-python (Java's murmur2
    partitioner) puts them, so per-key order survives a switch of library."""
    sent = batch(range(1, 101), dead=3)
    sink.apply(sent)
    confluent_records = committed(kafka, ENRICHED_TOPIC, partitions=3)
    reference = kafka.model_copy(update={"kafka_topic_prefix": f"{kafka.kafka_topic_prefix}ref."})
    old = KafkaSink(
        kafka_client_config(reference),
        transactional_id=f"ref-{reference.kafka_topic_prefix}",
        topic_prefix=reference.kafka_topic_prefix,
    )
    old.setup()
    try:
        old.apply(sent)
    finally:
        old.close()
    keys, values = row_messages(sent.rows)
    assert sorted(v for _, _, v in confluent_records) == sorted(values)
    keyed = [(p, k, v) for p, k, v in confluent_records if k is not None]
    assert len(keyed) == len([k for k in keys if k is not None])
    reference_keyed = [
        r for r in committed(reference, ENRICHED_TOPIC, partitions=3) if r[1] is not None
    ]
    assert sorted(keyed) == sorted(reference_keyed)
    assert {p for p, _, _ in keyed} == {0, 1, 2}
    assert committed(kafka, DLQ_TOPIC) == committed(reference, DLQ_TOPIC)


def test_a_second_producer_of_the_slot_fences_the_first(
    kafka: Settings, sink: ConfluentKafkaSink
) -> None:
    assert sink.apply(batch(range(1, 11)))
    successor = confluent_sink(kafka)  # same transactional.id: a newer run of the same slot
    try:
        assert successor.read_checkpoint() == 10
        with pytest.raises(KafkaSinkError, match=r"(?i)fenced"):
            sink.apply(batch(range(11, 21)))  # the zombie: fenced, nothing of it is visible
        assert successor.apply(batch(range(11, 31)))
    finally:
        successor.close()
    assert enriched_lsns(kafka) == list(range(1, 31))


def test_an_unreachable_broker_is_a_clear_error_in_bounded_time(kafka: Settings) -> None:
    """Nothing listens on port 1: every call fails within its timeout, naming the broker, and
    the sink stays usable (the stream retries it with backoff)."""
    down = kafka.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    sink = ConfluentKafkaSink(
        librdkafka_config(down), transactional_id="unreachable", timeout_s=2.0
    )
    for attempt in (sink.setup, sink.checkpoint, lambda: sink.apply(batch(range(1, 5)))):
        started = time.monotonic()
        with pytest.raises(KafkaSinkError, match=r"127\.0\.0\.1:1"):
            attempt()
        assert time.monotonic() - started < 5
    assert sink._checkpoint is None  # nothing was applied, nothing is assumed
    sink.close()
