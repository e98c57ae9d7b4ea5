"""Client settings shared by every Kafka producer, consumer and admin client we create.

Security settings come from one place so that a TLS/SASL deployment changes env vars, not code:
the same Settings map onto kafka-python's keyword arguments and onto librdkafka's properties.
"""

from __future__ import annotations

from typing import Any

from engagement_dagster.lib.settings import Settings


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
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


def librdkafka_config(settings: Settings) -> dict[str, Any]:
    """The same client settings as librdkafka properties (confluent-kafka Producer, Consumer,
    AdminClient). Unlike kafka-python, librdkafka rejects unknown or misspelt keys at creation,
    so a wrong mapping fails at start, not at the first TLS handshake."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol.lower(),
        "client.id": "engagement",
    }
    if settings.kafka_sasl_mechanism:
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        if settings.kafka_sasl_username is not None:
            config["sasl.username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_cafile is not None:
        config["ssl.ca.location"] = str(settings.kafka_ssl_cafile)
    return config


def delete_topics_under(settings: Settings, prefix: str) -> None:
    """Delete every topic whose name starts with `prefix` (a bench run's, a test session's)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(**kafka_client_config(settings))
    try:
        ours = [t for t in admin.list_topics() if t.startswith(prefix)]
        if ours:
            admin.delete_topics(ours)
    finally:
        admin.close()
