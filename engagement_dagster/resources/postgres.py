"""The source PostgreSQL: connections, the slot and publication names, and its health.

Holds no connection between uses; a run opens what it needs and closes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg2.extensions
from pydantic import Field

from engagement_dagster.lib.health import Health, postgres_health
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect
from engagement_dagster.resources.settings import resolve_settings


class PostgresResource(dg.ConfigurableResource):
    """Source database of engagement events (logical replication with pgoutput)."""

    dsn: str | None = Field(default=None, description="Default: $ENGAGEMENT_PG_DSN.")
    slot: str | None = Field(default=None, description="Default: $ENGAGEMENT_SLOT.")
    publication: str | None = Field(default=None, description="Default: $ENGAGEMENT_PUBLICATION.")

    @property
    def settings(self) -> Settings:
        return resolve_settings(pg_dsn=self.dsn, slot=self.slot, publication=self.publication)

    @contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        with connect(self.settings.pg_dsn) as conn:
            yield conn

    def health(self) -> Health:
        return postgres_health(self.settings)
