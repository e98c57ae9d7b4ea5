"""Windows and rollups in the Dagster UI: the 10-minute rollup, the Redis window keys, the daily
and weekly summaries, their checks, and the sensors that materialize them when windows close.

Wiring only: the SQL and the rules live in lib/rollups.py. Sensors never open ClickHouse (chDB
leaks threads in a long-lived process at every reopen): what needs the warehouse runs in a run
and reaches the sensors through materialization metadata.
"""

# No `from __future__ import annotations`: Dagster must see the real context annotations.

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import dagster as dg
from clickhouse_connect.driver.client import Client
from pydantic import Field
from redis import Redis

from engagement_dagster.lib import reconcile, rollups
from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.pgoutput import format_lsn
from engagement_dagster.lib.settings import get_settings
from engagement_dagster.lib.sinks.redis import read_checkpoint, read_window, rewrite_window
from engagement_dagster.lib.windows import Window
from engagement_dagster.resources import (
    ClickHouseResource,
    KafkaResource,
    PostgresResource,
    RedisResource,
)
from engagement_dagster.resources.settings import resolve_settings

WINDOW_FMT = "%Y-%m-%d-%H:%M"
DAY_FMT = "%Y-%m-%d"
_FIRST = datetime.combine(get_settings().rollup_start, datetime.min.time(), UTC)

rollup_10m_partitions_def = dg.TimeWindowPartitionsDefinition(
    cron_schedule="*/10 * * * *", start=_FIRST, fmt=WINDOW_FMT, timezone="UTC"
)
daily_summary_partitions_def = dg.DailyPartitionsDefinition(
    start_date=_FIRST, fmt=DAY_FMT, timezone="UTC"
)
# ISO weeks: Monday 00:00 UTC (day_offset=1), as the 1w Redis windows.
weekly_summary_partitions_def = dg.WeeklyPartitionsDefinition(
    start_date=_FIRST, day_offset=1, fmt=DAY_FMT, timezone="UTC"
)

ENRICHED_KEY = dg.AssetKey(["clickhouse", "enriched_engagements"])
ROLLUP_KEY = dg.AssetKey(["clickhouse", "engagement_rollup_10m"])
WINDOWS_KEY = dg.AssetKey(["redis", "engagement_windows"])
LATE_WINDOWS = "late_windows"  # rollup metadata: windows to re-roll, "key@lsn" comma-separated
LATE_SCANNED_TO = "late_scanned_to"  # rollup metadata: the next scan starts above this LSN
RETRY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL)


class RollupConfig(dg.Config):
    checkpoint_wait_seconds: float = Field(
        default=120.0,
        ge=0,
        description="How long to wait for the ClickHouse sink to reach what the Redis sink "
        "applied (the stream's checkpoints) before failing the rollup.",
    )


def _window(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> datetime:
    return context.partition_time_window.start.astimezone(UTC)


def _wait_until_closed(context: dg.AssetExecutionContext, start: datetime, lateness_s: int) -> None:
    """A window is rolled up once the stream stopped adding to it (end + lateness): a run
    launched from the UI for the newest window waits for that instead of racing the stream."""
    due = rollups.closes_at("10m", start, lateness_s)
    wait_s = (due - datetime.now(UTC)).total_seconds()
    if wait_s > 0:
        context.log.info(f"window {start:%H:%M} closes for rollups at {due:%H:%M:%S} UTC: waiting")
        time.sleep(wait_s)


# A window is rolled up 12 minutes after it starts (10 + lateness) and the sensor ticks every
# 30 s: no new window for 30 minutes means the rollups stopped (sensor off, runs failing).
ROLLUP_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=timedelta(minutes=30), warn_window=timedelta(minutes=20)
)


