"""The Dagster resources against the real systems, through the `health_check` job."""

from __future__ import annotations

import dagster as dg

from engagement_dagster.definitions import defs
from engagement_dagster.lib.settings import Settings
from engagement_dagster.resources import RedisResource


def test_health_job_succeeds_when_all_systems_are_up(source_dsn: str) -> None:
    result = defs.resolve_job_def("health_check").execute_in_process(
        instance=dg.DagsterInstance.ephemeral()
    )
    assert result.success


def test_health_job_fails_naming_the_unhealthy_system(source_dsn: str) -> None:
    job = defs.resolve_job_def("health_check")
    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"redis": RedisResource(url="redis://127.0.0.1:1/0")},  # run config wins
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("check_systems")
    assert failure is not None
    assert failure.user_failure_data is not None
    assert failure.user_failure_data.description == "unhealthy: redis"


def test_resources_talk_to_the_configured_systems(services: Settings) -> None:
    resources = defs.resources or {}
    client = resources["redis"].client()
    assert client.ping()
    test_db = int(services.redis_url.rsplit("/", 1)[1])
    assert client.connection_pool.connection_kwargs["db"] == test_db  # the test database
    client.close()
    with resources["clickhouse"].client() as ch:
        assert ch.query("SELECT 1 + 1").result_rows == [(2,)]
    assert resources["kafka"].client_config()["bootstrap_servers"] == ["127.0.0.1:59092"]
