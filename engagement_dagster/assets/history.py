"""History in the Dagster UI: daily partitions of clickhouse/enriched_engagements (backfill any UTC
day range) and the `restart_from_point` job.

Wiring only: lib/backfill.py and lib/restart.py do the work; the stream run (assets/stream.py)
reports today's partition as it keeps it fresh. Nothing here writes Redis.
"""

# No `from __future__ import annotations`: Dagster must see the real context annotations.

from datetime import datetime, timedelta

import dagster as dg
from pydantic import Field

from engagement_dagster.assets.stream import (
    CLICKHOUSE_ENRICHED_KEY,
    STREAM_FRESHNESS,
    enriched_engagements,
    stream_settings,
)
from engagement_dagster.lib.backfill import BackfillReport, backfill_days
from engagement_dagster.lib.pgoutput import format_lsn
from engagement_dagster.lib.restart import RestartRefused, restart_from
from engagement_dagster.lib.settings import get_settings
from engagement_dagster.resources import (
    ClickHouseResource,
    KafkaResource,
    PostgresResource,
    RedisResource,
)

# UTC days keyed by ISO date (what assets/stream.py's today_partition_key gives); end_offset=1 so
# that today, which the stream keeps fresh, is a partition too.
enriched_daily_partitions_def = dg.DailyPartitionsDefinition(
    start_date=get_settings().history_start.isoformat(), end_offset=1, timezone="UTC"
)


class BackfillConfig(dg.Config):
    to_kafka: bool = Field(
        default=False,
        description="Also replay the days to engagement.enriched.v1 (op 'r', a producer of its "
        "own); consumers keep the version with the highest source_lsn.",
    )


def backfill_metadata(report: BackfillReport) -> dict[str, str | int | float]:
    return {
        "snapshot_lsn": format_lsn(report.consistent_lsn),
        "version": report.version,
        "days": len(report.days),
        "rows_read": report.rows_read,
        "rows_written": report.rows_written,
        "tombstones": report.tombstones,
        "dead_letters": sum(d.dead_letters for d in report.days),
        "kafka_messages": sum(d.kafka_messages for d in report.days),
        "seconds": round(report.seconds, 2),
        "rows_per_s": round(report.rows_per_s),
    }


@dg.asset(
    key=CLICKHOUSE_ENRICHED_KEY,
    deps=[enriched_engagements],
    partitions_def=enriched_daily_partitions_def,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="stream",
    kinds={"clickhouse"},
    freshness_policy=STREAM_FRESHNESS,  # the stream reports today's partition every 30 s
    metadata={"dagster/table_name": "engagement.enriched_engagements"},
    description="engagement.enriched_engagements (ReplacingMergeTree by source_lsn, monthly "
    "partitions) and engagement.dead_letters; query with FINAL for exact answers. The stream "
    "keeps today fresh; a partition run re-reads its UTC day from a PostgreSQL snapshot and "
    "writes what ClickHouse lacks, safely while the stream runs.",
)
def clickhouse_enriched_engagements(
    context: dg.AssetExecutionContext,
    config: BackfillConfig,
    postgres: PostgresResource,
    clickhouse: ClickHouseResource,
    redis: RedisResource,
    kafka: KafkaResource,
) -> dg.MaterializeResult:
    window = context.partition_time_window
    first_day = window.start.date()
    last_day = (window.end - timedelta(days=1)).date()
    settings = stream_settings(postgres, clickhouse, redis, kafka)
    report = backfill_days(settings, first_day, last_day, to_kafka=config.to_kafka)
    for day in report.days:
        context.log.info(
            f"{day.day}: {day.rows_read:,} events read, {day.rows_written:,} written, "
            f"{day.tombstones:,} tombstones, {day.dead_letters:,} invalid, {day.seconds:.1f}s"
        )
    return dg.MaterializeResult(metadata=backfill_metadata(report))


class RestartConfig(dg.Config):
    from_timestamp: str = Field(
        description="ISO timestamp with a zone, e.g. 2026-11-20T00:00:00Z: the days from its "
        "UTC day to today are rebuilt, and the stream continues from a fresh slot."
    )
    to_kafka: bool = Field(default=True, description="Replay the rebuilt days to Kafka.")


@dg.op(
    description="Restart from a point (README runbook): refuses while a stream consumes the slot."
)
def restart_stream_from_point(
    context: dg.OpExecutionContext,
    config: RestartConfig,
    postgres: PostgresResource,
    clickhouse: ClickHouseResource,
    redis: RedisResource,
    kafka: KafkaResource,
) -> None:
    settings = stream_settings(postgres, clickhouse, redis, kafka)
    start = datetime.fromisoformat(config.from_timestamp)
    try:
        report = restart_from(settings, start, to_kafka=config.to_kafka)
    except RestartRefused as exc:
        raise dg.Failure(description=str(exc)) from exc
    context.log.info(
        f"slot {report.slot} recreated at {format_lsn(report.consistent_lsn)}; checkpoints "
        f"{report.previous_checkpoints} -> {report.checkpoint}"
    )
    for day in report.backfill.days:  # the rebuilt partitions, as a backfill would report
        context.log_event(
            dg.AssetMaterialization(
                asset_key=CLICKHOUSE_ENRICHED_KEY,
                partition=day.day.isoformat(),
                metadata={
                    "restart_lsn": format_lsn(report.consistent_lsn),
                    "rows_read": day.rows_read,
                    "rows_written": day.rows_written,
                    "tombstones": day.tombstones,
                },
            )
        )


@dg.job(tags={"engagement/kind": "operations"})
def restart_from_point() -> None:
    """Rebuild from a timestamp and continue the stream from a fresh slot."""
    restart_stream_from_point()