@dg.asset(
    key=ROLLUP_KEY,
    deps=[ENRICHED_KEY],
    partitions_def=rollup_10m_partitions_def,
    group_name="windows",
    kinds={"clickhouse"},
    retry_policy=RETRY,
    freshness_policy=ROLLUP_FRESHNESS,
    description="engagement.engagement_rollup_10m: one 10-minute window per content and "
    "content_type from enriched_engagements FINAL, replaced idempotently once the window closed "
    "(end + ENGAGEMENT_ROLLUP_LATENESS_SECONDS). Also scans for changes that reached "
    "already rolled-up windows (late_change_sensor re-rolls them).",
    metadata={"dagster/table_name": "engagement.engagement_rollup_10m"},
)
def engagement_rollup_10m(
    context: dg.AssetExecutionContext,
    config: RollupConfig,
    clickhouse: ClickHouseResource,
    redis: RedisResource,
) -> dg.MaterializeResult:
    settings = clickhouse.settings
    start = _window(context)
    _wait_until_closed(context, start, settings.rollup_lateness_seconds)
    client = redis.client()
    try:
        redis_lsn = read_checkpoint(client)  # after the close: all the stream gave this window
    finally:
        client.close()
    result = rollups.rollup_window(
        settings.clickhouse_dsn, start, redis_lsn=redis_lsn, wait_s=config.checkpoint_wait_seconds
    )
    late = rollups.late_changes(
        settings.clickhouse_dsn, after_lsn=_last_scanned_to(context), first=_FIRST
    )
    late_keys = [f"{w.strftime(WINDOW_FMT)}@{lsn}" for w, lsn in late.windows] if late else []
    if late_keys:
        context.log.info(f"changes reached {len(late_keys)} rolled-up windows: {late_keys[:10]}")
    return dg.MaterializeResult(
        metadata={
            "window_start": start.isoformat(),
            "asof_lsn": format_lsn(result.asof_lsn),
            "redis_checkpoint": format_lsn(result.redis_lsn),
            "rows": result.rows,
            "events": result.events,
            "tombstones": result.tombstones,
            "checkpoint_wait_s": round(result.waited_s, 3),
            "rollup_s": round(result.took_s, 3),
            LATE_WINDOWS: ",".join(late_keys),
            LATE_SCANNED_TO: late.scanned_to if late else 0,
        }
    )


def _last_scanned_to(context: dg.AssetExecutionContext) -> int | None:
    """Where the previous rollup's late-change scan ended (None: no scan yet)."""
    event = context.instance.get_latest_materialization_event(ROLLUP_KEY)
    materialization = event.asset_materialization if event else None
    value = materialization.metadata.get(LATE_SCANNED_TO) if materialization else None
    scanned = getattr(value, "value", None)
    return int(scanned) if isinstance(scanned, int) and scanned > 0 else None


def windows_to_rewrite(
    start: datetime, now: datetime, lateness_s: int
) -> list[tuple[Window, datetime]]:
    """The 10-minute window and every closed hour, day and ISO week that holds it."""
    return [("10m", start), *rollups.derived_windows_to_rewrite(start, now, lateness_s)]


