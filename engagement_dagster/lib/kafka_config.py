"""Client settings shared by every Kafka producer, consumer and admin client we create.

Security settings come from one place so that a TLS/SASL deployment changes env vars, not code.
"""

from __future__ import annotations

from typing import Any

from engagement_dagster.lib.settings import Settings


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "security_protocol": settings.kafka_security_protocol,
        "client_id": "engagement",
    }
    if settings.kafka_sasl_mechanism:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_cafile is not None:
        config["ssl_cafile"] = str(settings.kafka_ssl_cafile)
    return config
