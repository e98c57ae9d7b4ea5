"""The one Definitions object of the code location: assets, jobs, sensors and resources.

Resources are built without values: each falls back to its ENGAGEMENT_* env var at use, so this
module never reads secrets or opens connections at import time.
"""

from __future__ import annotations

import dagster as dg

from engagement_dagster.assets.sources import source_assets
from engagement_dagster.jobs import health_check
from engagement_dagster.resources import (
    ClickHouseResource,
    KafkaResource,
    PostgresResource,
    RedisResource,
)

defs = dg.Definitions(
    assets=[*source_assets],
    jobs=[health_check],
    resources={
        "postgres": PostgresResource(),
        "clickhouse": ClickHouseResource(),
        "redis": RedisResource(),
        "kafka": KafkaResource(),
    },
)