@dg.asset(
    key=WINDOWS_KEY,
    freshness_policy=ROLLUP_FRESHNESS,
    deps=[engagement_rollup_10m],
    partitions_def=rollup_10m_partitions_def,
    group_name="windows",
    kinds={"redis"},
    retry_policy=RETRY,
    description="Redis window keys engagement:{10m|1h|1d|1w}:{window_start}:top and "
    ":stats:{content_id}: rewrites the 10-minute window and every closed hour, day and ISO week "
    "holding it from the 10-minute rollups (authoritative), with the configured TTLs.",
)
def engagement_windows(
    context: dg.AssetExecutionContext, clickhouse: ClickHouseResource, redis: RedisResource
) -> dg.MaterializeResult:
    settings = redis.settings
    start = _window(context)
    windows = windows_to_rewrite(start, datetime.now(UTC), settings.rollup_lateness_seconds)
    with clickhouse_client(clickhouse.settings.clickhouse_dsn) as ch:
        rollups.ensure_tables(ch)
        if rollups.rolled_up(ch, start) is None:
            raise dg.Failure(
                description=f"window {start:%Y-%m-%d %H:%M} UTC was never rolled up: materialize "
                "clickhouse/engagement_rollup_10m for this partition first"
            )
        rows = {(w, s): rollups.window_rows(ch, w, s) for w, s in windows}
        missing = {(w, s): rollups.missing_rollups(ch, w, s, _FIRST) for w, s in windows}
    client = redis.client()
    try:
        for (window, begin), frame in rows.items():
            rewrite_window(client, window, begin, frame, ttl_s=settings.window_ttls[window])
    finally:
        client.close()
    incomplete = [f"{w} {s:%Y-%m-%d %H:%M}: {n}" for (w, s), n in missing.items() if n]
    if incomplete:
        context.log.warning(
            "windows built without some of their 10-minute rollups (backfill them from the UI): "
            + "; ".join(incomplete)
        )
    return dg.MaterializeResult(
        metadata={
            "windows": ", ".join(f"{w} {s:%Y-%m-%d %H:%M}" for w, s in rows),
            **{f"items_{w}": frame.height for (w, _), frame in rows.items()},
            "missing_10m_rollups": sum(missing.values()),
        }
    )


# --- checks --------------------------------------------------------------------------------


def rollup_check_result(clickhouse_dsn: str, start: datetime) -> dg.AssetCheckResult:
    """The body of rollup_matches_enriched for one window."""
    comparison = rollups.check_rollup(clickhouse_dsn, start)
    return dg.AssetCheckResult(
        passed=comparison.equal,
        # Changed after its rollup: a re-roll is already due (late_change_sensor), so a warning.
        severity=dg.AssetCheckSeverity.WARN if comparison.stale else dg.AssetCheckSeverity.ERROR,
        metadata={
            "compared": comparison.compared,
            "differences": "\n".join(comparison.differences),
            "asof_lsn": comparison.asof_lsn or 0,
            "newest_change_lsn": comparison.newest_change_lsn or 0,
        },
    )


@dg.asset_check(
    asset=engagement_rollup_10m,
    partitions_def=rollup_10m_partitions_def,
    description="The window's rollup rows equal the window recomputed from enriched_engagements "
    "FINAL: events, engagement ms, pct x100 sum and count, unique users, per content and type.",
)
def rollup_matches_enriched(
    context: dg.AssetCheckExecutionContext, clickhouse: ClickHouseResource
) -> dg.AssetCheckResult:
    return rollup_check_result(clickhouse.settings.clickhouse_dsn, _window(context))


def redis_check_result(
    clickhouse_dsn: str, redis_client: Redis, start: datetime, lateness_s: int
) -> dg.AssetCheckResult:
    """The body of redis_windows_match_rollups for one 10-minute window."""
    windows = windows_to_rewrite(start, datetime.now(UTC), lateness_s)
    with clickhouse_client(clickhouse_dsn) as ch:
        rollups.ensure_tables(ch)
        # A closed window whose last 10 minutes are not rolled up yet is not rewritten yet.
        windows = [(w, s) for w, s in windows if _last_rolled(ch, w, s)]
        expected = {(w, s): rollups.window_rows(ch, w, s) for w, s in windows}
    differences: list[str] = []
    compared = 0
    for (window, begin), frame in expected.items():
        n, diff = rollups.compare_window(read_window(redis_client, window, begin), frame)
        compared += n
        differences.extend(f"{window} {begin:%Y-%m-%d %H:%M}: {d}" for d in diff)
    return dg.AssetCheckResult(
        passed=not differences,
        metadata={
            "windows": ", ".join(f"{w} {s:%Y-%m-%d %H:%M}" for w, s in windows),
            "compared": compared,
            "differences": "\n".join(differences[:50]),
        },
    )


