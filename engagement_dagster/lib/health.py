"""Health checks of the four systems, each answering "healthy" or why not and what to do.

Checks only read: they never create, repair or start anything, so they are safe to run from a
sensor tick, a CLI or a test at any time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg2
import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.kafka_config import librdkafka_config
from engagement_dagster.lib.secure import (
    ConnectionConfigError,
    explain_kafka_errors,
    explain_redis_error,
    pg_tls_summary,
    redact,
    redis_client,
)
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect, slot_info


@dataclass(frozen=True)
class Health:
    system: str
    healthy: bool
    detail: str  # never holds a secret: every text passes through secure.redact


def postgres_health(settings: Settings) -> Health:
    where = redact(settings.pg_dsn, settings)
    try:
        with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version'), current_setting('wal_level')")
            row = cur.fetchone()
            assert row is not None
            version, wal_level = row
            slot = slot_info(conn, settings.slot)
            tls = pg_tls_summary(conn)
    except psycopg2.Error as exc:
        # Connection failures come explained (secure.PostgresConnectError): what, and the fix.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "does not exist" in first_line and "certificate" not in first_line:
            first_line += " (run: engagement db init)"
        elif (
            "make services" not in first_line
            and "Fix" not in first_line
            and "ENGAGEMENT_" not in first_line
        ):
            first_line += " (start it: make services)"
        return Health("postgres", False, redact(first_line, settings))
    if wal_level != "logical":
        return Health(
            "postgres",
            False,
            f"PostgreSQL {version} at {where} has wal_level={wal_level}; "
            "set wal_level=logical and restart it",
        )
    if slot is None:
        slot_text = f"slot {settings.slot} missing (run: engagement db init)"
    else:
        state = "active" if slot.active else "idle"
        lag = f"{slot.lag_bytes / 1e6:.1f} MB behind" if slot.lag_bytes is not None else "lag ?"
        slot_text = f"slot {settings.slot} {state}, {lag}, wal_status={slot.wal_status}"
    return Health("postgres", True, f"PostgreSQL {version} at {where} ({tls}), {slot_text}")


def redis_health(settings: Settings) -> Health:
    where = redact(settings.redis_url, settings)
    try:
        client = redis_client(
            settings.redis_url, settings=settings, socket_timeout=3, socket_connect_timeout=3
        )
        try:
            info = client.info("server")
        finally:
            client.close()
    except redis.RedisError as exc:
        return Health("redis", False, explain_redis_error(exc, settings.redis_url, settings))
    except ConnectionConfigError as exc:
        return Health("redis", False, f"{where}: {exc}")
    tls = "TLS" if settings.redis_url.startswith("rediss://") else "no TLS"
    return Health("redis", True, f"Redis {info.get('redis_version', '?')} at {where} ({tls})")


def kafka_health(settings: Settings) -> Health:
    """The broker metadata through librdkafka (the stream's producer library), which reports
    authentication and certificate errors by name; the transport is probed when it cannot."""
    where = settings.kafka_bootstrap
    errors: list[str] = []

    def collect(error: KafkaError) -> None:
        errors.append(error.str())

    config: dict[str, Any] = {**librdkafka_config(settings), "error_cb": collect, "log_level": 0}
    admin = AdminClient(config)
    try:
        cluster = admin.list_topics(timeout=5)
    except KafkaException as exc:
        admin.poll(0.5)  # serves error_cb: the reasons behind "transport failure"
        return Health("kafka", False, explain_kafka_errors(settings, [*errors, str(exc)]))
    protocol = settings.kafka_security_protocol
    return Health(
        "kafka",
        True,
        f"Kafka at {where} ({protocol}), cluster {cluster.cluster_id}, "
        f"{len(cluster.brokers)} broker(s)",
    )


def clickhouse_health(settings: Settings) -> Health:
    where = redact(settings.clickhouse_dsn, settings)
    try:
        with clickhouse_client(settings.clickhouse_dsn, lock_timeout_s=10) as client:
            version = client.query("SELECT version()").result_rows[0][0]
    except Exception as exc:  # any driver, engine or lock failure means "not healthy"
        return Health("clickhouse", False, redact(f"{where}: {exc}", settings))
    kind = "embedded chDB" if where.startswith("chdb:") else "server"
    return Health("clickhouse", True, f"ClickHouse {version} ({kind}) at {where}")


def all_health(settings: Settings) -> list[Health]:
    return [
        postgres_health(settings),
        redis_health(settings),
        kafka_health(settings),
        clickhouse_health(settings),
    ]
