"""The external system's feed: Kafka client settings (PLAINTEXT, SSL or SASL) and its health."""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from engagement_dagster.lib.health import Health, kafka_health
from engagement_dagster.lib.kafka_config import kafka_client_config
from engagement_dagster.lib.settings import Settings
from engagement_dagster.resources.settings import resolve_settings


class KafkaResource(dg.ConfigurableResource):
    """Kafka brokers; the SASL password comes only from $ENGAGEMENT_KAFKA_SASL_PASSWORD."""

    bootstrap: str | None = Field(default=None, description="Default: $ENGAGEMENT_KAFKA_BOOTSTRAP.")
    security_protocol: str | None = Field(
        default=None, description="Default: $ENGAGEMENT_KAFKA_SECURITY_PROTOCOL (PLAINTEXT)."
    )

    @property
    def settings(self) -> Settings:
        return resolve_settings(
            kafka_bootstrap=self.bootstrap, kafka_security_protocol=self.security_protocol
        )

    def client_config(self) -> dict[str, Any]:
        return kafka_client_config(self.settings)

    def health(self) -> Health:
        return kafka_health(self.settings)