@dg.asset_check(
    asset=engagement_windows,
    partitions_def=rollup_10m_partitions_def,
    description="The Redis keys of the 10-minute window and of every closed hour, day and week "
    "holding it equal the ClickHouse rollups: events, engagement ms, pct x100 sum and count.",
)
def redis_windows_match_rollups(
    context: dg.AssetCheckExecutionContext, clickhouse: ClickHouseResource, redis: RedisResource
) -> dg.AssetCheckResult:
    client = redis.client()
    try:
        return redis_check_result(
            clickhouse.settings.clickhouse_dsn,
            client,
            _window(context),
            redis.settings.rollup_lateness_seconds,
        )
    finally:
        client.close()


def _last_rolled(ch: Client, window: Window, start: datetime) -> bool:
    last = rollups.window_end(window, start) - timedelta(seconds=rollups.ROLLUP_S)
    return rollups.rolled_up(ch, last) is not None


class ReconcileConfig(dg.Config):
    wait_seconds: float = Field(
        default=60.0,
        ge=0,
        description="When a count differs: how long to wait for sinks whose checkpoint is below "
        "the LSN PostgreSQL was read at, before reporting them as behind.",
    )
    kafka_deadline_seconds: float = Field(
        default=60.0, gt=0, description="Reading engagement.enriched.v1 to its end."
    )
    kafka_max_messages: int = Field(
        default=5_000_000,
        gt=0,
        description="A larger Kafka range to read fails the check at once, saying so.",
    )


def reconcile_check_result(result: reconcile.Reconciliation) -> dg.AssetCheckResult:
    """The body of window_reconciles_across_sinks: each count as numeric metadata (the UI plots
    them per partition), each sink's difference from PostgreSQL, and what to do."""
    metadata: dict[str, dg.MetadataValue] = {
        "postgres_events": dg.MetadataValue.int(result.postgres.events),
        "postgres_engagement_ms": dg.MetadataValue.int(result.postgres.engagement_ms),
    }
    for sink in result.sinks:
        difference = sink.difference(result.postgres)
        if sink.count is None or difference is None:
            continue
        metadata[f"{sink.sink}_events"] = dg.MetadataValue.int(sink.count.events)
        metadata[f"{sink.sink}_engagement_ms"] = dg.MetadataValue.int(sink.count.engagement_ms)
        metadata[f"{sink.sink}_events_diff"] = dg.MetadataValue.int(difference.events)
        metadata[f"{sink.sink}_engagement_ms_diff"] = dg.MetadataValue.int(difference.engagement_ms)
    read_from = result.kafka_read_from.isoformat() if result.kafka_read_from else ""
    metadata |= {
        "kafka_doubled": dg.MetadataValue.int(result.kafka_doubled),
        "kafka_messages_read": dg.MetadataValue.int(result.kafka_messages_read),
        "kafka_read_from": dg.MetadataValue.text(read_from),
        "waited_s": dg.MetadataValue.float(round(float(result.waited_s), 3)),
        "postgres_lsn": dg.MetadataValue.text(format_lsn(result.postgres_lsn)),
        "status": dg.MetadataValue.text(", ".join(f"{s.sink} {s.status}" for s in result.sinks)),
        "applied_lsn": dg.MetadataValue.text(
            ", ".join(
                f"{s.sink} {'?' if s.applied_lsn is None else format_lsn(s.applied_lsn)}"
                for s in result.sinks
            )
        ),
    }
    # Lost or doubled is an error; a sink behind or a window it no longer holds, a warning.
    lost = bool(result.with_status("differs")) or result.kafka_doubled > 0
    return dg.AssetCheckResult(
        passed=result.passed,
        severity=dg.AssetCheckSeverity.ERROR if lost else dg.AssetCheckSeverity.WARN,
        description=result.summary(),
        metadata=metadata,
    )


