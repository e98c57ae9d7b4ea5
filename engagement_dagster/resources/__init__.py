"""One Dagster resource per system: PostgreSQL, ClickHouse, Redis and Kafka."""

from engagement_dagster.resources.clickhouse import ClickHouseResource
from engagement_dagster.resources.kafka import KafkaResource
from engagement_dagster.resources.postgres import PostgresResource
from engagement_dagster.resources.redis import RedisResource

__all__ = ["ClickHouseResource", "KafkaResource", "PostgresResource", "RedisResource"]
