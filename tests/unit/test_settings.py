"""Settings: the contract env vars of DESIGN §9, their local defaults and their validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
from pydantic import SecretStr, ValidationError

from engagement_dagster.lib.secure import (
    ConnectionConfigError,
    clickhouse_server_args,
    explain_pg_error,
    pg_connect,
    redact,
    redis_client,
)
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


# --- security: secrets, combinations refused, client builders, explanations ------------------

SECRET_ENV = {
    "ENGAGEMENT_PG_PASSWORD": "pg_password",
    "ENGAGEMENT_PG_ROLE_PASSWORD": "pg_role_password",
    "ENGAGEMENT_REDIS_PASSWORD": "redis_password",
    "ENGAGEMENT_CLICKHOUSE_PASSWORD": "clickhouse_password",
    "ENGAGEMENT_KAFKA_SASL_PASSWORD": "kafka_sasl_password",
}


def test_every_password_is_a_secret_string(clean_env: pytest.MonkeyPatch) -> None:
    for env, _ in SECRET_ENV.items():
        clean_env.setenv(env, f"{env.lower()}-value")
    settings = Settings()
    for env, field in SECRET_ENV.items():
        value = getattr(settings, field)
        assert isinstance(value, SecretStr) and value.get_secret_value() == f"{env.lower()}-value"
        assert f"{env.lower()}-value" not in repr(settings) + str(settings.model_dump())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs ENGAGEMENT_KAFKA_SASL_MECHANISM"),
        ({"kafka_sasl_mechanism": "SCRAM-SHA-512"}, "does not use SASL"),
        ({"kafka_ssl_cafile": Path("/ca.pem")}, "is not TLS"),
        ({"redis_ca_file": Path("/ca.pem")}, "ENGAGEMENT_REDIS_URL is not rediss://"),
        (
            {"clickhouse_url": "http://ch:8123", "clickhouse_ca_file": Path("/ca.pem")},
            "ENGAGEMENT_CLICKHOUSE_URL is not https://",
        ),
    ],
)
def test_settings_that_would_silently_drop_tls_or_sasl_are_refused(
    clean_env: pytest.MonkeyPatch, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("rediss://app:s3cr3t@host:6380/0", "rediss://app:***@host:6380/0"),
        ("redis://:s3cr3t@host:6379/0", "redis://:***@host:6379/0"),
        ("https://ch.example.com:8443/", "https://ch.example.com:8443/"),
        ("host=db password=s3cr3t sslmode=require", "host=db password=*** sslmode=require"),
        ("host=db password='a b\\'c' dbname=x", "host=db password=*** dbname=x"),
        ("postgresql://db/x?password=s3cr3t&sslmode=require", "postgresql://db/x?password=***&sslmode=require"),
        ("failed at redis://u:pw1@h:1 and redis://u:pw2@h:2", "failed at redis://u:***@h:1 and redis://u:***@h:2"),
    ],
)  # fmt: skip
def test_redact_masks_passwords_in_urls_and_dsns(text: str, redacted: str) -> None:
    assert redact(text, Settings()) == redacted


def test_redact_masks_the_configured_secrets_wherever_they_appear() -> None:
    settings = Settings(
        pg_password=SecretStr("pg-secret-1"),
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="stream",
        kafka_sasl_password=SecretStr("kafka-secret-2"),
        redis_url="redis://app:redis-secret-3@h:1/0",
    )
    text = "a library echoed pg-secret-1, kafka-secret-2 and redis-secret-3 back"
    assert redact(text, settings) == "a library echoed ***, *** and *** back"


def test_redis_clients_verify_tls_and_take_the_acl_user_from_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("read when a connection is made")
    settings = Settings(
        redis_url="rediss://cache:6380/2",
        redis_username="stream",
        redis_password=SecretStr("pw"),
        redis_ca_file=ca,
    )
    client = redis_client(settings.redis_url, settings=settings, socket_timeout=3)
    options = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert (options["ssl_cert_reqs"], options["ssl_check_hostname"]) == ("required", True)
    assert options["ssl_ca_certs"] == str(ca)
    assert (options["username"], options["password"], options["db"]) == ("stream", "pw", 2)
    assert options["socket_timeout"] == 3

    # Credentials and options in the URL win over the settings.
    url = "rediss://app:inurl@cache:6380/0?ssl_ca_certs=/other.pem"
    options = redis_client(url, settings=settings).connection_pool.connection_kwargs
    assert (options["username"], options["password"]) == ("app", "inurl")
    assert options["ssl_ca_certs"] == "/other.pem"

    plain = redis_client("redis://127.0.0.1:6379/0", settings=Settings())
    assert plain.connection_pool.connection_class is redis.Connection
    assert plain.connection_pool.connection_kwargs.get("password") is None


def test_a_missing_redis_ca_file_is_named(tmp_path: Path) -> None:
    settings = Settings(redis_url="rediss://cache:6380/0", redis_ca_file=tmp_path / "nope.pem")
    with pytest.raises(ConnectionConfigError, match=r"ENGAGEMENT_REDIS_CA_FILE=.*does not exist"):
        redis_client(settings.redis_url, settings=settings)


def test_clickhouse_https_gets_tls_verification_and_credentials(tmp_path: Path) -> None:
    """No ClickHouse server runs here: what reaches clickhouse_connect.get_client is checked
    (tests/integration/test_security.py also watches what it sends to a TLS endpoint)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("PEM")
    settings = Settings(
        clickhouse_url="https://ch.example.com:8443",
        clickhouse_user="analyst",
        clickhouse_password=SecretStr("pw"),
        clickhouse_ca_file=ca,
    )
    assert clickhouse_server_args(settings.clickhouse_dsn, settings=settings) == {
        "dsn": "https://ch.example.com:8443",
        "secure": True,
        "verify": True,
        "ca_cert": str(ca),
        "username": "analyst",
        "password": "pw",
    }
    in_url = clickhouse_server_args("http://u:p@ch:8123", settings=settings)
    assert in_url == {"dsn": "http://u:p@ch:8123"}  # plain http, credentials from the URL


