"""The real-time store: Redis clients for the live boards and window keys, and its health."""

from __future__ import annotations

import dagster as dg
import redis
from pydantic import Field

from engagement_dagster.lib.health import Health, redis_health
from engagement_dagster.lib.secure import redis_client
from engagement_dagster.lib.settings import Settings
from engagement_dagster.resources.settings import resolve_settings


class RedisResource(dg.ConfigurableResource):
    """Redis, addressed by URL (redis://, or rediss:// for TLS); the ACL user's password from the
    URL in $ENGAGEMENT_REDIS_URL or $ENGAGEMENT_REDIS_PASSWORD, never from run config."""

    url: str | None = Field(
        default=None,
        description="Default: $ENGAGEMENT_REDIS_URL. Leave the password out of run config: "
        "Dagster stores run config in plain text.",
    )

    @property
    def settings(self) -> Settings:
        return resolve_settings(redis_url=self.url)

    def client(self) -> redis.Redis:
        """TLS and the ACL user as every Redis client of the platform (lib/secure.py)."""
        settings = self.settings
        return redis_client(settings.redis_url, settings=settings)

    def health(self) -> Health:
        return redis_health(self.settings)
