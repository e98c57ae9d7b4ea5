"""Shared fixtures: the test settings and the real local services the integration tests use.

Tests get their own database, slot, publication, Redis db and chDB path, so `make test` never
disturbs the demo data of a running `make run`. A service that cannot start fails the run with
the fix in the message; nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engagement_dagster.lib.settings import PROJECT_ROOT, Settings, get_settings

TEST_LOCAL = PROJECT_ROOT / ".local"
# Two test sessions at once (two developers' terminals) each set their own namespace, so
# neither drops the other's database or steals its slot.
NAMESPACE = os.environ.get("ENGAGEMENT_TEST_NAMESPACE", "")
SUFFIX = f"_{NAMESPACE}" if NAMESPACE else ""
REDIS_DB = 15 - (sum(map(ord, NAMESPACE)) % 6 if NAMESPACE else 0)
TEST_DIR = TEST_LOCAL / f"test{SUFFIX}"
os.environ.update(
    {
        "ENGAGEMENT_PG_DSN": f"postgresql://postgres@127.0.0.1:55432/engagement{SUFFIX}_test",
        "ENGAGEMENT_REDIS_URL": f"redis://127.0.0.1:56379/{REDIS_DB}",
        "ENGAGEMENT_CLICKHOUSE_URL": f"chdb://{TEST_DIR / 'clickhouse'}",
        "ENGAGEMENT_KAFKA_BOOTSTRAP": "127.0.0.1:59092",
        "ENGAGEMENT_SLOT": f"engagement{SUFFIX}_test_slot",
        # Contract topic names behind a per-session prefix: a running `make run` keeps clean
        # topics, and a session never reads what an earlier one wrote.
        "ENGAGEMENT_KAFKA_TOPIC_PREFIX": f"test.{uuid.uuid4().hex[:8]}.",
        "ENGAGEMENT_PUBLICATION": f"engagement{SUFFIX}_test_pub",
        "DAGSTER_HOME": str(TEST_DIR / "dagster"),
        # Metric files of the processes tests start, apart from a running platform's.
        "ENGAGEMENT_METRICS_DIR": str(TEST_DIR / "metrics"),
    }
)
get_settings.cache_clear()
(TEST_DIR / "dagster").mkdir(parents=True, exist_ok=True)
shutil.copyfile(PROJECT_ROOT / "dagster.yaml", TEST_DIR / "dagster" / "dagster.yaml")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by folder, so `-m "not integration"` runs the unit tests alone."""
    for item in items:
        path = Path(str(item.fspath))
        if "integration" in path.parts:
            item.add_marker(pytest.mark.integration)
        if "faults" in path.parts:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def services(settings: Settings) -> Iterator[Settings]:
    """PostgreSQL, Redis and Kafka running on loopback, claimed for this session (a second
    session on the same namespace fails at once: tests.support.ServicesClaim); at the end this
    session's Kafka topics are deleted, and the services stopped if we started them and no other
    session uses them. Only tests that ask for it start them: a unit-only session never touches
    the services."""
    from engagement_dagster.lib.kafka_config import delete_topics_under
    from engagement_dagster.lib.local_services import ServiceError, local_services
    from tests.support import ServicesClaim

    started = []
    for service in local_services(settings):
        try:
            if service.start().started:
                started.append(service)
        except ServiceError as exc:
            for s in reversed(started):
                s.stop()
            pytest.fail(f"local {service.name} could not start: {exc}", pytrace=False)
    refusal = ""
    try:
        claim = ServicesClaim(settings)
    except RuntimeError as exc:
        refusal = str(exc)
    if refusal:  # the services are the other session's: left as they are
        pytest.fail(refusal, pytrace=False)
    try:
        yield settings
    finally:
        try:
            delete_topics_under(settings, settings.kafka_topic_prefix)
        finally:
            alone = claim.sole_user()
            claim.release()
            if started and not alone:
                print("\nleft the local services running: another test session is using them")
            for service in reversed(started if alone else []):
                service.stop()


@pytest.fixture(scope="session")
def source_dsn(services: Settings) -> Iterator[str]:
    """A freshly created test database with `engagement db init` applied."""
    from tests.support import reset_test_database

    reset_test_database(services)
    yield services.pg_dsn
    reset_test_database(services, recreate=False)


@pytest.fixture(scope="module")
def clean_sinks(source_dsn: str, services: Settings) -> Settings:
    """A clean pipeline for one test module: empty source tables, a new slot (so no history
    of earlier modules is replayed), the Redis test database flushed, the test chDB removed.
    Kafka topics keep what earlier modules wrote; tests read only what this module's slot
    produced (tests.support.kafka_versions filters by the epoch recorded here)."""
    import redis

    from engagement_dagster.lib.clickhouse import chdb_path
    from tests.support import start_pipeline_epoch

    start_pipeline_epoch(services)
    client = redis.Redis.from_url(services.redis_url)
    client.flushdb()
    client.close()
    path = chdb_path(services.clickhouse_dsn)
    assert path is not None and path.parent == TEST_DIR, f"refusing to remove {path}"
    shutil.rmtree(path, ignore_errors=True)
    return services
