"""Configuration: the one home of every setting, read from ENGAGEMENT_* environment variables.

Every value has a local default so that nothing needs setting on a developer machine; no other
module may hard-code a host, port, path or name that appears here.
"""

from __future__ import annotations

import re
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engagement_dagster.lib.windows import Window

PROJECT_ROOT = Path(__file__).resolve().parents[2]

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def validate_identifier(name: str) -> str:
    """Accept a lower-case SQL identifier (what PostgreSQL allows unquoted); reject anything else.

    Slot and publication names come from configuration and end up in DDL, so they are checked
    here once instead of being quoted ad hoc at every use.
    """
    if not _IDENTIFIER.match(name):
        raise ValueError(
            f"{name!r} is not a valid identifier: use 1-63 characters of a-z, 0-9 and _, "
            "starting with a letter or _"
        )
    return name


Identifier = Annotated[str, AfterValidator(validate_identifier)]


def _default_local_dir() -> Path:
    return PROJECT_ROOT / ".local"


class Settings(BaseSettings):
    """Settings of every process: CLI, Dagster code location, stream runs and tests."""

    model_config = SettingsConfigDict(env_prefix="ENGAGEMENT_", frozen=True, extra="ignore")

    local_dir: Path = Field(
        default_factory=_default_local_dir,
        description="Where the private local services keep their data, logs and pid files.",
    )
    pg_dsn: str = Field(
        default="postgresql://postgres@127.0.0.1:55432/engagement",
        description="libpq DSN (URL or key=value) of the source database, for every connection "
        "including replication; TLS with sslmode=verify-full sslrootcert=<CA file>.",
    )
    pg_password: SecretStr | None = Field(
        default=None,
        description="Password of the DSN's user when the DSN carries none; without either, "
        "libpq reads PGPASSFILE (~/.pgpass).",
    )
    pg_role_password: SecretStr | None = Field(
        default=None,
        description="Password of the role `engagement db init --create-role` creates "
        "(prompted when unset).",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:56379/0",
        description="redis://, or rediss:// for TLS; an ACL user and password may be in the URL "
        "(rediss://user:password@host:port/db) or in ENGAGEMENT_REDIS_USERNAME/_PASSWORD.",
    )
    redis_username: str | None = Field(
        default=None, description="ACL user when the URL names none."
    )
    redis_password: SecretStr | None = Field(
        default=None, description="Password of the ACL user when the URL carries none."
    )
    redis_ca_file: Path | None = Field(
        default=None,
        description="CA bundle (PEM) that signed the Redis server's certificate (rediss:// "
        "only); the URL's ssl_ca_certs query parameter does the same.",
    )
    clickhouse_url: str = Field(
        default="",
        description="chdb:///path for embedded chDB (default: .local/clickhouse), "
        "or http(s)://user:password@host:port for a ClickHouse server.",
    )
    clickhouse_user: str | None = Field(
        default=None, description="ClickHouse server user when the URL names none."
    )
    clickhouse_password: SecretStr | None = Field(
        default=None, description="ClickHouse server password when the URL carries none."
    )
    clickhouse_ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) of the ClickHouse server (https:// only)."
    )
    clickhouse_verify: bool = Field(
        default=True,
        description="Verify the ClickHouse server's certificate and host name (https:// only). "
        "Turn off only against a test server.",
    )
    clickhouse_hold_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Embedded chDB only: the stream keeps the database open while no other "
        "process wants it; once one waits, the stream lets go within this long (at once when "
        "idle). Every reopen of chDB 4.4 leaks threads and memory.",
    )
    kafka_bootstrap: str = "127.0.0.1:59092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    local_tls_cert_file: Path | None = Field(
        default=None,
        description="Local services only: the server certificate chain (PEM) that the private "
        "PostgreSQL, Redis and Kafka present when their URL asks for TLS.",
    )
    local_tls_key_file: Path | None = Field(
        default=None, description="Local services only: the private key (PEM) of that certificate."
    )
    kafka_topic_prefix: str = Field(
        default="",
        pattern=r"^[a-zA-Z0-9._-]*$",
        description="Prefix for every topic name (tests use one to keep the contract topics "
        "of a running platform clean); empty in production.",
    )
    kafka_client: Literal["confluent", "kafka-python"] = Field(
        default="confluent",
        description="Producer library of the stream's Kafka sink: confluent-kafka (librdkafka) "
        "or kafka-python. Same topics, messages and transactions; bench/kafka_sink.py measured "
        "confluent-kafka several times faster for a fraction of the CPU.",
    )
    slot: Identifier = "engagement_slot"
    publication: Identifier = "engagement_pub"
    stream_run_seconds: int = Field(default=300, ge=0)
    history_start: date = Field(
        default=date(2026, 1, 1),
        description="First day partition of clickhouse/enriched_engagements (daily backfills).",
    )
    rollup_start: date = Field(
        default=date(2026, 11, 1),
        description="First 10-minute partition of the rollups: 144 partitions a day, so a start "
        "about a year back keeps far below Dagster's 100k partition limit.",
    )
    rollup_lateness_seconds: int = Field(
        default=120,
        ge=0,
        description="How long after a window closes the stream still updates its Redis keys "
        "and before the rollup rewrites it; later changes re-materialize the window.",
    )
    window_ttl_10m_seconds: int = Field(default=2 * 86_400, gt=0)
    window_ttl_1h_seconds: int = Field(default=8 * 86_400, gt=0)
    window_ttl_1d_seconds: int = Field(default=35 * 86_400, gt=0)
    window_ttl_1w_seconds: int = Field(default=400 * 86_400, gt=0)
    metrics_dir_override: Path | None = Field(
        default=None,
        alias="ENGAGEMENT_METRICS_DIR",
        description="Where every process writes its metrics for the exporter "
        "(default: .local/metrics). Read once, when the metrics module is imported.",
    )
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9108, gt=0, lt=65536)
    extra_event_types: str = Field(
        default="",
        description="Comma-separated event types accepted besides play, pause, finish and "
        "click; the stream and `engagement dlq replay` validate with the same rules.",
    )

    @model_validator(mode="after")
    def _security_settings_agree(self) -> Settings:
        """Refuse combinations that would silently connect without the TLS or credentials the
        operator asked for, naming the variables to fix."""
        problems = []
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            problems.append(
                f"ENGAGEMENT_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "ENGAGEMENT_KAFKA_SASL_MECHANISM, _SASL_USERNAME and _SASL_PASSWORD"
            )
        if not sasl and self.kafka_sasl_mechanism:
            problems.append(
                f"ENGAGEMENT_KAFKA_SASL_MECHANISM is set but ENGAGEMENT_KAFKA_SECURITY_PROTOCOL="
                f"{self.kafka_security_protocol} does not use SASL (SASL_SSL, SASL_PLAINTEXT)"
            )
        if self.kafka_ssl_cafile and not self.kafka_security_protocol.endswith("SSL"):
            problems.append(
                "ENGAGEMENT_KAFKA_SSL_CAFILE is set but ENGAGEMENT_KAFKA_SECURITY_PROTOCOL="
                f"{self.kafka_security_protocol} is not TLS (SSL, SASL_SSL)"
            )
        if self.redis_ca_file and not self.redis_url.startswith("rediss://"):
            problems.append(
                "ENGAGEMENT_REDIS_CA_FILE is set but ENGAGEMENT_REDIS_URL is not rediss:// (TLS)"
            )
        if self.clickhouse_ca_file and not self.clickhouse_url.startswith("https://"):
            problems.append(
                "ENGAGEMENT_CLICKHOUSE_CA_FILE is set but ENGAGEMENT_CLICKHOUSE_URL is not https://"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def event_types(self) -> frozenset[str]:
        extra = (t.strip() for t in self.extra_event_types.split(","))
        return frozenset({"play", "pause", "finish", "click", *(t for t in extra if t)})

    @property
    def window_ttls(self) -> dict[Window, int]:
        """TTL of the `engagement:{window}:{window_start}:*` keys, by window."""
        return {
            "10m": self.window_ttl_10m_seconds,
            "1h": self.window_ttl_1h_seconds,
            "1d": self.window_ttl_1d_seconds,
            "1w": self.window_ttl_1w_seconds,
        }

    @property
    def clickhouse_dsn(self) -> str:
        return self.clickhouse_url or f"chdb://{self.local_dir / 'clickhouse'}"

    @property
    def metrics_dir(self) -> Path:
        return self.metrics_dir_override or self.local_dir / "metrics"

    @property
    def dagster_home(self) -> Path:
        return self.local_dir / "dagster"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