@dg.asset_check(
    asset=engagement_rollup_10m,
    partitions_def=rollup_10m_partitions_def,
    # After the Redis rewrite when both run (rollup_windows): the keys then hold the rollup.
    additional_deps=[engagement_windows],
    description="Nothing lost, nothing doubled: the window's current events and engagement ms "
    "in PostgreSQL equal those in ClickHouse (enriched_engagements), Redis (the window's stats "
    "hashes) and Kafka (engagement.enriched.v1, read_committed), and no Kafka message of the "
    "window is delivered twice. A sink behind PostgreSQL is waited for, then reported as behind.",
)
def window_reconciles_across_sinks(
    context: dg.AssetCheckExecutionContext,
    config: ReconcileConfig,
    postgres: PostgresResource,
    clickhouse: ClickHouseResource,
    redis: RedisResource,
    kafka: KafkaResource,
) -> dg.AssetCheckResult:
    settings = resolve_settings(
        pg_dsn=postgres.dsn,
        slot=postgres.slot,
        clickhouse_url=clickhouse.url,
        redis_url=redis.url,
        kafka_bootstrap=kafka.bootstrap,
        kafka_security_protocol=kafka.security_protocol,
    )
    limits = reconcile.ReconcileLimits(
        wait_s=config.wait_seconds,
        kafka_deadline_s=config.kafka_deadline_seconds,
        kafka_max_messages=config.kafka_max_messages,
    )
    result = reconcile.reconcile_window(
        reconcile.ReconcileTargets.from_settings(settings), _window(context), limits=limits
    )
    return reconcile_check_result(result)


# --- summaries --------------------------------------------------------------------------------


def _summary_asset(
    period: rollups.Period, partitions_def: dg.PartitionsDefinition, description: str
) -> dg.AssetsDefinition:
    """clickhouse/{daily|weekly}_engagement_summary: the period replaced whole from the
    10-minute rollups (lib/rollups.py `summarize`)."""
    table, _ = rollups.SUMMARY_TABLE[period]

    @dg.asset(
        key=["clickhouse", table.removeprefix("engagement.")],
        deps=[engagement_rollup_10m],
        partitions_def=partitions_def,
        group_name="windows",
        kinds={"clickhouse"},
        retry_policy=RETRY,
        description=f"{table}: {description}",
        metadata={"dagster/table_name": table},
    )
    def summary(
        context: dg.AssetExecutionContext, clickhouse: ClickHouseResource
    ) -> dg.MaterializeResult:
        dsn = clickhouse.settings.clickhouse_dsn
        result = rollups.summarize(dsn, period, _window(context), first=_FIRST)
        return dg.MaterializeResult(
            metadata={
                "content_types": result.content_types,
                "events": result.events,
                "missing_10m_rollups": result.missing_windows,
            }
        )

    return summary


daily_engagement_summary = _summary_asset(
    "day",
    daily_summary_partitions_def,
    "per UTC day and content_type, from the 10-minute rollups; averages are sum/count, unique "
    "users merged; the day is replaced whole.",
)
weekly_engagement_summary = _summary_asset(
    "week",
    weekly_summary_partitions_def,
    "per ISO week (Monday 00:00 UTC) and content_type, from the 10-minute rollups; averages are "
    "sum/count, unique users merged.",
)


# --- jobs and sensors -------------------------------------------------------------------------

rollup_windows = dg.define_asset_job(
    name="rollup_windows",
    selection=dg.AssetSelection.assets(engagement_rollup_10m, engagement_windows),
    tags={"engagement/kind": "rollup"},
    description="One 10-minute window: its rollup in ClickHouse, then its Redis window keys.",
)
daily_summary = dg.define_asset_job(
    name="daily_summary",
    selection=dg.AssetSelection.assets(daily_engagement_summary),
    tags={"engagement/kind": "rollup"},
)
weekly_summary = dg.define_asset_job(
    name="weekly_summary",
    selection=dg.AssetSelection.assets(weekly_engagement_summary),
    tags={"engagement/kind": "rollup"},
)

REQUESTS_PER_TICK = 36  # six hours of windows: a daemon that was down catches up over ticks


