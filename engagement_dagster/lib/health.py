"""Health checks of the four systems, each answering "healthy" or why not and what to do.

Checks only read: they never create, repair or start anything, so they are safe to run from a
sensor tick, a CLI or a test at any time.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2
import redis
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.kafka_config import kafka_client_config
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect, slot_info


@dataclass(frozen=True)
class Health:
    system: str
    healthy: bool
    detail: str


def _redact(url: str) -> str:
    """Drop any password from a URL before it reaches a log, a screen or Dagster metadata."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def postgres_health(settings: Settings) -> Health:
    where = _redact(settings.pg_dsn)
    try:
        with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version'), current_setting('wal_level')")
            row = cur.fetchone()
            assert row is not None
            version, wal_level = row
            slot = slot_info(conn, settings.slot)
    except psycopg2.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fix = (
            "run: engagement db init"
            if "does not exist" in first_line
            else "start it: make services"
        )
        return Health("postgres", False, f"{where}: {first_line} ({fix})")
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
    return Health("postgres", True, f"PostgreSQL {version} at {where}, {slot_text}")


def redis_health(settings: Settings) -> Health:
    where = _redact(settings.redis_url)
    try:
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=3, socket_connect_timeout=3
        )
        try:
            info = client.info("server")
        finally:
            client.close()
    except redis.RedisError as exc:
        return Health("redis", False, f"{where}: {exc} (start it: make services)")
    return Health("redis", True, f"Redis {info.get('redis_version', '?')} at {where}")


def kafka_health(settings: Settings) -> Health:
    where = settings.kafka_bootstrap
    try:
        admin = KafkaAdminClient(
            **kafka_client_config(settings), request_timeout_ms=5000, bootstrap_timeout_ms=5000
        )
        try:
            cluster = admin.describe_cluster()
        finally:
            admin.close()
    except (KafkaError, OSError, ValueError) as exc:
        return Health("kafka", False, f"{where}: {exc!r} (start it: make services)")
    brokers = len(cluster.get("brokers", []))
    return Health(
        "kafka", True, f"Kafka at {where}, cluster {cluster.get('cluster_id')}, {brokers} broker(s)"
    )


def clickhouse_health(settings: Settings) -> Health:
    where = _redact(settings.clickhouse_dsn)
    try:
        with clickhouse_client(settings.clickhouse_dsn, lock_timeout_s=10) as client:
            version = client.query("SELECT version()").result_rows[0][0]
    except Exception as exc:  # any driver, engine or lock failure means "not healthy"
        return Health("clickhouse", False, f"{where}: {exc}")
    kind = "embedded chDB" if where.startswith("chdb:") else "server"
    return Health("clickhouse", True, f"ClickHouse {version} ({kind}) at {where}")


def all_health(settings: Settings) -> list[Health]:
    return [
        postgres_health(settings),
        redis_health(settings),
        kafka_health(settings),
        clickhouse_health(settings),
    ]
