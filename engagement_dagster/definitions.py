"""The one Definitions object of the code location: assets, jobs, sensors and resources.

Resources are built without values: each falls back to its ENGAGEMENT_* env var at use, so this
module never reads secrets or opens connections at import time.
"""

from __future__ import annotations

import dagster as dg

from engagement_dagster.assets.history import clickhouse_enriched_engagements, restart_from_point
from engagement_dagster.assets.rollups import (
    rollup_assets,
    rollup_checks,
    rollup_jobs,
    rollup_sensors,
)
from engagement_dagster.assets.sources import source_assets
from engagement_dagster.assets.stream import engagement_stream
from engagement_dagster.jobs import cdc_stream, health_check
from engagement_dagster.resources import (
    ClickHouseResource,
    KafkaResource,
    PostgresResource,
    RedisResource,
)
from engagement_dagster.sensors.change_cursor import change_cursor_sensor

defs = dg.Definitions(
    assets=[*source_assets, engagement_stream, clickhouse_enriched_engagements, *rollup_assets],
    asset_checks=rollup_checks,
    jobs=[cdc_stream, health_check, restart_from_point, *rollup_jobs],
    sensors=[change_cursor_sensor, *rollup_sensors],
    # Every job runs its steps in the run's own process: on a small machine a subprocess per
    # step (the multiprocess default) costs seconds of imports and a core per step.
    executor=dg.in_process_executor,
    resources={
        "postgres": PostgresResource(),
        "clickhouse": ClickHouseResource(),
        "redis": RedisResource(),
        "kafka": KafkaResource(),
    },
)