@dg.sensor(
    job=rollup_windows,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests each 10-minute window once it closed (end + lateness), run_key = "
    "partition key; oldest first after an outage. Older windows: backfill from the UI.",
)
def rollup_window_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    after = (
        datetime.strptime(context.cursor, WINDOW_FMT).replace(tzinfo=UTC)
        if context.cursor
        else None
    )
    windows = rollups.windows_to_request(
        datetime.now(UTC),
        lateness_s=get_settings().rollup_lateness_seconds,
        after=after,
        first=_FIRST,
        limit=REQUESTS_PER_TICK,
    )
    keys = [w.strftime(WINDOW_FMT) for w in windows]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=key, partition_key=key) for key in keys],
        cursor=keys[-1] if keys else context.cursor,
    )


def _rollup_records(
    context: dg.SensorEvaluationContext, limit: int = 500
) -> tuple[list[dg.EventLogRecord], str | None]:
    """Rollup materializations after the cursor (a storage id), oldest first."""
    after = int(context.cursor) if context.cursor else None
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ROLLUP_KEY, after_storage_id=after),
        limit=limit,
        ascending=True,
    )
    records = list(result.records)
    return records, str(records[-1].storage_id) if records else context.cursor


def late_run_requests(records: Sequence[dg.EventLogRecord]) -> list[dg.RunRequest]:
    """One re-roll per window a rollup run found changed after its rollup (key@lsn, unique)."""
    wanted: dict[str, str] = {}
    for record in records:
        materialization = record.asset_materialization
        value = materialization.metadata.get(LATE_WINDOWS) if materialization else None
        text = getattr(value, "value", "") or ""
        for item in filter(None, str(text).split(",")):
            key, _, _ = item.partition("@")
            wanted[key] = item
    return [dg.RunRequest(run_key=item, partition_key=key) for key, item in sorted(wanted.items())]


@dg.sensor(
    job=rollup_windows,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-rolls windows that received changes (late events, updates, deletes) after "
    "their rollup, as found by each rollup run's scan of newly applied changes.",
)
def late_change_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    records, cursor = _rollup_records(context)
    return dg.SensorResult(run_requests=late_run_requests(records), cursor=cursor)


def summary_run_requests(
    records: Sequence[dg.EventLogRecord], now: datetime, lateness_s: int
) -> list[dg.RunRequest]:
    """A summary run for each closed day and week that a rollup in `records` belongs to."""
    latest: dict[tuple[rollups.Period, str], int] = {}
    for record in records:
        key = record.partition_key
        if key is None:
            continue
        start = datetime.strptime(key, WINDOW_FMT).replace(tzinfo=UTC)
        for period in ("day", "week"):
            begin = rollups.period_start(period, start)
            if (
                begin >= _FIRST
                and rollups.closes_at(rollups.PERIOD_WINDOW[period], begin, lateness_s) <= now
            ):
                latest[(period, begin.strftime(DAY_FMT))] = record.storage_id
    jobs = {"day": daily_summary.name, "week": weekly_summary.name}
    return [
        dg.RunRequest(run_key=f"{key}@{storage_id}", partition_key=key, job_name=jobs[period])
        for (period, key), storage_id in sorted(latest.items())
    ]


@dg.sensor(
    jobs=[daily_summary, weekly_summary],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-summarizes a closed day or ISO week whenever one of its 10-minute rollups "
    "is materialized (its last window, or a re-roll after a late change).",
)
def summary_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    records, cursor = _rollup_records(context)
    requests = summary_run_requests(
        records, datetime.now(UTC), get_settings().rollup_lateness_seconds
    )
    return dg.SensorResult(run_requests=requests, cursor=cursor)


rollup_assets = [
    engagement_rollup_10m,
    engagement_windows,
    daily_engagement_summary,
    weekly_engagement_summary,
]
rollup_checks = [
    rollup_matches_enriched,
    redis_windows_match_rollups,
    window_reconciles_across_sinks,
]
rollup_jobs = [rollup_windows, daily_summary, weekly_summary]
rollup_sensors = [rollup_window_sensor, late_change_sensor, summary_sensor]
