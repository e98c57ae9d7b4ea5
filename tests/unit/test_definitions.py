"""The Dagster code location: it validates, and its asset graph is what we expect."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from engagement_dagster.definitions import defs
from engagement_dagster.resources import PostgresResource

BIN = Path(sys.executable).parent


def test_definitions_pass_dagster_validation() -> None:
    done = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "engagement_dagster.definitions"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All code locations passed validation" in done.stdout + done.stderr


def test_asset_graph_snapshot() -> None:
    graph = defs.resolve_asset_graph()
    edges = {
        key.to_user_string(): sorted(p.to_user_string() for p in graph.get(key).parent_keys)
        for key in graph.get_all_asset_keys()
    }
    assert edges == {
        "postgres/content": [],
        "postgres/engagement_events": [],
        "engagement/enriched_engagements": ["postgres/content", "postgres/engagement_events"],
        "clickhouse/enriched_engagements": ["engagement/enriched_engagements"],
        "redis/engagement_live_board": ["engagement/enriched_engagements"],
        "kafka/engagement_enriched_v1": ["engagement/enriched_engagements"],
        "clickhouse/engagement_rollup_10m": ["clickhouse/enriched_engagements"],
        "redis/engagement_windows": ["clickhouse/engagement_rollup_10m"],
        "clickhouse/daily_engagement_summary": ["clickhouse/engagement_rollup_10m"],
        "clickhouse/weekly_engagement_summary": ["clickhouse/engagement_rollup_10m"],
    }


def test_the_stream_job_runs_every_stream_asset_in_one_process() -> None:
    job = defs.resolve_job_def("cdc_stream")
    assert job.tags.get("engagement/stream") == "true"
    assert job.executor_def.name == "in_process"
    keys = {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
    # clickhouse/enriched_engagements is daily-partitioned (assets/history.py): the stream
    # reports today's partition through events instead of selecting it.
    assert keys == {
        "engagement/enriched_engagements",
        "redis/engagement_live_board",
        "kafka/engagement_enriched_v1",
    }


def test_the_warehouse_table_has_daily_partitions_backfilled_in_one_run() -> None:
    asset = defs.resolve_assets_def(dg.AssetKey(["clickhouse", "enriched_engagements"]))
    partitions = asset.partitions_def
    assert isinstance(partitions, dg.DailyPartitionsDefinition)
    assert partitions.timezone == "UTC"
    assert partitions.get_last_partition_key() == datetime.now(UTC).date().isoformat()
    assert asset.backfill_policy == dg.BackfillPolicy.single_run()
    assert isinstance(defs.resolve_job_def("restart_from_point"), dg.JobDefinition)


def test_change_cursor_sensor_runs_by_default_and_targets_the_stream() -> None:
    sensor = defs.resolve_sensor_def("change_cursor_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 5
    assert sensor.job_name == "cdc_stream"


def test_every_system_has_a_resource_with_a_health_check() -> None:
    resources = defs.resources or {}
    assert set(resources) == {"postgres", "clickhouse", "redis", "kafka"}
    for name, resource in resources.items():
        assert callable(getattr(resource, "health", None)), f"{name} has no health()"


def test_run_config_overrides_the_environment() -> None:
    resource = PostgresResource(slot="slot_from_run_config")
    assert resource.settings.slot == "slot_from_run_config"
    assert resource.settings.publication == os.environ["ENGAGEMENT_PUBLICATION"]  # test env


def test_health_job_is_defined() -> None:
    job = defs.resolve_job_def("health_check")
    assert isinstance(job, dg.JobDefinition)
    assert job.tags.get("engagement/kind") == "operations"


def test_sink_assets_have_freshness_policies() -> None:
    graph = defs.resolve_asset_graph()
    for key in (
        ["clickhouse", "enriched_engagements"],
        ["redis", "engagement_live_board"],
        ["kafka", "engagement_enriched_v1"],
    ):
        policy = graph.get(dg.AssetKey(key)).freshness_policy
        assert policy is not None, key
        assert policy.fail_window.to_timedelta().total_seconds() == 300, key
    for key in (["clickhouse", "engagement_rollup_10m"], ["redis", "engagement_windows"]):
        policy = graph.get(dg.AssetKey(key)).freshness_policy
        assert policy is not None, key
        assert policy.fail_window.to_timedelta().total_seconds() == 1800, key
