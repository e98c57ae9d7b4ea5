"""Kafka faults on a private broker: the broker killed (SIGKILL) in the middle of the stream's
transaction and restarted, and a fenced producer (a second producer with the stream's
transactional.id). Consumers read with read_committed: nothing lost, nothing twice.

The broker is the fault tests' own (its own port and log directory): killing the session's
broker would break every other test that uses it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from engagement_dagster.lib.generator import TrafficOptions, run_traffic
from engagement_dagster.lib.kafka_config import librdkafka_config
from engagement_dagster.lib.local_services import LocalKafka, ServiceError
from engagement_dagster.lib.pipeline import kafka_sink
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.kafka_contract import KafkaTopics
from tests.faults.conftest import FaultReport
from tests.faults.exactness import (
    check_exact,
    clickhouse_checkpoint,
    kafka_checkpoint,
    log_dir,
    mark_fault_end,
    redis_checkpoint,
    wait_caught_up,
)
from tests.faults.stack import (
    MIX,
    StreamProcess,
    final_drain,
    prepare,
    private_kafka,
    traffic,
    wait_until,
)

NAME = "kafka_faults"


@pytest.fixture(scope="module")
def world(private_services: Settings) -> Iterator[tuple[Settings, LocalKafka]]:
    settings, kafka = private_kafka(private_services)
    try:
        kafka.start()
    except ServiceError as exc:
        pytest.fail(f"the fault tests' private Kafka could not start: {exc}", pytrace=False)
    try:
        prepared = prepare(settings, NAME, seed=91)
        yield prepared, kafka
        admin = AdminClient(librdkafka_config(prepared))  # the broker's data outlives the session
        ours = [
            t
            for t in admin.list_topics(timeout=10).topics
            if t.startswith(prepared.kafka_topic_prefix)
        ]
        for future in admin.delete_topics(ours, operation_timeout=30).values():
            future.result(timeout=60)
    finally:
        kafka.stop(timeout_s=30)


def topic_offsets(settings: Settings, *, committed: bool) -> int:
    """The end offsets of the enriched topic summed over its partitions: the last stable offset
    for read_committed (it stops before an open transaction), the high watermark otherwise."""
    topic = KafkaTopics.with_prefix(settings.kafka_topic_prefix).enriched
    consumer = Consumer({
        **librdkafka_config(settings), "group.id": "fault-offsets", "enable.auto.commit": False,
        "isolation.level": "read_committed" if committed else "read_uncommitted",
    })  # fmt: skip
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()


def count_messages(settings: Settings, *, committed: bool) -> int:
    """Data messages of the enriched topic a consumer of that isolation level reads."""
    topic = KafkaTopics.with_prefix(settings.kafka_topic_prefix).enriched
    consumer = Consumer({
        **librdkafka_config(settings), "group.id": f"fault-count-{time.time_ns()}",
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        "isolation.level": "read_committed" if committed else "read_uncommitted",
    })  # fmt: skip
    consumer.subscribe([topic])
    partitions = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    done: set[int] = set()
    count = 0
    deadline = time.monotonic() + 120
    try:
        while len(done) < partitions and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                done.add(message.partition() or 0)
                continue
            count += 1
        return count
    finally:
        consumer.close()


def first_message(settings: Settings) -> tuple[bytes | None, bytes]:
    """Key and value of a committed message of the enriched topic."""
    topic = KafkaTopics.with_prefix(settings.kafka_topic_prefix).enriched
    consumer = Consumer({
        **librdkafka_config(settings), "group.id": f"fault-first-{time.time_ns()}",
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
    })  # fmt: skip
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            value = message.value() if message is not None and message.error() is None else None
            if message is not None and value:
                return message.key(), value
        raise AssertionError(f"no message in {topic} within 60 s")
    finally:
        consumer.close()


def kill_broker(kafka: LocalKafka) -> None:
    pid = int(kafka.pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not kafka.is_running(), timeout_s=30, what="the broker gone")


def open_transaction(settings: Settings) -> bool:
    """Messages in the log past the last stable offset: a transaction is open, or its end
    markers are on their way."""
    return topic_offsets(settings, committed=False) > topic_offsets(settings, committed=True)


@contextmanager
def frozen_with_a_transaction_open(
    stream: StreamProcess, settings: Settings, timeout_s: float = 60
) -> Iterator[None]:
    """The stream stopped (SIGSTOP) at a moment one of its Kafka transactions is open, and
    continued (SIGCONT) on leaving. Frozen, it can neither commit nor abort, so the
    transaction is still open whatever the caller does meanwhile; polling and then acting
    would race the commit. A commit the stream asked for just before the freeze still shows as
    open until the coordinator has written its markers, and a broker killed then completes the
    commit when it comes back (a fresh clone's run saw 0 aborted messages after a 0.5 s check):
    so the transaction must stay open for 2 s of the freeze."""
    deadline = time.monotonic() + timeout_s
    while True:
        os.kill(stream.pid, signal.SIGSTOP)
        try:
            is_open = open_transaction(settings)
            settled = time.monotonic() + 2.0
            while is_open and time.monotonic() < settled:
                time.sleep(0.25)
                is_open = open_transaction(settings)
        except BaseException:
            os.kill(stream.pid, signal.SIGCONT)
            raise
        if is_open:
            break
        os.kill(stream.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, f"no Kafka transaction open within {timeout_s} s"
        time.sleep(0.02)
    try:
        yield
    finally:
        os.kill(stream.pid, signal.SIGCONT)


def test_broker_killed_mid_transaction(
    world: tuple[Settings, LocalKafka], fault_report: FaultReport
) -> None:
    settings, kafka = world
    logs = log_dir(NAME)
    # A backlog makes the stream write large merged transactions (up to 50k rows, about a
    # second each): one is open most of the time.
    run_traffic(settings.pg_dsn, TrafficOptions(rate=20_000, duration_s=4, workers=2, seed=93,
                                                content_update_ratio=0.0, **MIX))  # fmt: skip
    stream = StreamProcess(settings, logs / "stream-kill.log", "--run-seconds", "600")
    try:
        with traffic(settings, rate=500, seed=94):
            wait_until(lambda: kafka_checkpoint(settings) > 0, timeout_s=60,
                       what="the stream's first Kafka transaction")  # fmt: skip
            with frozen_with_a_transaction_open(stream, settings):
                kill_broker(kafka)
            before = (redis_checkpoint(settings), clickhouse_checkpoint(settings) or 0)
            time.sleep(5)
            after = (redis_checkpoint(settings), clickhouse_checkpoint(settings) or 0)
            restarting = time.monotonic()
            kafka.start()
            back = time.monotonic()
            target = mark_fault_end(settings)
            caught = wait_caught_up(settings, target, timeout_s=180, since=back)
            time.sleep(3)
    finally:
        code = stream.stop()
    out = stream.output()
    assert code == 0, out[-3000:]
    assert "sink kafka failed" in out, out[-3000:]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    final_drain(settings, logs / "drain-kill.log")
    aborted = count_messages(settings, committed=False) - count_messages(settings, committed=True)
    check_exact(
        fault_report, settings, recovery_s=max(caught.values()),
        detail=f"broker SIGKILLed with a transaction open, down 5 s + {back - restarting:.0f} s "
        "to start again; "
        f"{aborted:,} messages of aborted transactions in the log, none read_committed; "
        f"broker back -> caught up {caught}",
    )  # fmt: skip
    assert aborted > 0, "the broker was not killed with a transaction open"


def test_a_fenced_producer(world: tuple[Settings, LocalKafka], fault_report: FaultReport) -> None:
    settings, _ = world
    logs = log_dir(NAME)
    sink = kafka_sink(settings)
    transactional_id = getattr(sink, "transactional_id")  # noqa: B009 - both sinks have it
    topics = KafkaTopics.with_prefix(settings.kafka_topic_prefix)
    stream = StreamProcess(settings, logs / "stream-fence.log", "--run-seconds", "600")
    try:
        with traffic(settings, rate=400, seed=95):
            wait_until(lambda: "sink kafka: first batch applied" in stream.output(),
                       timeout_s=60, what="the stream writing Kafka")  # fmt: skip
            time.sleep(2)
            # A second producer of the stream's transactional.id: it fences the stream's...
            intruder = Producer(
                {**librdkafka_config(settings), "transactional.id": transactional_id}
            )
            intruder.init_transactions(30)
            fenced_at = time.monotonic()
            target = mark_fault_end(settings)
            intruder.begin_transaction()
            key, value = first_message(settings)  # a copy would be a duplicate if ever read
            intruder.produce(topics.enriched, value, key)
            intruder.flush(10)
            # ...whose next transaction fails; its sink starts a new producer, which fences the
            # intruder in turn: the intruder's commit must fail and leave nothing visible.
            caught = wait_caught_up(settings, target, timeout_s=120, since=fenced_at)
            with pytest.raises(KafkaException) as refused:
                intruder.commit_transaction(30)
            intruder.purge()
            del intruder  # its threads stop (they would retry a stopped broker after the module)
            time.sleep(3)
    finally:
        code = stream.stop()
    out = stream.output()
    assert code == 0, out[-3000:]
    assert "sink kafka failed" in out, out[-3000:]  # the stream's producer was fenced
    final_drain(settings, logs / "drain-fence.log")
    error = refused.value.args[0]
    check_exact(
        fault_report, settings, recovery_s=max(caught.values()),
        detail=f"a producer with the stream's transactional.id fenced the stream's; the sink "
        f"re-initialised (fencing it back) -> caught up {caught}; the intruder's commit failed "
        f"({error.name()}), its message never read",
    )  # fmt: skip
