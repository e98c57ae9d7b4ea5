"""Security on real services: a PostgreSQL, Redis and Kafka of this module's own with TLS and
authentication on (certificates from a CA made here), the pipeline through them as the
least-privilege stream role, refusals that say what is wrong, and no secret in any output.

The shared services (55432, 56379, 59092) are never touched: these run on other loopback ports
from their own directory, and are stopped and removed at the end. ClickHouse stays embedded
chDB (no server on this machine): its https settings are checked against a TLS endpoint that
records what the client sends.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg2
import psycopg2.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engagement_dagster.lib.generator import TrafficOptions, run_traffic, seed_content
from engagement_dagster.lib.health import all_health
from engagement_dagster.lib.local_services import LocalKafka, LocalPostgres, LocalRedis
from engagement_dagster.lib.secure import pg_connect
from engagement_dagster.lib.settings import Settings, get_settings
from tests import support
from tests.conftest import NAMESPACE, SUFFIX, TEST_LOCAL
from tests.support import (
    assert_clickhouse_matches_postgres,
    assert_kafka_matches_postgres,
    assert_redis_matches_postgres,
)

BIN = Path(sys.executable).parent
# Below the fault tests' private ports (55632, 56579, 59292 + their offset).
OFFSET = (sum(map(ord, NAMESPACE)) % 30) * 3 if NAMESPACE else 0
PG_PORT, REDIS_PORT, KAFKA_PORT = 55532 + OFFSET, 56479 + OFFSET, 59192 + OFFSET
SEC_LOCAL = TEST_LOCAL / f"test_tls{SUFFIX}"
DATABASE = f"engagement_sec{SUFFIX}_test"
ROLE = "engagement_stream"
REDIS_USER = "engagement"
KAFKA_USER = "engagement"
PUBLICATION = "engagement_sec_pub"


# --- a CA, a server certificate for 127.0.0.1 and localhost, and a CA that signed nothing ------


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


def _certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(
            issuer.subject
            if issuer
            else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:  # the servers' certificate; clientAuth too: Kafka's broker presents it to its controller
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _certificate("engagement test CA", ca_key, None, ca_key)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _certificate("127.0.0.1", key, ca, ca_key)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = _certificate("a CA that signed nothing here", other_key, None, other_key)
    pki = Pki(
        directory / "ca.pem", directory / "other-ca.pem", directory / "server.pem",
        directory / "server.key",
    )  # fmt: skip
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.other_ca.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key.chmod(0o600)
    return pki


# --- the private stack -------------------------------------------------------------------------


@dataclass(frozen=True)
class Passwords:
    pg_admin: str
    pg_role: str
    redis: str
    kafka: str

    def all(self) -> tuple[str, ...]:
        return (self.pg_admin, self.pg_role, self.redis, self.kafka)


@dataclass(frozen=True)
class Stack:
    pki: Pki
    passwords: Passwords
    env: dict[str, str]  # ENGAGEMENT_* of the admin (db init, the test's own reads and writes)

    @property
    def settings(self) -> Settings:
        return get_settings()  # the module's environment is the stack's

    def pg_dsn(self, user: str = "postgres", **params: str) -> str:
        query = {"sslmode": "verify-full", "sslrootcert": str(self.pki.ca), **params}
        return f"postgresql://{user}@127.0.0.1:{PG_PORT}/{DATABASE}?" + "&".join(
            f"{k}={v}" for k, v in query.items()
        )

    def role_env(self) -> dict[str, str]:
        """The stream role's environment: its DSN and its password, the rest as the admin's."""
        return {
            **self.env,
            "ENGAGEMENT_PG_DSN": self.pg_dsn(ROLE),
            "ENGAGEMENT_PG_PASSWORD": self.passwords.pg_role,
        }

    def assert_no_secret(self, text: str, where: str) -> None:
        for secret in self.passwords.all():
            assert secret not in text, f"a password appears in {where}"


def _stack_env(pki: Pki, passwords: Passwords) -> dict[str, str]:
    return {
        "ENGAGEMENT_LOCAL_DIR": str(SEC_LOCAL),
        "ENGAGEMENT_PG_DSN": f"postgresql://postgres@127.0.0.1:{PG_PORT}/{DATABASE}"
        f"?sslmode=verify-full&sslrootcert={pki.ca}",
        "ENGAGEMENT_PG_PASSWORD": passwords.pg_admin,
        # The password in the URL: the form most likely to leak, so the one tested.
        "ENGAGEMENT_REDIS_URL": f"rediss://{REDIS_USER}:{passwords.redis}@127.0.0.1:{REDIS_PORT}/0",
        "ENGAGEMENT_REDIS_CA_FILE": str(pki.ca),
        "ENGAGEMENT_KAFKA_BOOTSTRAP": f"127.0.0.1:{KAFKA_PORT}",
        "ENGAGEMENT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "ENGAGEMENT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "ENGAGEMENT_KAFKA_SASL_USERNAME": KAFKA_USER,
        "ENGAGEMENT_KAFKA_SASL_PASSWORD": passwords.kafka,
        "ENGAGEMENT_KAFKA_SSL_CAFILE": str(pki.ca),
        "ENGAGEMENT_KAFKA_TOPIC_PREFIX": f"sec.{secrets.token_hex(4)}.",
        "ENGAGEMENT_LOCAL_TLS_CERT_FILE": str(pki.cert),
        "ENGAGEMENT_LOCAL_TLS_KEY_FILE": str(pki.key),
        "ENGAGEMENT_CLICKHOUSE_URL": f"chdb://{SEC_LOCAL / 'clickhouse'}",
        "ENGAGEMENT_CLICKHOUSE_HOLD_SECONDS": "1",
        "ENGAGEMENT_SLOT": "engagement_sec_slot",
        "ENGAGEMENT_PUBLICATION": PUBLICATION,
        "ENGAGEMENT_METRICS_DIR": str(SEC_LOCAL / "metrics"),
    }


def _private_services(settings: Settings) -> list[LocalPostgres | LocalRedis | LocalKafka]:
    return [LocalPostgres(settings), LocalRedis(settings), LocalKafka(settings)]


def _remove_private_data(settings: Settings) -> None:
    """Stop whatever an earlier, interrupted session left running here, and remove its data."""
    postgres, redis_service, kafka = _private_services(settings)
    for service in (kafka, redis_service, postgres):
        service.stop()
    assert SEC_LOCAL.parent == TEST_LOCAL, f"refusing to remove {SEC_LOCAL}"
    if postgres.home != SEC_LOCAL / "pg":  # as root the cluster lives under /var/lib
        assert "engagement-dagster" in str(postgres.home), postgres.home
        shutil.rmtree(postgres.home.parent, ignore_errors=True)
    shutil.rmtree(SEC_LOCAL, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """The private PostgreSQL, Redis and Kafka with TLS and authentication, this module's
    environment pointing at them (restored afterwards)."""
    passwords = Passwords(*(f"{secrets.token_hex(12)}" for _ in range(4)))
    with pytest.MonkeyPatch.context() as env:
        # Settings of the stack for the cleanup before the certificates exist.
        bare = Settings(
            local_dir=SEC_LOCAL,
            pg_dsn=f"postgresql://postgres@127.0.0.1:{PG_PORT}/{DATABASE}",
            redis_url=f"redis://127.0.0.1:{REDIS_PORT}/0",
            kafka_bootstrap=f"127.0.0.1:{KAFKA_PORT}",
        )
        _remove_private_data(bare)
        pki = make_pki(SEC_LOCAL / "tls")
        variables = _stack_env(pki, passwords)
        for name, value in variables.items():
            env.setenv(name, value)
        get_settings.cache_clear()
        settings = get_settings()
        shared_libs = TEST_LOCAL / "kafka" / "libs"  # the session Kafka's jars (same pom)
        kafka_libs = SEC_LOCAL / "kafka" / "libs"
        if (shared_libs / ".pom-sha1").exists():
            kafka_libs.parent.mkdir(parents=True, exist_ok=True)
            kafka_libs.symlink_to(shared_libs)
        started = []
        try:
            for service in _private_services(settings):
                service.start()
                started.append(service)
            yield Stack(pki, passwords, variables)
        finally:
            for service in reversed(started):
                service.stop()
            get_settings.cache_clear()
    get_settings.cache_clear()
    _remove_private_data(bare)


def engagement(
    *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "engagement"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env, "COLUMNS": "250"},
    )


@pytest.fixture(scope="module")
def role(stack: Stack) -> subprocess.CompletedProcess[str]:
    """`engagement db init --create-role` over TLS as the admin: schema, publication, slot and
    the stream's role, its password from ENGAGEMENT_PG_ROLE_PASSWORD."""
    done = engagement(
        "db",
        "init",
        "--create-role",
        ROLE,
        env={**stack.env, "ENGAGEMENT_PG_ROLE_PASSWORD": stack.passwords.pg_role},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def as_role(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process connects as the stream role for the test (then as the admin again)."""
    for name, value in stack.role_env().items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def _traffic(settings: Settings, seed: int) -> None:
    seed_content(settings.pg_dsn, 25, seed=seed)
    run_traffic(
        settings.pg_dsn,
        TrafficOptions(rate=150, duration_s=1.5, update_ratio=0.05, delete_ratio=0.02, seed=seed),
    )


# --- the pipeline through TLS and authentication ----------------------------------------------


def test_db_init_creates_a_role_with_only_what_the_stream_needs(
    stack: Stack, role: subprocess.CompletedProcess[str]
) -> None:
    assert f"role       {ROLE} created" in role.stdout, role.stdout
    stack.assert_no_secret(role.stdout + role.stderr, "the output of db init")
    with closing(pg_connect(stack.settings.pg_dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT rolcanlogin, rolreplication, rolsuper, rolcreatedb, rolcreaterole, "
            "rolbypassrls, rolinherit, rolpassword LIKE 'SCRAM-SHA-256$%%' "
            "FROM pg_authid WHERE rolname = %s",
            (ROLE,),
        )
        assert cur.fetchone() == (True, True, False, False, False, False, False, True)
        cur.execute(
            "SELECT t, p, has_table_privilege(%(role)s, t, p) FROM unnest(%(tables)s) t, "
            "unnest(%(privileges)s) p ORDER BY 1, 2",
            {
                "role": ROLE,
                "tables": ["content", "engagement_events"],
                "privileges": ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES"],
            },
        )
        granted = {(t, p) for t, p, has in cur.fetchall() if has}
        assert granted == {("content", "SELECT"), ("engagement_events", "SELECT")}
        cur.execute(
            "SELECT has_database_privilege(%s, current_database(), 'CONNECT'), "
            "has_database_privilege(%s, current_database(), 'CREATE'), "
            "has_schema_privilege(%s, 'public', 'CREATE'), "
            "EXISTS (SELECT 1 FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "         WHERE r.rolname = %s)",
            (ROLE, ROLE, ROLE, ROLE),
        )
        assert cur.fetchone() == (True, False, False, False)  # connects, creates and owns nothing

    again = engagement(
        "db",
        "init",
        "--create-role",
        ROLE,
        env={**stack.env, "ENGAGEMENT_PG_ROLE_PASSWORD": stack.passwords.pg_role},
    )
    assert again.returncode == 0 and f"role       {ROLE} reset" in again.stdout, again.stdout


def test_the_stream_runs_as_the_role_over_tls_and_every_sink_is_exact(
    stack: Stack, role: subprocess.CompletedProcess[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = stack.settings  # the admin writes the traffic and reads what to expect
    # The private cluster has its own LSNs: read every version of its own topics, not only those
    # above the shared cluster's epoch that earlier modules recorded.
    monkeypatch.setitem(support._EPOCH, "lsn", 0)
    _traffic(settings, seed=21)
    done = engagement("stream", "--until-caught-up", env=stack.role_env())
    assert done.returncode == 0 and "caught up=True" in done.stdout, done.stdout + done.stderr
    stack.assert_no_secret(done.stdout + done.stderr, "the stream's output")
    assert assert_clickhouse_matches_postgres(settings) > 0
    assert_redis_matches_postgres(settings)  # over rediss:// as the ACL user
    assert assert_kafka_matches_postgres(settings) > 0  # read_committed over SASL_SSL

    # The other producer library: kafka-python's transactions over SASL_SSL with SCRAM-SHA-512.
    _traffic(settings, seed=22)
    done = engagement(
        "stream",
        "--until-caught-up",
        env={**stack.role_env(), "ENGAGEMENT_KAFKA_CLIENT": "kafka-python"},
    )
    assert done.returncode == 0 and "caught up=True" in done.stdout, done.stdout + done.stderr
    assert_clickhouse_matches_postgres(settings)
    assert_kafka_matches_postgres(settings)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO engagement_events (event_type) VALUES ('play')",
        "UPDATE content SET title = 'changed'",
        "DELETE FROM engagement_events",
        "TRUNCATE engagement_events",
        "DROP TABLE content",
        "ALTER TABLE engagement_events REPLICA IDENTITY DEFAULT",
        "CREATE TABLE public.intruder (x int)",
        f"ALTER PUBLICATION {PUBLICATION} DROP TABLE content",
        f"DROP PUBLICATION {PUBLICATION}",
        "CREATE ROLE intruder",
        "CREATE DATABASE intruder",
    ],
)
def test_the_role_reads_but_cannot_change_anything(
    stack: Stack, role: subprocess.CompletedProcess[str], statement: str
) -> None:
    with closing(pg_connect(stack.pg_dsn(ROLE), password=stack.passwords.pg_role)) as conn:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM engagement_events")  # what the stream may do
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute(statement)


# --- no secret in logs, CLI output or Dagster ---------------------------------------------------


def _run_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Everything Dagster stored about a run: its config, tags and every event (log messages,
    materialization and failure metadata)."""
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return "\n".join([repr(run.run_config), repr(run.tags), *map(repr, instance.all_logs(run_id))])


def test_dagster_runs_and_logs_keep_every_secret_out(
    stack: Stack,
    role: subprocess.CompletedProcess[str],
    as_role: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from engagement_dagster.definitions import defs

    caplog.set_level(logging.DEBUG)
    admin = Settings(pg_dsn=stack.env["ENGAGEMENT_PG_DSN"])
    with pytest.MonkeyPatch.context() as env:  # the admin writes the traffic
        env.setenv("ENGAGEMENT_PG_PASSWORD", stack.passwords.pg_admin)
        get_settings.cache_clear()
        _traffic(admin, seed=23)
    get_settings.cache_clear()
    config = {"linger_seconds": 0, "run_seconds": 90, "report_every_s": 30}
    with dg.instance_for_test() as instance:
        stream = defs.resolve_job_def("cdc_stream").execute_in_process(
            run_config={"ops": {"engagement_stream": {"config": config}}}, instance=instance
        )
        health = defs.resolve_job_def("health_check").execute_in_process(instance=instance)
        assert stream.success and health.success
        stream_text = _run_text(instance, stream.run_id)
        health_text = _run_text(instance, health.run_id)
    assert "rows" in stream_text and "TLS" in health_text  # the text holds what was reported
    stack.assert_no_secret(stream_text, "the cdc_stream run's events and metadata")
    stack.assert_no_secret(health_text, "the health_check run's events")
    stack.assert_no_secret(caplog.text, "the log records of this process")


def test_a_failed_health_check_names_the_problem_without_the_password(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engagement_dagster.definitions import defs

    wrong = secrets.token_hex(12)
    monkeypatch.setenv(
        "ENGAGEMENT_REDIS_URL", f"rediss://{REDIS_USER}:{wrong}@127.0.0.1:{REDIS_PORT}/0"
    )
    get_settings.cache_clear()
    try:
        with dg.instance_for_test() as instance:
            result = defs.resolve_job_def("health_check").execute_in_process(
                instance=instance, raise_on_error=False
            )
            text = _run_text(instance, result.run_id)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert not result.success
    assert "unhealthy: redis" in text and "refused the user or password" in text
    assert wrong not in text
    stack.assert_no_secret(text, "the failed health_check run")


# --- wrong credentials, no TLS, wrong CA: clear refusals ----------------------------------------

WRONG = "wrong-" + secrets.token_hex(8)


def _refusals(stack: Stack) -> dict[str, tuple[str, dict[str, str], str]]:
    """case → (system, environment changes, what the health detail must say)."""
    pki = stack.pki
    redis_url = f"{REDIS_USER}:{stack.passwords.redis}@127.0.0.1:{REDIS_PORT}/0"
    return {
        "postgres wrong password": (
            "postgres",
            {"ENGAGEMENT_PG_PASSWORD": WRONG},
            "wrong password for user postgres",
        ),
        "postgres without TLS": (
            "postgres",
            {"ENGAGEMENT_PG_DSN": stack.pg_dsn(sslmode="disable")},
            "refuses connections without TLS: add sslmode=verify-full",
        ),
        "postgres wrong CA": (
            "postgres",
            {"ENGAGEMENT_PG_DSN": stack.pg_dsn(sslrootcert=str(pki.other_ca))},
            "not signed by the CA in sslrootcert",
        ),
        "redis wrong password": (
            "redis",
            {"ENGAGEMENT_REDIS_URL": f"rediss://{REDIS_USER}:{WRONG}@127.0.0.1:{REDIS_PORT}/0"},
            "refused the user or password",
        ),
        "redis without TLS": (
            "redis",
            {"ENGAGEMENT_REDIS_URL": f"redis://{redis_url}", "ENGAGEMENT_REDIS_CA_FILE": ""},
            "speaks TLS only: use rediss://",
        ),
        "redis wrong CA": (
            "redis",
            {"ENGAGEMENT_REDIS_CA_FILE": str(pki.other_ca)},
            "not signed by the configured CA",
        ),
        "kafka wrong password": (
            "kafka",
            {"ENGAGEMENT_KAFKA_SASL_PASSWORD": WRONG},
            f"refused SASL user '{KAFKA_USER}'",
        ),
        "kafka without TLS": (
            "kafka",
            {
                "ENGAGEMENT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "ENGAGEMENT_KAFKA_SSL_CAFILE": "",
            },
            "speaks TLS only",
        ),
        "kafka wrong CA": (
            "kafka",
            {"ENGAGEMENT_KAFKA_SSL_CAFILE": str(pki.other_ca)},
            "does not verify against ENGAGEMENT_KAFKA_SSL_CAFILE",
        ),
    }


REFUSALS = [
    "postgres wrong password", "postgres without TLS", "postgres wrong CA",
    "redis wrong password", "redis without TLS", "redis wrong CA",
    "kafka wrong password", "kafka without TLS", "kafka wrong CA",
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_connection_says_what_is_wrong(
    stack: Stack, role: subprocess.CompletedProcess[str], case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    system, changes, expected = _refusals(stack)[case]
    for name, value in changes.items():
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    try:
        results = {h.system: h for h in all_health(get_settings())}
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert not results[system].healthy
    assert expected in results[system].detail, results[system].detail
    assert [name for name, h in results.items() if not h.healthy] == [system]
    for health in results.values():
        assert WRONG not in health.detail
        stack.assert_no_secret(health.detail, f"the {health.system} health detail")


def test_services_status_and_db_init_report_a_wrong_password(
    stack: Stack, role: subprocess.CompletedProcess[str]
) -> None:
    env = {**stack.env, "ENGAGEMENT_PG_PASSWORD": WRONG}
    status = engagement("services", "status", env=env)
    assert status.returncode == 1
    assert "wrong password for user postgres" in status.stdout, status.stdout
    assert "check ENGAGEMENT_PG_PASSWORD" in status.stdout
    init = engagement("db", "init", env=env)
    assert init.returncode == 1
    assert "wrong password for user postgres" in init.stdout, init.stdout + init.stderr
    assert "Traceback" not in init.stderr
    for output in (status.stdout + status.stderr, init.stdout + init.stderr):
        assert WRONG not in output
        stack.assert_no_secret(output, "the CLI's output")

    healthy = engagement("services", "status", env=stack.env)
    assert healthy.returncode == 0, healthy.stdout
    assert "TLS TLSv1" in healthy.stdout and "(SASL_SSL)" in healthy.stdout
    assert f"rediss://{REDIS_USER}:***@" in healthy.stdout  # the URL, its password masked
    stack.assert_no_secret(healthy.stdout + healthy.stderr, "services status")


def test_the_local_services_refuse_plain_connections_and_keep_no_password_in_clear(
    stack: Stack,
) -> None:
    """Redis and both Kafka listeners speak TLS from the first byte (PostgreSQL negotiates it
    in its protocol: its pg_hba.conf has no line for a connection without it), and the files the
    services were configured with hold no client password (the broker's own inter-broker
    secret aside, mode 0600)."""
    import socket

    for port in (REDIS_PORT, KAFKA_PORT, KAFKA_PORT + 1):
        context = ssl.create_default_context(cafile=str(stack.pki.ca))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}, port
    settings = stack.settings
    postgres, redis_service, kafka = (
        LocalPostgres(settings), LocalRedis(settings), LocalKafka(settings)
    )  # fmt: skip
    hba = (postgres.data / "pg_hba.conf").read_text()
    assert "hostssl" in hba and "\nhost " not in hba and "trust" not in hba
    for path in [
        postgres.data / "engagement.conf",
        postgres.data / "pg_hba.conf",
        redis_service.home / "redis.conf",
        kafka.home / "server.properties",
    ]:
        stack.assert_no_secret(path.read_text(), str(path))
    assert (kafka.home / "server.properties").stat().st_mode & 0o077 == 0
    assert kafka.broker_secret.stat().st_mode & 0o077 == 0


# --- ClickHouse over https: what the client sends ----------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []  # noqa: RUF012 - shared by the handler instances

    def do_POST(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _answer(self) -> None:
        _Recorder.seen.append(dict(self.headers))
        body = b"Code: 516. DB::Exception: recorded by the test. (AUTHENTICATION_FAILED)"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def https_endpoint(stack: Stack) -> Iterator[int]:
    """A TLS endpoint with the stack's server certificate that records request headers."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(stack.pki.cert, stack.pki.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen.clear()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_clickhouse_https_verifies_the_server_and_sends_the_credentials(
    stack: Stack, https_endpoint: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ClickHouse server runs here, so the client is pointed at a TLS endpoint that answers
    every query with an error: it must have verified the certificate with the configured CA and
    sent the configured user and password."""
    from engagement_dagster.lib.clickhouse import clickhouse_client

    password = secrets.token_hex(12)
    monkeypatch.setenv("ENGAGEMENT_CLICKHOUSE_USER", "analyst")
    monkeypatch.setenv("ENGAGEMENT_CLICKHOUSE_PASSWORD", password)
    monkeypatch.setenv("ENGAGEMENT_CLICKHOUSE_URL", f"https://127.0.0.1:{https_endpoint}")
    monkeypatch.setenv("ENGAGEMENT_CLICKHOUSE_CA_FILE", str(stack.pki.ca))
    get_settings.cache_clear()
    try:
        dsn = get_settings().clickhouse_dsn
        with pytest.raises(Exception, match="recorded by the test"), clickhouse_client(dsn):
            pass
        assert _Recorder.seen, "the client sent no request"
        auth = _Recorder.seen[0].get("Authorization", "")
        assert base64.b64decode(auth.removeprefix("Basic ")).decode() == f"analyst:{password}"

        _Recorder.seen.clear()
        monkeypatch.setenv("ENGAGEMENT_CLICKHOUSE_CA_FILE", str(stack.pki.other_ca))
        get_settings.cache_clear()
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"), clickhouse_client(dsn):
            pass
        assert not _Recorder.seen, "credentials went to a server the CA does not vouch for"
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
