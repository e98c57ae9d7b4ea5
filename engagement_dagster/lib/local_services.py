"""Private local services for development and tests: PostgreSQL, Redis and Kafka (KRaft).

Each binds to 127.0.0.1 on the port of its configured URL and keeps its data under
`.local/`. This module starts and stops processes only; it never touches a service whose URL
points anywhere but loopback, and it never deletes data.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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


def _terminate(pid: int, *, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


class LocalPostgres:
    """A PostgreSQL cluster of our own (initdb), with wal_level=logical."""

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
            _run(
                self._as_owner(
                    [
                        self._bin("initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        self.superuser,
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C.UTF-8",
                        "--no-instructions",
                    ]
                ),
                what="initdb",
            )
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write("\ninclude_if_exists = 'engagement.conf'\n")
        self._write_conf()
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

    def _write_conf(self) -> None:
        conf = self.data / "engagement.conf"
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
            "log_min_messages = warning\n"
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


class LocalRedis:
    """A Redis server of our own, append-only file on (everysec)."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        url = urlsplit(settings.redis_url)
        self.endpoint = Endpoint(url.hostname or "127.0.0.1", url.port or 6379)
        self.home = settings.local_dir / "redis"
        self.pid_file = self.home / "redis.pid"
        self.log = self.home / "redis.log"

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
        )
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


class LocalKafka:
    """An Apache Kafka broker in KRaft mode, run from Maven Central jars on Java 17+."""

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
        props.write_text(
            "# Written by `engagement services up` at every start.\n"
            "process.roles=broker,controller\n"
            "node.id=1\n"
            f"controller.quorum.bootstrap.servers={host}:{self.controller_port}\n"
            f"listeners=PLAINTEXT://{host}:{self.endpoint.port},"
            f"CONTROLLER://{host}:{self.controller_port}\n"
            f"advertised.listeners=PLAINTEXT://{host}:{self.endpoint.port}\n"
            "controller.listener.names=CONTROLLER\n"
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            f"log.dirs={self.data}\n"
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
