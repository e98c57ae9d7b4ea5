"""How every process connects to PostgreSQL, Redis and a ClickHouse server with the TLS and
credentials of Settings, explains a refused connection, and keeps secrets out of text.

Nothing here may log, print or put a secret into an exception message: explanations name the
variable to fix, never its value. Kafka's client settings live in lib/kafka_config.py.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload
from urllib.parse import parse_qs, urlsplit

import psycopg2
import psycopg2.extensions
import redis

from engagement_dagster.lib.settings import Settings, get_settings

REDACTED = "***"

# scheme://user:password@ (the user may be empty); key=value forms of libpq DSNs and of query
# strings, quoted or not.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<secret>[^@\s/]+)@")
_KEY_PASSWORD = re.compile(
    r"(?P<head>\b(?:password|sasl\.password|sasl_plain_password)\s*=\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'|[^\s&;]+)",
    re.IGNORECASE,
)


def _secrets(settings: Settings) -> list[str]:
    """The secret values this process was configured with (to scrub them from any text)."""
    values = [
        settings.pg_password,
        settings.pg_role_password,
        settings.redis_password,
        settings.clickhouse_password,
        settings.kafka_sasl_password,
    ]
    found = [v.get_secret_value() for v in values if v is not None]
    for url in (settings.pg_dsn, settings.redis_url, settings.clickhouse_url):
        found.extend(_embedded_passwords(url))
    return [s for s in found if len(s) >= 3]  # scrubbing "a" would mangle every text


def _embedded_passwords(url: str) -> list[str]:
    found = [m.group("secret") for m in _URL_PASSWORD.finditer(url)]
    found.extend(m.group("secret").strip("'") for m in _KEY_PASSWORD.finditer(url))
    return found


def redact(text: str, settings: Settings | None = None) -> str:
    """`text` (a URL, a DSN, an error message) without any password: the passwords of URLs and
    key=value pairs become ***, and so does every secret value of `settings` (default: the
    process's) wherever it appears. Use it on anything that reaches a log, a screen or Dagster."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)
    text = _KEY_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    try:
        secrets = _secrets(settings or get_settings())
    except ValueError:  # invalid settings: the URL patterns above still applied
        secrets = []
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class ConnectionConfigError(ValueError):
    """The configured TLS or credential files are unusable; the message names the variable."""


def _existing_file(path: Path | str, variable: str) -> str:
    if not Path(path).is_file():
        raise ConnectionConfigError(f"{variable}={path} does not exist or is not a file")
    return str(path)


# --- PostgreSQL -------------------------------------------------------------------------------


class PostgresConnectError(psycopg2.OperationalError):
    """PostgreSQL refused or failed the connection; the message says what is wrong and which
    setting to fix. A psycopg2.OperationalError, so existing handlers still catch it."""


_Connection = TypeVar("_Connection", bound=psycopg2.extensions.connection)


@overload
def pg_connect(
    dsn: str,
    *,
    connection_factory: Callable[..., _Connection],
    settings: Settings | None = None,
    **kwargs: Any,
) -> _Connection: ...


@overload
def pg_connect(
    dsn: str, *, settings: Settings | None = None, **kwargs: Any
) -> psycopg2.extensions.connection: ...


def pg_connect(
    dsn: str, *, settings: Settings | None = None, **kwargs: Any
) -> psycopg2.extensions.connection:
    """Every PostgreSQL connection of the project, replication connections included
    (connection_factory=...): the DSN's TLS parameters (sslmode, sslrootcert, ...) as given, the
    password from the DSN, else ENGAGEMENT_PG_PASSWORD, else libpq's PGPASSFILE / ~/.pgpass."""
    if "password" not in kwargs and "password" not in psycopg2.extensions.parse_dsn(dsn):
        secret = (settings or get_settings()).pg_password
        if secret is not None:
            kwargs["password"] = secret.get_secret_value()
    try:
        return psycopg2.connect(dsn, **kwargs)
    except psycopg2.OperationalError as exc:
        raise PostgresConnectError(explain_pg_error(exc, dsn)) from exc


# (pattern in libpq's or the server's message, what it means and what to do)
_PG_EXPLANATIONS: tuple[tuple[str, str], ...] = (
    (
        "password authentication failed",
        "wrong password for user {user}: check ENGAGEMENT_PG_PASSWORD (or the DSN's password, "
        "or the PGPASSFILE entry)",
    ),
    (
        "no password supplied",
        "the server wants a password for user {user} and none is configured: set "
        "ENGAGEMENT_PG_PASSWORD (or PGPASSFILE)",
    ),
    (
        "no encryption",
        "the server refuses connections without TLS: add sslmode=verify-full "
        "sslrootcert=<CA file> to ENGAGEMENT_PG_DSN",
    ),
    (
        "certificate verify failed",
        "the server's certificate is not signed by the CA in sslrootcert ({sslrootcert}): point "
        "sslrootcert in ENGAGEMENT_PG_DSN at the CA that signed it",
    ),
    (
        "does not match host name",
        "the server's certificate is not for host {host}: connect by a name or address the "
        "certificate holds",
    ),
    (
        "root certificate file",
        "sslmode={sslmode} verifies the server but the CA file is missing: set sslrootcert in "
        "ENGAGEMENT_PG_DSN to the CA's PEM file",
    ),
    (
        "server does not support SSL",
        "the DSN requires TLS (sslmode={sslmode}) but the server does not offer it: turn ssl on "
        "at the server",
    ),
    (
        "to start walsender",
        "user {user} may not open a replication connection: it needs the REPLICATION attribute "
        "(engagement db init --create-role makes such a role)",
    ),
    (
        "permission denied for database",
        "user {user} lacks CONNECT on the database (engagement db init --create-role grants it)",
    ),
    (
        "Connection refused",
        "nothing listens at {host}:{port}: start it (make services) or fix ENGAGEMENT_PG_DSN",
    ),
)


def explain_pg_error(exc: BaseException, dsn: str) -> str:
    """One line: where, what failed (the server's own words), and the fix when we know it."""
    params = psycopg2.extensions.parse_dsn(dsn)
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # libpq: 'connection to server at "h" (addr), port p failed: FATAL:  <reason>'
    reason = " ".join(lines) if lines else type(exc).__name__
    reason = re.sub(r"^connection to server at [^:]*failed:\s*", "", reason)
    fields = {
        "user": params.get("user", "(default)"),
        "host": params.get("host", "localhost"),
        "port": params.get("port", "5432"),
        "sslmode": params.get("sslmode", "prefer"),
        "sslrootcert": params.get("sslrootcert", "~/.postgresql/root.crt"),
    }
    where = f"PostgreSQL at {fields['host']}:{fields['port']} (user {fields['user']})"
    for pattern, explanation in _PG_EXPLANATIONS:
        if pattern in reason:
            return redact(f"{where}: {explanation.format(**fields)} [{reason}]")
    return redact(f"{where}: {reason}")


def pg_tls_summary(conn: psycopg2.extensions.connection) -> str:
    """'TLS TLSv1.3, sslmode=verify-full' or 'no TLS' for an open connection."""
    info = conn.info
    sslmode = conn.get_dsn_parameters().get("sslmode", "prefer")
    if not info.ssl_in_use:
        return f"no TLS (sslmode={sslmode})"
    return f"TLS {info.ssl_attribute('protocol')}, sslmode={sslmode}"


# --- Redis ------------------------------------------------------------------------------------


def redis_client(url: str, *, settings: Settings | None = None, **kwargs: Any) -> redis.Redis:
    """Every Redis client of the project. rediss:// verifies the server's certificate and host
    name against ENGAGEMENT_REDIS_CA_FILE (or the URL's ssl_ca_certs); the ACL user and password
    come from the URL, else ENGAGEMENT_REDIS_USERNAME and ENGAGEMENT_REDIS_PASSWORD. Query
    parameters of the URL win over these defaults."""
    s = settings or get_settings()
    parsed = urlsplit(url)
    options: dict[str, Any] = {}
    if parsed.scheme == "rediss":
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = True
        if s.redis_ca_file is not None and "ssl_ca_certs" not in parse_qs(parsed.query):
            options["ssl_ca_certs"] = _existing_file(s.redis_ca_file, "ENGAGEMENT_REDIS_CA_FILE")
    if parsed.password is None and s.redis_password is not None:
        options["password"] = s.redis_password.get_secret_value()
    if not parsed.username and s.redis_username is not None:
        options["username"] = s.redis_username
    return redis.Redis.from_url(url, **{**options, **kwargs})


def explain_redis_error(exc: BaseException, url: str, settings: Settings | None = None) -> str:
    """What a Redis failure means for this URL, with the setting to fix."""
    parsed = urlsplit(url)
    host, port = parsed.hostname or "localhost", parsed.port or 6379
    where = f"Redis at {redact(url, settings)}"
    message = str(exc) or type(exc).__name__
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in message:
        if any(m in message for m in ("required", "NOAUTH", "already authenticated")):
            why = (
                "the server requires a user and password: put them in ENGAGEMENT_REDIS_URL "
                "(user:password@ before the host) or ENGAGEMENT_REDIS_USERNAME/_PASSWORD"
            )
        else:
            why = (
                "the server refused the user or password: check the URL's credentials (or "
                "ENGAGEMENT_REDIS_USERNAME/_PASSWORD)"
            )
    elif "NOPERM" in message:
        why = "the ACL user lacks a permission the platform needs (the key pattern engagement:*)"
    elif "without any password configured" in message:
        why = "a password is configured here but the server has none for this user"
    elif "CERTIFICATE_VERIFY_FAILED" in message:
        why = (
            "the server's certificate is not signed by the configured CA "
            "(ENGAGEMENT_REDIS_CA_FILE or ssl_ca_certs)"
            if "Hostname mismatch" not in message and "IP address mismatch" not in message
            else f"the server's certificate is not for {host}"
        )
    elif parsed.scheme == "rediss" and _speaks_tls(host, port) is False:
        why = "the server does not speak TLS on this port: use redis:// or enable TLS on it"
    elif parsed.scheme != "rediss" and _speaks_tls(host, port):
        why = "the server speaks TLS only: use rediss:// (and ENGAGEMENT_REDIS_CA_FILE)"
    elif "Connection refused" in message:
        why = "nothing listens there: start it (make services) or fix ENGAGEMENT_REDIS_URL"
    else:
        why = "cannot connect or read"
    return redact(f"{where}: {why} [{message}]", settings)


# --- TLS diagnosis (Redis, Kafka) -------------------------------------------------------------


def _speaks_tls(host: str, port: int, timeout_s: float = 3.0) -> bool | None:
    """Whether the server at host:port completes a TLS handshake (certificate not checked);
    None when nothing answers."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    try:
        with context.wrap_socket(raw, server_hostname=host):
            return True
    except OSError:  # ssl.SSLError, a reset or a timeout: a plain server does not answer TLS
        return False
    finally:
        raw.close()


def tls_problem(host: str, port: int, *, cafile: Path | None, expect_tls: bool) -> str | None:
    """Why a TLS client configured like this cannot talk to host:port, or None when the
    transport is fine (a remaining failure is then about credentials or the service itself)."""
    speaks = _speaks_tls(host, port)
    if speaks is None:
        return f"nothing answers at {host}:{port}"
    if not expect_tls:
        return f"{host}:{port} speaks TLS only" if speaks else None
    if not speaks:
        return f"{host}:{port} does not speak TLS"
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    try:
        with (
            socket.create_connection((host, port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        ca = f"the CA in {cafile}" if cafile else "the system's CAs"
        return (
            f"the certificate of {host}:{port} does not verify against {ca}: {exc.verify_message}"
        )
    except (OSError, ssl.SSLError) as exc:
        return f"TLS with {host}:{port} failed: {exc}"


# --- Kafka ------------------------------------------------------------------------------------


def explain_kafka_errors(settings: Settings, errors: list[str]) -> str:
    """What the client errors of a failed Kafka connection mean, with the setting to fix; the
    transport (TLS or not, the CA) is probed directly, since clients report a broker that speaks
    TLS to a plain client only as a transport failure."""
    first = settings.kafka_bootstrap.split(",")[0]
    host, _, port = first.rpartition(":")
    seen = " | ".join(dict.fromkeys(errors)) or "no answer"
    protocol = settings.kafka_security_protocol
    if "Authentication failed" in seen or "_AUTHENTICATION" in seen:
        why = (
            f"the broker refused SASL user {settings.kafka_sasl_username!r} "
            f"({settings.kafka_sasl_mechanism}): check ENGAGEMENT_KAFKA_SASL_USERNAME and "
            "ENGAGEMENT_KAFKA_SASL_PASSWORD"
        )
    elif "certificate verify failed" in seen:
        why = (
            "the broker's certificate does not verify against ENGAGEMENT_KAFKA_SSL_CAFILE "
            f"({settings.kafka_ssl_cafile}): point it at the CA that signed the broker's "
            "certificate"
        )
    else:
        problem = tls_problem(
            host or "localhost",
            int(port),
            cafile=settings.kafka_ssl_cafile,
            expect_tls=protocol.endswith("SSL"),
        )
        if problem is None:
            why = "the broker does not answer as expected"
        elif problem.startswith("nothing answers"):
            why = f"{problem}: start it (make services) or fix ENGAGEMENT_KAFKA_BOOTSTRAP"
        elif "speaks TLS only" in problem:
            why = (
                f"{problem} (ENGAGEMENT_KAFKA_SECURITY_PROTOCOL={protocol}): use SASL_SSL or SSL "
                "with ENGAGEMENT_KAFKA_SSL_CAFILE"
            )
        elif "does not speak TLS" in problem:
            why = f"{problem} but ENGAGEMENT_KAFKA_SECURITY_PROTOCOL={protocol} expects it"
        else:
            why = f"{problem}: fix ENGAGEMENT_KAFKA_SSL_CAFILE"
    return redact(f"Kafka at {settings.kafka_bootstrap}: {why} [{seen}]", settings)


# --- ClickHouse server ------------------------------------------------------------------------


def clickhouse_server_args(dsn: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments of clickhouse_connect.get_client for a ClickHouse server URL: https://
    means TLS with the certificate verified (ENGAGEMENT_CLICKHOUSE_VERIFY) against
    ENGAGEMENT_CLICKHOUSE_CA_FILE; user and password from the URL, else ENGAGEMENT_CLICKHOUSE_USER
    and ENGAGEMENT_CLICKHOUSE_PASSWORD."""
    s = settings or get_settings()
    parsed = urlsplit(dsn)
    args: dict[str, Any] = {"dsn": dsn}
    if parsed.scheme == "https":
        args["secure"] = True
        args["verify"] = s.clickhouse_verify
        if s.clickhouse_ca_file is not None:
            args["ca_cert"] = _existing_file(s.clickhouse_ca_file, "ENGAGEMENT_CLICKHOUSE_CA_FILE")
    if not parsed.username and s.clickhouse_user:
        args["username"] = s.clickhouse_user
    if parsed.password is None and s.clickhouse_password is not None:
        args["password"] = s.clickhouse_password.get_secret_value()
    return args
