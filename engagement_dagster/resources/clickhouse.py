"""The warehouse: ClickHouse server over http(s), or embedded chDB under .local/ by default.

Clients are handed out for short sections only (see lib/clickhouse.py): chDB is single-process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from clickhouse_connect.driver.client import Client
from pydantic import Field

from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.health import Health, clickhouse_health
from engagement_dagster.lib.settings import Settings
from engagement_dagster.resources.settings import resolve_settings


class ClickHouseResource(dg.ConfigurableResource):
    """ClickHouse, addressed by URL: chdb:///path or http(s)://user:password@host:port."""

    url: str | None = Field(default=None, description="Default: $ENGAGEMENT_CLICKHOUSE_URL.")

    @property
    def settings(self) -> Settings:
        return resolve_settings(clickhouse_url=self.url)

    @contextmanager
    def client(self) -> Iterator[Client]:
        with clickhouse_client(self.settings.clickhouse_dsn) as client:
            yield client

    def health(self) -> Health:
        return clickhouse_health(self.settings)
