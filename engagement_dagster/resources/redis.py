"""The real-time store: Redis clients for the live boards and window keys, and its health."""

from __future__ import annotations

import dagster as dg
import redis
from pydantic import Field

from engagement_dagster.lib.health import Health, redis_health
from engagement_dagster.lib.settings import Settings
from engagement_dagster.resources.settings import resolve_settings


class RedisResource(dg.ConfigurableResource):
    """Redis, addressed by URL (redis:// or rediss:// with user and password for ACL and TLS)."""

    url: str | None = Field(default=None, description="Default: $ENGAGEMENT_REDIS_URL.")

    @property
    def settings(self) -> Settings:
        return resolve_settings(redis_url=self.url)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url)

    def health(self) -> Health:
        return redis_health(self.settings)
