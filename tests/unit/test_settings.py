"""Settings: the contract env vars of DESIGN §9, their local defaults and their validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engagement_dagster.lib.settings import PROJECT_ROOT, Settings, validate_identifier

CONTRACT_ENV = {
    "ENGAGEMENT_PG_DSN": "pg_dsn",
    "ENGAGEMENT_REDIS_URL": "redis_url",
    "ENGAGEMENT_CLICKHOUSE_URL": "clickhouse_url",
    "ENGAGEMENT_KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "ENGAGEMENT_SLOT": "slot",
    "ENGAGEMENT_PUBLICATION": "publication",
    "ENGAGEMENT_STREAM_RUN_SECONDS": "stream_run_seconds",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*CONTRACT_ENV, "ENGAGEMENT_LOCAL_DIR"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_local_defaults_are_the_documented_ones(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.pg_dsn == "postgresql://postgres@127.0.0.1:55432/engagement"
    assert settings.redis_url == "redis://127.0.0.1:56379/0"
    assert settings.kafka_bootstrap == "127.0.0.1:59092"
    assert settings.slot == "engagement_slot"
    assert settings.publication == "engagement_pub"
    assert settings.stream_run_seconds == 300
    assert settings.clickhouse_dsn == f"chdb://{PROJECT_ROOT / '.local' / 'clickhouse'}"
    assert settings.dagster_home == PROJECT_ROOT / ".local" / "dagster"


@pytest.mark.parametrize(("env", "field"), sorted(CONTRACT_ENV.items()))
def test_every_contract_variable_is_read(
    clean_env: pytest.MonkeyPatch, env: str, field: str
) -> None:
    value = "61" if field == "stream_run_seconds" else "other_value"
    clean_env.setenv(env, value)
    assert str(getattr(Settings(), field)) == value


def test_explicit_values_override_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ENGAGEMENT_SLOT", "from_env")
    assert Settings(slot="from_run_config").slot == "from_run_config"


@pytest.mark.parametrize(
    "name", ["Engagement", "slot-1", "1slot", "x" * 64, "a;drop table content", ""]
)
def test_identifiers_from_configuration_are_validated(
    clean_env: pytest.MonkeyPatch, name: str
) -> None:
    with pytest.raises(ValueError, match="not a valid identifier"):
        validate_identifier(name)
    clean_env.setenv("ENGAGEMENT_PUBLICATION", name)
    with pytest.raises(ValidationError):
        Settings()


def test_secrets_stay_out_of_reprs(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ENGAGEMENT_KAFKA_SASL_PASSWORD", "hunter2-secret")
    settings = Settings()
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "hunter2-secret"
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings.model_dump())


def test_an_unknown_fault_injection_point_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from engagement_dagster.lib.stream import Stream

    monkeypatch.setenv("ENGAGEMENT_FAULT", "after_sink:nowhere")
    with pytest.raises(ValueError, match="expected before_ack or after_sink"):
        Stream(dsn="postgresql://x@127.0.0.1:1/x", slot="s", publication="p", sinks=[])
