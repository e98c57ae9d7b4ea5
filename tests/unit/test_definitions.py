"""The Dagster code location: it validates, and its asset graph is what we expect."""

from __future__ import annotations

import subprocess
import sys
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
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"postgres/content", "postgres/engagement_events"}


def test_every_system_has_a_resource_with_a_health_check() -> None:
    resources = defs.resources or {}
    assert set(resources) == {"postgres", "clickhouse", "redis", "kafka"}
    for name, resource in resources.items():
        assert callable(getattr(resource, "health", None)), f"{name} has no health()"


def test_run_config_overrides_the_environment() -> None:
    resource = PostgresResource(slot="slot_from_run_config")
    assert resource.settings.slot == "slot_from_run_config"
    assert resource.settings.publication == "engagement_test_pub"  # from the test env


def test_health_job_is_defined() -> None:
    job = defs.resolve_job_def("health_check")
    assert isinstance(job, dg.JobDefinition)
    assert job.tags.get("engagement/kind") == "operations"
