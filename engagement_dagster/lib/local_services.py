"""Private local services for development and tests: PostgreSQL, Redis and Kafka (KRaft).

Each binds to 127.0.0.1 on the port of its configured URL and keeps its data under
`.local/`. This module starts and stops processes only; it never touches a service whose URL
points anywhere but loopback, and it never deletes data.

Security follows the same settings the clients use: a DSN with sslmode=require/verify-*, a
rediss:// URL or a Kafka protocol SSL/SASL_SSL turns TLS on (with ENGAGEMENT_LOCAL_TLS_CERT_FILE
and _KEY_FILE) and plain connections off; a configured password turns authentication on (SCRAM
for PostgreSQL and Kafka, an ACL user for Redis, the default user disabled). No secret is
written to disk in clear except the Kafka broker's own inter-broker password (mode 0600).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg2.extensions

from engagement_dagster.lib.settings import PROJECT_ROOT, Settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KAFKA_POM = PROJECT_ROOT / "deploy" / "kafka" / "pom.xml"
KAFKA_LOG4J = PROJECT_ROOT / "deploy" / "kafka" / "log4j2.yaml"


class ServiceError(RuntimeError):
    """A local service could not start or stop; the message names the fix."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def is_local(self) -> bool:
        return self.host in LOOPBACK


@dataclass(frozen=True)
class StartResult:
    name: str
    started: bool  # False when it was already running
    detail: str


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for(
    condition: Callable[[], bool], *, timeout_s: float, what: str, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise ServiceError(f"{what} not ready after {timeout_s:.0f}s{_log_tail(log)}")


def _log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log}:\n  " + "\n  ".join(tail)


def _run(cmd: list[str], *, what: str, log: Path | None = None, **kwargs: object) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise ServiceError(f"{what}: {exc.filename} not found; run `make install`") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise ServiceError(f"{what} failed ({' '.join(cmd)}):\n  {output}{_log_tail(log)}")
    return str(done.stdout)


def _pid_alive(pid_file: Path, needle: str) -> int | None:
    """The pid in pid_file when that process is alive and its command line contains needle."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):
        return None
    return pid if needle in cmdline else None


def _alive(pid: int) -> bool:
    """Whether pid runs. A child of this process that exited is reaped here: until then it is a
    zombie, which signal 0 still reaches (a broker started and stopped by one process, as in
    the tests, would otherwise look alive until the SIGKILL timeout)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child (or already reaped)
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, OSError, IndexError):
        return False
    return state != "Z"


