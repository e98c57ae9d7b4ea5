"""Kafka client settings: the same Settings map onto kafka-python and onto librdkafka."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer
from pydantic import SecretStr

from engagement_dagster.lib.kafka_config import kafka_client_config, librdkafka_config
from engagement_dagster.lib.pipeline import kafka_sink
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.kafka import KafkaSink
from engagement_dagster.lib.sinks.kafka_confluent import PRODUCER_DEFAULTS, ConfluentKafkaSink


def secured(tmp_path: Path) -> Settings:
    cafile = tmp_path / "ca.pem"
    cafile.write_text("not read until a connection is made")
    return Settings(
        kafka_bootstrap="broker-1:9093,broker-2:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="stream",
        kafka_sasl_password=SecretStr("s3cret"),
        kafka_ssl_cafile=cafile,
    )


def test_security_settings_map_onto_librdkafka(tmp_path: Path) -> None:
    settings = secured(tmp_path)
    assert librdkafka_config(settings) == {
        "bootstrap.servers": "broker-1:9093,broker-2:9093",
        "security.protocol": "sasl_ssl",
        "client.id": "engagement",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "stream",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(tmp_path / "ca.pem"),
    }
    python = kafka_client_config(settings)
    assert (python["sasl_mechanism"], python["sasl_plain_username"]) == ("SCRAM-SHA-512", "stream")


def test_plaintext_default_has_no_security_properties() -> None:
    config = librdkafka_config(Settings(kafka_bootstrap="127.0.0.1:59092"))
    assert config == {
        "bootstrap.servers": "127.0.0.1:59092",
        "security.protocol": "plaintext",
        "client.id": "engagement",
    }


def test_librdkafka_accepts_the_sasl_and_producer_properties() -> None:
    """librdkafka rejects unknown keys and bad values when the client is created (no broker is
    contacted before first use), so a typo in the mapping or the tuning fails here."""
    settings = Settings(
        kafka_bootstrap="127.0.0.1:1",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="stream",
        kafka_sasl_password=SecretStr("s3cret"),
    )
    config = {**librdkafka_config(settings), **PRODUCER_DEFAULTS, "transactional.id": "unit"}
    assert isinstance(Producer(config), Producer)
    with pytest.raises(KafkaException, match="No such configuration property"):
        Producer({**config, "sasl.user": "stream"})


def test_the_stream_uses_the_configured_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGAGEMENT_KAFKA_CLIENT", raising=False)
    assert isinstance(kafka_sink(Settings()), ConfluentKafkaSink)  # the measured faster one
    monkeypatch.setenv("ENGAGEMENT_KAFKA_CLIENT", "kafka-python")
    old = kafka_sink(Settings())
    assert isinstance(old, KafkaSink)
    assert old.transactional_id == f"engagement-stream-{Settings().slot}"