def test_pg_connect_adds_the_password_only_when_the_dsn_has_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(psycopg2, "connect", lambda dsn, **kw: seen.append({"dsn": dsn, **kw}))
    settings = Settings(pg_password=SecretStr("from-env"))
    pg_connect(
        "host=db user=app dbname=x sslmode=verify-full", settings=settings, connect_timeout=5
    )
    pg_connect("postgresql://app:in-dsn@db/x", settings=settings)
    pg_connect("host=db dbname=x", settings=Settings())  # libpq may still find PGPASSFILE
    assert seen[0]["password"] == "from-env" and seen[0]["connect_timeout"] == 5
    assert "password" not in seen[1] and "password" not in seen[2]


@pytest.mark.parametrize(
    ("server", "explanation"),
    [
        ('FATAL:  password authentication failed for user "app"', "wrong password for user app"),
        ("fe_sendauth: no password supplied", "set ENGAGEMENT_PG_PASSWORD"),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", no encryption', "sslmode=verify-full"),
        ("SSL error: certificate verify failed", "not signed by the CA in sslrootcert (/etc/ca"),
        ('root certificate file "/etc/ca.pem" does not exist', "the CA file is missing"),
        ("FATAL:  must be superuser or replication role to start walsender", "REPLICATION"),
        ("Connection refused\n\tIs the server running on that host?", "nothing listens at db:5433"),
    ],
)  # fmt: skip
def test_refused_postgres_connections_are_explained(server: str, explanation: str) -> None:
    dsn = "host=db port=5433 user=app dbname=x sslmode=verify-full sslrootcert=/etc/ca.pem"
    error = psycopg2.OperationalError(
        f'connection to server at "db" (10.0.0.1), port 5433 failed: {server}'
    )
    text = explain_pg_error(error, dsn)
    assert text.startswith("PostgreSQL at db:5433 (user app): ")
    assert explanation in text
    assert server.splitlines()[0].strip() in text  # the server's own words are kept


def test_configured_names_reaching_sql_are_validated() -> None:
    from engagement_dagster.lib.source_db import (
        SourceDatabaseError,
        create_stream_role,
        database_name,
    )

    assert database_name("postgresql://app@db/engagement_prod") == "engagement_prod"
    with pytest.raises(SourceDatabaseError, match="database name in ENGAGEMENT_PG_DSN"):
        database_name("host=db dbname='x\"; DROP DATABASE y'")
    # The role name is refused before any connection is made (nothing listens on port 1).
    with pytest.raises(ValueError, match="not a valid identifier"):
        create_stream_role("postgresql://app@127.0.0.1:1/x", "stream; DROP ROLE app", "pw")


def test_db_init_refuses_an_invalid_role_name_before_connecting() -> None:
    from click.testing import CliRunner

    from engagement_dagster.cli import main

    result = CliRunner().invoke(main, ["db", "init", "--create-role", "Stream-Role"])
    assert result.exit_code == 2
    assert "not a valid identifier" in result.output