def _terminate(pid: int, *, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _server_tls_files(settings: Settings, service: str, wanted_by: str) -> tuple[Path, Path]:
    """The server certificate and key of a local service whose clients ask for TLS."""
    cert, key = settings.local_tls_cert_file, settings.local_tls_key_file
    if cert is None or key is None:
        raise ServiceError(
            f"{wanted_by} asks the local {service} for TLS but it has no certificate: set "
            "ENGAGEMENT_LOCAL_TLS_CERT_FILE and ENGAGEMENT_LOCAL_TLS_KEY_FILE (PEM)"
        )
    for path, variable in ((cert, "CERT_FILE"), (key, "KEY_FILE")):
        if not path.is_file():
            raise ServiceError(f"ENGAGEMENT_LOCAL_TLS_{variable}={path} does not exist")
    return cert, key


def _install_private(source: Path, target: Path, *, owner: str | None) -> Path:
    """Copy a certificate or key next to the service's data, readable by its owner only."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o600)
    if owner is not None:
        shutil.chown(target.parent, owner)
        shutil.chown(target, owner)
    return target


class LocalPostgres:
    """A PostgreSQL cluster of our own (initdb), with wal_level=logical.

    With TLS (the DSN's sslmode is require, verify-ca or verify-full) it accepts TCP connections
    only over TLS (`hostssl` lines alone in pg_hba.conf); with a password (in the DSN or
    ENGAGEMENT_PG_PASSWORD) only SCRAM-SHA-256. The password is set at initdb, so a cluster
    created without one refuses to switch (ServiceError with the fix).
    """

    name = "postgres"

    def __init__(self, settings: Settings) -> None:
        params = psycopg2.extensions.parse_dsn(settings.pg_dsn)
        self.endpoint = Endpoint(params.get("host", "127.0.0.1"), int(params.get("port", 5432)))
        self.superuser = params.get("user", "postgres")
        self.link = settings.local_dir / "pg"
        self.home = self._home(settings.local_dir)
        self.data = self.home / "data"
        self.run_dir = self.home / "run"
        self.log = self.home / "postgres.log"
        self.as_root = os.geteuid() == 0
        self.tls = params.get("sslmode") in {"require", "verify-ca", "verify-full"}
        password = params.get("password") or (
            settings.pg_password.get_secret_value() if settings.pg_password else None
        )
        self._password = password
        self._settings = settings
        self.auth_stamp = self.home / "auth-scram"  # written when initdb set a password

    def _home(self, local_dir: Path) -> Path:
        # PostgreSQL refuses to run as root. As root we run it as the `postgres` system user,
        # which may not be able to reach a checkout under a private directory (mktemp -d is
        # 0700), so its files live under /var/lib, keyed by the checkout, with a link in .local.
        if os.geteuid() != 0:
            return local_dir / "pg"
        key = hashlib.sha1(str(local_dir.resolve()).encode()).hexdigest()[:12]
        return Path("/var/lib/engagement-dagster") / key / "pg"

    def _bin(self, tool: str) -> str:
        candidates = sorted(
            Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"),
            key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
        )
        if candidates:
            return str(candidates[-1])
        found = shutil.which(tool)
        if found is None:
            raise ServiceError(
                f"PostgreSQL server tool {tool!r} not found. "
                "Fix: apt-get install -y postgresql (or run `make install`)"
            )
        return found

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if self.as_root else cmd

    def is_running(self) -> bool:
        return port_open(self.endpoint.host, self.endpoint.port)

    def start(self) -> StartResult:
        if self.is_running():
            return StartResult(self.name, False, f"already listening on {self._where}")
        self.home.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        if self.as_root:
            shutil.chown(self.home.parent, "postgres")
            shutil.chown(self.home, "postgres")
            shutil.chown(self.run_dir, "postgres")
            self.link.parent.mkdir(parents=True, exist_ok=True)
            if not self.link.exists():
                self.link.symlink_to(self.home)
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        elif self._password is not None and not self.auth_stamp.exists():
            raise ServiceError(
                f"the PostgreSQL cluster in {self.data} was created without a password, but one "
                f"is configured for {self.superuser}. Fix: set it while the cluster trusts local "
                f"connections (ALTER ROLE {self.superuser} PASSWORD ...), then touch "
                f"{self.auth_stamp}; or remove the cluster's directory to start afresh"
            )
        self._write_conf()
        self._write_hba()
        _run(
            self._as_owner(
                [
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            what="pg_ctl start",
            log=self.log,
        )
        wait_for(self.is_running, timeout_s=30, what="PostgreSQL", log=self.log)
        return StartResult(self.name, True, f"started on {self._where} (data {self.data})")

    def _initdb(self) -> None:
        owner = "postgres" if self.as_root else None
        auth = ["--auth=trust"]
        pwfile = self.home / "initdb.pw"
        if self._password is not None:
            # initdb reads the superuser's password from a file (never a command line), which
            # lives only while it runs.
            pwfile.unlink(missing_ok=True)
            with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(self._password)
            if owner is not None:
                shutil.chown(pwfile, owner)
            auth = ["--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            _run(
                self._as_owner(
                    [
                        self._bin("initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        self.superuser,
                        *auth,
                        "--encoding=UTF8",
                        "--locale=C.UTF-8",
                        "--no-instructions",
                    ]
                ),
                what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'engagement.conf'\n")
        if self._password is not None:
            self.auth_stamp.write_text("scram-sha-256\n")

    def _write_hba(self) -> None:
        """pg_hba.conf when TLS or a password is configured (else initdb's trust file stays):
        TLS leaves only `hostssl` lines, so a connection without TLS finds no entry."""
        if not self.tls and self._password is None:
            return
        method = "scram-sha-256" if self._password is not None else "trust"
        host = "hostssl" if self.tls else "host"
        lines = [
            "# Written by `engagement services up` at every start; edit the code, not this file.",
            f"local all all {method}",
            f"local replication all {method}",
        ]
        for address in ("127.0.0.1/32", "::1/128"):
            lines += [
                f"{host} all all {address} {method}",
                f"{host} replication all {address} {method}",
            ]
        hba = self.data / "pg_hba.conf"
        hba.write_text("\n".join(lines) + "\n")
        if self.as_root:
            shutil.chown(hba, "postgres")

    def _tls_conf(self) -> str:
        if not self.tls:
            return ""
        files = _server_tls_files(self._settings, "PostgreSQL", "ENGAGEMENT_PG_DSN (sslmode)")
        owner = "postgres" if self.as_root else None
        cert = _install_private(files[0], self.home / "tls" / "server.crt", owner=owner)
        key = _install_private(files[1], self.home / "tls" / "server.key", owner=owner)
        return (
            "ssl = on\n"
            f"ssl_cert_file = '{cert}'\n"
            f"ssl_key_file = '{key}'\n"
            "ssl_min_protocol_version = 'TLSv1.2'\n"
        )

    def _write_conf(self) -> None:
        conf = self.data / "engagement.conf"
        auth = "password_encryption = 'scram-sha-256'\n" if self._password is not None else ""
        conf.write_text(
            "# Written by `engagement services up` at every start; edit the code, not this file.\n"
            f"listen_addresses = '{self.endpoint.host}'\n"
            f"port = {self.endpoint.port}\n"
            f"unix_socket_directories = '{self.run_dir}'\n"
            "wal_level = logical\n"
            "max_wal_senders = 10\n"
            "max_replication_slots = 10\n"
            "wal_sender_timeout = 60s\n"
            # Asynchronous commits (the generator's) reach logical decoding once the WAL writer
            # flushes them: every 10 ms instead of the default 200 ms, for honest latency.
            "wal_writer_delay = 10ms\n"
            "shared_buffers = 256MB\n"
            "max_connections = 200\n"
            "log_min_messages = warning\n" + self._tls_conf() + auth
        )
        if self.as_root:
            shutil.chown(conf, "postgres")

    def stop(self) -> bool:
        if not (self.data / "postmaster.pid").exists():
            return False
        _run(
            self._as_owner([self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
            what="pg_ctl stop",
            log=self.log,
        )
        return True

    @property
    def _where(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"


# What the platform's ACL user may do: every command on its own keys (engagement:*) except
# the dangerous ones (FLUSHALL, KEYS, CONFIG, DEBUG, SHUTDOWN, ACL changes, ...), plus INFO for
# the health check.
REDIS_ACL_RULES = "~engagement:* resetchannels +@all -@dangerous +info"


class LocalRedis:
    """A Redis server of our own, append-only file on (everysec).

    rediss:// turns the plain port off and serves TLS only; a password (URL or
    ENGAGEMENT_REDIS_PASSWORD) disables the default user and creates the ACL user with
    REDIS_ACL_RULES and the password's SHA-256 (never the password itself) in redis.conf.
    """

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        url = urlsplit(settings.redis_url)
        self.endpoint = Endpoint(url.hostname or "127.0.0.1", url.port or 6379)
        self.home = settings.local_dir / "redis"
        self.pid_file = self.home / "redis.pid"
        self.log = self.home / "redis.log"
        self.tls = url.scheme == "rediss"
        self._settings = settings
        self._ca_file = settings.redis_ca_file
        password = unquote(url.password) if url.password is not None else None
        if password is None and settings.redis_password is not None:
            password = settings.redis_password.get_secret_value()
        self._password = password
        self._username = unquote(url.username) if url.username else settings.redis_username

    def _security_conf(self) -> str:
        lines = []
        if self.tls:
            files = _server_tls_files(self._settings, "Redis", "ENGAGEMENT_REDIS_URL (rediss://)")
            cert = _install_private(files[0], self.home / "tls" / "server.crt", owner=None)
            key = _install_private(files[1], self.home / "tls" / "server.key", owner=None)
            # Redis wants a CA even when clients present no certificate (tls-auth-clients no).
            ca = self._ca_file or files[0]
            lines += [
                "port 0",
                f"tls-port {self.endpoint.port}",
                f"tls-cert-file {cert}",
                f"tls-key-file {key}",
                f"tls-ca-cert-file {ca}",
                "tls-auth-clients no",
                'tls-protocols "TLSv1.2 TLSv1.3"',
            ]
        if self._password is not None:
            digest = hashlib.sha256(self._password.encode()).hexdigest()
            if self._username and self._username != "default":
                lines += [
                    "user default off",
                    f"user {self._username} on #{digest} {REDIS_ACL_RULES}",
                ]
            else:
                lines.append(f"user default on #{digest} ~* &* +@all")
        return "".join(f"{line}\n" for line in lines)

    def is_running(self) -> bool:
        return port_open(self.endpoint.host, self.endpoint.port)

    def start(self) -> StartResult:
        if self.is_running():
            return StartResult(self.name, False, f"already listening on {self._where}")
        server = shutil.which("redis-server")
        if server is None:
            raise ServiceError(
                "redis-server not found. Fix: apt-get install -y redis-server "
                "(or run `make install`)"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        conf = self.home / "redis.conf"
        conf.write_text(
            "# Written by `engagement services up` at every start.\n"
            f"bind {self.endpoint.host}\nport {self.endpoint.port}\nprotected-mode yes\n"
            f"dir {self.home}\npidfile {self.pid_file}\nlogfile {self.log}\n"
            'daemonize yes\nappendonly yes\nappendfsync everysec\nsave ""\n'
            + self._security_conf()  # later lines win: `port 0` turns the plain port off
        )
        conf.chmod(0o600)
        _run([server, str(conf)], what="redis-server", log=self.log)
        wait_for(self.is_running, timeout_s=20, what="Redis", log=self.log)
        return StartResult(self.name, True, f"started on {self._where} (data {self.home})")

    def stop(self) -> bool:
        pid = _pid_alive(self.pid_file, "redis-server")
        if pid is None:
            return False
        _terminate(pid, timeout_s=20)  # SIGTERM: Redis flushes the AOF and exits
        return True

    @property
    def _where(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"


SCRAM_ITERATIONS = 8192
KAFKA_BROKER_USER = "engagement-broker"  # the broker's own SCRAM user (inter-broker listener)


def scram_credential(mechanism: str, user: str, password: str) -> str:
    """A `kafka-storage format --add-scram` argument holding the salted password only, so the
    password itself never appears on a command line."""
    digest = "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac(digest, password.encode(), salt, SCRAM_ITERATIONS)
    return (
        f"{mechanism}=[name={user},iterations={SCRAM_ITERATIONS},"
        f'salt="{base64.b64encode(salt).decode()}",'
        f'saltedpassword="{base64.b64encode(salted).decode()}"]'
    )


class LocalKafka:
    """An Apache Kafka broker in KRaft mode, run from Maven Central jars on Java 17+.

    With ENGAGEMENT_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL its one client listener speaks that
    protocol (PEM keystore from ENGAGEMENT_LOCAL_TLS_*, truststore ENGAGEMENT_KAFKA_SSL_CAFILE),
    and the controller listener is TLS with client certificates required, so no port is open
    in clear. SASL is SCRAM: the broker's own user is created at format time, the client user of
    the settings is created or updated at every start.
    """

    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
        self.endpoint = Endpoint(host or "127.0.0.1", int(port))
        self.controller_port = self.endpoint.port + 1
        self.home = settings.local_dir / "kafka"
        self.libs = self.home / "libs"
        self.data = self.home / "data"
        self.pid_file = self.home / "kafka.pid"
        self.log = self.home / "kafka.log"
        self.protocol = settings.kafka_security_protocol
        self.tls = self.protocol in {"SSL", "SASL_SSL"}
        self.sasl = self.protocol.startswith("SASL_")
        self._settings = settings
        self.broker_secret = self.home / "broker-scram.secret"

    def _check_security(self) -> None:
        s = self._settings
        if self.tls:
            _, key = _server_tls_files(
                s, "Kafka", f"ENGAGEMENT_KAFKA_SECURITY_PROTOCOL={self.protocol}"
            )
            if "BEGIN PRIVATE KEY" not in key.read_text():
                raise ServiceError(
                    f"Kafka reads PKCS#8 keys only; {key} is not one. Fix: openssl pkcs8 "
                    f"-topk8 -nocrypt -in {key} -out <new key file>, and point "
                    "ENGAGEMENT_LOCAL_TLS_KEY_FILE at it"
                )
            if s.kafka_ssl_cafile is None or not s.kafka_ssl_cafile.is_file():
                raise ServiceError(
                    "the local Kafka with TLS needs ENGAGEMENT_KAFKA_SSL_CAFILE (the CA of its "
                    "certificate): the broker verifies its own listeners with it"
                )
        if self.sasl and s.kafka_sasl_mechanism not in {"SCRAM-SHA-256", "SCRAM-SHA-512"}:
            raise ServiceError(
                "the local Kafka authenticates with SCRAM only: set "
                "ENGAGEMENT_KAFKA_SASL_MECHANISM=SCRAM-SHA-512"
            )

    def _security_properties(self) -> str:
        s = self._settings
        lines: list[str] = []
        if self.tls:
            files = _server_tls_files(s, "Kafka", "ENGAGEMENT_KAFKA_SECURITY_PROTOCOL")
            assert s.kafka_ssl_cafile is not None  # _check_security
            keystore = self.home / "tls" / "keystore.pem"  # key, then the certificate chain
            _install_private(files[1], keystore, owner=None)
            with keystore.open("a") as out:
                out.write("\n" + files[0].read_text())
            truststore = _install_private(
                s.kafka_ssl_cafile, self.home / "tls" / "ca.pem", owner=None
            )
            lines += [
                "ssl.keystore.type=PEM",
                f"ssl.keystore.location={keystore}",
                "ssl.truststore.type=PEM",
                f"ssl.truststore.location={truststore}",
                "ssl.enabled.protocols=TLSv1.3,TLSv1.2",
                "ssl.endpoint.identification.algorithm=https",
                # The broker reaches its own controller with its certificate; nobody else can.
                "listener.name.controller.ssl.client.auth=required",
            ]
        if self.sasl:
            mechanism = str(s.kafka_sasl_mechanism)
            listener = self.protocol.lower()
            lines += [
                f"sasl.enabled.mechanisms={mechanism}",
                f"sasl.mechanism.inter.broker.protocol={mechanism}",
                f"listener.name.{listener}.{mechanism.lower()}.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{KAFKA_BROKER_USER}" password="{self._broker_password()}";',
            ]
        return "".join(f"{line}\n" for line in lines)

    def _broker_password(self) -> str:
        """The broker's own SCRAM password: made once, kept in a 0600 file next to its data."""
        if not self.broker_secret.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.broker_secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(24))
        return self.broker_secret.read_text().strip()

    def _format_scram_arguments(self) -> list[str]:
        if not self.sasl:
            return []
        mechanism = str(self._settings.kafka_sasl_mechanism)
        return [
            "--add-scram",
            scram_credential(mechanism, KAFKA_BROKER_USER, self._broker_password()),
        ]

    def _ensure_client_user(self, timeout_s: float = 60) -> None:
        """Create or update the settings' SCRAM user through the broker's own user, so a changed
        ENGAGEMENT_KAFKA_SASL_PASSWORD takes effect at the next start."""
        from confluent_kafka.admin import (
            AdminClient,
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        s = self._settings
        assert s.kafka_sasl_username and s.kafka_sasl_password and s.kafka_sasl_mechanism
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": f"{self.endpoint.host}:{self.endpoint.port}",
            "security.protocol": self.protocol.lower(),
            "sasl.mechanism": s.kafka_sasl_mechanism,
            "sasl.username": KAFKA_BROKER_USER,
            "sasl.password": self._broker_password(),
        }
        if self.tls and s.kafka_ssl_cafile is not None:
            config["ssl.ca.location"] = str(s.kafka_ssl_cafile)
        mechanism = ScramMechanism[s.kafka_sasl_mechanism.replace("-", "_")]
        upsert = UserScramCredentialUpsertion(
            s.kafka_sasl_username,
            ScramCredentialInfo(mechanism, SCRAM_ITERATIONS),
            s.kafka_sasl_password.get_secret_value().encode(),
        )
        deadline = time.monotonic() + timeout_s
        while True:
            admin = AdminClient(config)
            try:
                for future in admin.alter_user_scram_credentials([upsert]).values():
                    future.result(timeout=10)
                return
            except Exception as exc:  # the broker may still be loading its metadata
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"could not create the Kafka SCRAM user {s.kafka_sasl_username!r}: {exc}"
                    ) from None
                time.sleep(1)

    def is_running(self) -> bool:
        return port_open(self.endpoint.host, self.endpoint.port)

    def ensure_libs(self) -> None:
        """Fetch the broker jars with Maven (cached in ~/.m2); refetch when the pom changes."""
        pom_hash = hashlib.sha1(KAFKA_POM.read_bytes()).hexdigest()
        stamp = self.libs / ".pom-sha1"
        if stamp.exists() and stamp.read_text() == pom_hash:
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ServiceError("Maven not found. Fix: apt-get install -y maven (or `make install`)")
        if self.libs.exists():
            shutil.rmtree(self.libs)
        self.libs.mkdir(parents=True)
        _run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(KAFKA_POM),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={self.libs}",
                "-DincludeScope=runtime",
            ],
            what="fetching the Kafka broker jars from Maven Central",
        )
        stamp.write_text(pom_hash)

    def _check_java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise ServiceError(
                "java not found. Fix: apt-get install -y default-jre-headless (or `make install`)"
            )
        done = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
        match = re.search(r'version "(\d+)', done.stderr)
        if match is None or int(match.group(1)) < 17:
            raise ServiceError(
                f"Kafka needs Java 17 or newer; found {done.stderr.splitlines()[:1]}. "
                "Fix: apt-get install -y openjdk-17-jre-headless"
            )
        return java

    def _write_properties(self) -> Path:
        props = self.home / "server.properties"
        host = self.endpoint.host
        # One client listener, named after its protocol (PLAINTEXT, SSL, SASL_SSL, ...).
        listener = self.protocol
        controller = "SSL" if self.tls else "PLAINTEXT"
        props.touch(mode=0o600)  # the broker's JAAS line holds its own password
        props.chmod(0o600)
        props.write_text(
            "# Written by `engagement services up` at every start.\n"
            "process.roles=broker,controller\n"
            "node.id=1\n"
            f"controller.quorum.bootstrap.servers={host}:{self.controller_port}\n"
            f"listeners={listener}://{host}:{self.endpoint.port},"
            f"CONTROLLER://{host}:{self.controller_port}\n"
            f"advertised.listeners={listener}://{host}:{self.endpoint.port}\n"
            "controller.listener.names=CONTROLLER\n"
            f"listener.security.protocol.map={listener}:{listener},CONTROLLER:{controller}\n"
            f"inter.broker.listener.name={listener}\n"
            + self._security_properties()
            + f"log.dirs={self.data}\n"
            "num.partitions=1\n"
            # A single broker: without these, transactional producers never initialise.
            "offsets.topic.replication.factor=1\n"
            "transaction.state.log.replication.factor=1\n"
            "transaction.state.log.min.isr=1\n"
            "group.initial.rebalance.delay.ms=0\n"
            "auto.create.topics.enable=true\n"
        )
        return props

    def start(self) -> StartResult:
        """Start the broker unless one of ours is running, starting or stopping.

        Two processes (a test session and `make run`, say) may call this at once: a file lock
        serializes them, and a broker process that is still alive is waited for, never joined
        by a second one: two brokers on one log directory corrupt its metadata log.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "start.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._start_locked()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _start_locked(self) -> StartResult:
        pid = _pid_alive(self.pid_file, "kafka.Kafka")
        if pid is not None:
            wait_for(
                lambda: self.is_running() or _pid_alive(self.pid_file, "kafka.Kafka") is None,
                timeout_s=90,
                what=f"Kafka process {pid} (starting or stopping)",
                log=self.log,
            )
        if self.is_running():
            return StartResult(self.name, False, f"already listening on {self._where}")
        java = self._check_java()
        self._check_security()
        self.ensure_libs()
        self.home.mkdir(parents=True, exist_ok=True)
        props = self._write_properties()
        classpath = f"{self.libs}/*"
        if not (self.data / "meta.properties").exists():
            cluster_id = _run(
                [java, "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
                what="kafka storage random-uuid",
            ).split()[-1]
            _run(
                [
                    java,
                    "-cp",
                    classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "-t",
                    cluster_id,
                    "-c",
                    str(props),
                    *self._format_scram_arguments(),
                ],
                what="kafka storage format",
            )
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                [
                    java,
                    "-Xms256m",
                    "-Xmx768m",
                    "-XX:+UseG1GC",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
                    "-cp",
                    classpath,
                    "kafka.Kafka",
                    str(props),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the CLI; `services down` stops it
            )
        self.pid_file.write_text(str(proc.pid))

        def ready() -> bool:
            if proc.poll() is not None:
                raise ServiceError(f"Kafka exited with {proc.returncode}{_log_tail(self.log)}")
            return self.is_running()

        wait_for(ready, timeout_s=90, what="Kafka", log=self.log)
        if self.sasl:
            self._ensure_client_user()
        return StartResult(self.name, True, f"started on {self._where} (data {self.data})")

    def stop(self, timeout_s: float = 90) -> bool:
        """SIGTERM (controlled shutdown), then SIGKILL if it hangs past timeout_s: with live
        transactional clients the broker has been seen to hang in shutdown for minutes."""
        pid = _pid_alive(self.pid_file, "kafka.Kafka")
        if pid is None:
            return False
        _terminate(pid, timeout_s=timeout_s)
        return True

    @property
    def _where(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"


LocalService = LocalPostgres | LocalRedis | LocalKafka


def local_services(settings: Settings) -> list[LocalService]:
    """The services this machine should run: those whose configured URL is on loopback."""
    services: list[LocalService] = [
        LocalPostgres(settings),
        LocalRedis(settings),
        LocalKafka(settings),
    ]
    return [s for s in services if s.endpoint.is_local]


def services_up(settings: Settings) -> list[StartResult]:
    return [service.start() for service in local_services(settings)]


def services_down(settings: Settings) -> list[str]:
    """Stop every local service that has a pid here; the names of those stopped."""
    return [s.name for s in reversed(local_services(settings)) if s.stop()]
