"""Jobs: `cdc_stream` (the change stream run the sensor keeps alive) and the health check.

Wiring only: the stream job selects the stream's assets; the health job reports and fails, it
never repairs or restarts anything.
"""

import dagster as dg

from engagement_dagster.assets.stream import STREAM_SPECS, STREAM_TAG
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


# In-process executor: one process per run (no step subprocess to start), and Dagster's
# termination interrupts the op thread of the run worker itself (see assets/stream.py).
cdc_stream = dg.define_asset_job(
    name="cdc_stream",
    selection=dg.AssetSelection.assets(*(spec.key for spec in STREAM_SPECS)),
    executor_def=dg.in_process_executor,
    # Priority: a successor must not queue behind a day of backfill runs.
    tags={"engagement/kind": "stream", STREAM_TAG: "true", "dagster/priority": "10"},
    description="The change stream: drain the slot, tail it for run_seconds, exit cleanly. "
    "change_cursor_sensor keeps one such run consuming.",
)
