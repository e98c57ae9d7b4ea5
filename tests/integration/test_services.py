"""The four systems, for real: health, Kafka transactions, Redis TTLs and the chDB file lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from engagement_dagster.lib.clickhouse import ClickHouseLockTimeout, clickhouse_client
from engagement_dagster.lib.health import all_health
from engagement_dagster.lib.kafka_config import kafka_client_config
from engagement_dagster.lib.local_services import local_services
from engagement_dagster.lib.settings import Settings
from tests.support import ServicesClaim

BIN = Path(sys.executable).parent


def test_all_four_systems_are_healthy(services: Settings, source_dsn: str) -> None:
    results = {h.system: h for h in all_health(services)}
    assert set(results) == {"postgres", "redis", "kafka", "clickhouse"}
    unhealthy = {name: h.detail for name, h in results.items() if not h.healthy}
    assert not unhealthy
    assert f"slot {services.slot} idle" in results["postgres"].detail
    assert "wal_status=reserved" in results["postgres"].detail


def test_status_command_lists_four_healthy_systems(services: Settings, source_dsn: str) -> None:
    done = subprocess.run(
        [str(BIN / "engagement"), "services", "status"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for system in ("postgres", "redis", "kafka", "clickhouse"):
        assert system in done.stdout
    assert done.stdout.count("healthy") == 4
    assert "unhealthy" not in done.stdout


def test_status_says_why_a_system_is_down(services: Settings) -> None:
    env = {"ENGAGEMENT_REDIS_URL": "redis://127.0.0.1:1/0", "COLUMNS": "250"}
    done = subprocess.run(
        [str(BIN / "engagement"), "services", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 1
    assert "unhealthy" in done.stdout
    assert "make services" in done.stdout  # the fix is named


def test_starting_running_services_is_a_no_op(services: Settings) -> None:
    for service in local_services(services):
        result = service.start()
        assert result.started is False, f"{service.name} was started twice"
        assert "already listening" in result.detail


def test_a_second_session_on_this_namespace_is_refused(services: Settings) -> None:
    """This session holds its namespace: another on it fails at once, naming this one; one on
    another namespace may run, and then neither is alone (neither stops the services)."""
    with pytest.raises(RuntimeError, match=f"engagement tests pid {os.getpid()}.*NAMESPACE"):
        ServicesClaim(services)
    other = services.model_copy(
        update={"pg_dsn": services.pg_dsn.replace("_test", f"_{uuid.uuid4().hex[:6]}_test")}
    )
    claim = ServicesClaim(other)
    try:
        assert claim.sole_user() is False  # this session still uses the services
    finally:
        claim.release()


def test_kafka_transactions_are_atomic_for_read_committed_consumers(services: Settings) -> None:
    topic = f"engagement.test.{uuid.uuid4().hex[:8]}"
    config = kafka_client_config(services)
    producer = KafkaProducer(**config, transactional_id=f"test-{uuid.uuid4().hex[:8]}")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic, key=b"k", value=b"aborted")
    producer.flush()
    producer.abort_transaction()
    producer.begin_transaction()
    producer.send(topic, key=b"k", value=b"committed-1")
    producer.send(topic, key=b"k", value=b"committed-2")
    producer.commit_transaction()
    producer.close()

    consumer = KafkaConsumer(
        topic,
        **config,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    values = [message.value for message in consumer]
    consumer.close()
    assert values == [b"committed-1", b"committed-2"]


def test_redis_keys_expire(services: Settings) -> None:
    client = redis.Redis.from_url(services.redis_url)
    key = f"engagement:test:{uuid.uuid4().hex}"
    client.set(key, "1", px=300)
    assert client.pttl(key) > 0
    time.sleep(0.5)
    assert client.exists(key) == 0
    client.close()


def test_chdb_is_held_by_one_process_at_a_time(services: Settings, tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'ch'}"
    other = (
        "import sys\n"
        "from engagement_dagster.lib.clickhouse import clickhouse_client, ClickHouseLockTimeout\n"
        "try:\n"
        f"    with clickhouse_client({dsn!r}, lock_timeout_s=1) as c:\n"
        "        print(c.query('SELECT count() FROM default.t').result_rows[0][0])\n"
        "except ClickHouseLockTimeout as exc:\n"
        "    print('locked:', exc)\n"
    )
    with clickhouse_client(dsn) as client:
        client.command("CREATE TABLE default.t (x UInt8) ENGINE = MergeTree ORDER BY x")
        client.insert("default.t", [[1], [2]], column_names=["x"])
        blocked = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True)
        assert "locked:" in blocked.stdout, blocked.stdout + blocked.stderr
        assert "fuser" in blocked.stdout  # the message says how to find the holder
    after = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True)
    assert after.stdout.strip() == "2", after.stdout + after.stderr
    with (
        pytest.raises(ClickHouseLockTimeout),
        clickhouse_client(dsn),
        clickhouse_client(dsn, lock_timeout_s=0.2),
    ):
        pass
