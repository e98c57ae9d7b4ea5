"""Operational jobs launched from the UI: a health check of the four systems.

Read-only: the health job reports and fails; it never repairs or restarts anything.
"""

import dagster as dg

from engagement_dagster.resources import (
    ClickHouseResource,
    KafkaResource,
    PostgresResource,
    RedisResource,
)


@dg.op(description="Check PostgreSQL, ClickHouse, Redis and Kafka; fail naming each unhealthy one.")
def check_systems(
    context: dg.OpExecutionContext,
    postgres: PostgresResource,
    clickhouse: ClickHouseResource,
    redis: RedisResource,
    kafka: KafkaResource,
) -> None:
    results = [r.health() for r in (postgres, clickhouse, redis, kafka)]
    for result in results:
        log = context.log.info if result.healthy else context.log.error
        log(f"{result.system}: {'healthy' if result.healthy else 'UNHEALTHY'} - {result.detail}")
    unhealthy = [h for h in results if not h.healthy]
    if unhealthy:
        raise dg.Failure(
            description="unhealthy: " + ", ".join(h.system for h in unhealthy),
            metadata={h.system: h.detail for h in unhealthy},
        )


@dg.job(tags={"engagement/kind": "operations"})
def health_check() -> None:
    check_systems()
