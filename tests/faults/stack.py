"""Private services and stream processes for the fault scenarios.

Scenarios that stop, crash or reconfigure a service run it privately (their own data directory
and port), so the shared PostgreSQL, Redis and Kafka that other test sessions and `make run` use
are never disturbed. Ports are offset by the test namespace, so two sessions never share one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engagement_dagster.lib.generator import TrafficOptions, run_traffic
from engagement_dagster.lib.local_services import LocalKafka, LocalPostgres, LocalRedis
from engagement_dagster.lib.settings import Settings
from tests.conftest import NAMESPACE, SUFFIX, TEST_DIR, TEST_LOCAL

BIN = Path(sys.executable).parent
OFFSET = (sum(map(ord, NAMESPACE)) % 40) * 3 if NAMESPACE else 0
FAULTS_LOCAL = TEST_LOCAL / f"test_faults{SUFFIX}"  # private services' data, logs and pids
PRIVATE_PG_PORT = 55632 + OFFSET
PRIVATE_REDIS_PORT = 56579 + OFFSET
PRIVATE_KAFKA_PORT = 59292 + OFFSET  # and its controller on the next port
# The embedded ClickHouse is held this long at a time by the stream processes of these tests
# (default 10 s), so the test process can read checkpoints with a resolution of seconds.
CLICKHOUSE_HOLD_S = "2"
MIX = {"update_ratio": 0.05, "delete_ratio": 0.02, "invalid_ratio": 0.01}


def private_postgres_settings(base: Settings) -> Settings:
    return base.model_copy(
        update={
            "local_dir": FAULTS_LOCAL,
            "pg_dsn": f"postgresql://postgres@127.0.0.1:{PRIVATE_PG_PORT}/"
            f"engagement_faults{SUFFIX}_test",
        }
    )


def private_redis(settings: Settings) -> tuple[Settings, LocalRedis]:
    """Settings pointing at a private Redis (started by the caller) and its service."""
    updated = settings.model_copy(
        update={"local_dir": FAULTS_LOCAL, "redis_url": f"redis://127.0.0.1:{PRIVATE_REDIS_PORT}/0"}
    )
    return updated, LocalRedis(updated)


def private_kafka(settings: Settings) -> tuple[Settings, LocalKafka]:
    """Settings pointing at a private Kafka broker (started by the caller) and its service. The
    broker jars are shared with the session's Kafka (same pom, so the same jars)."""
    updated = settings.model_copy(
        update={"local_dir": FAULTS_LOCAL, "kafka_bootstrap": f"127.0.0.1:{PRIVATE_KAFKA_PORT}"}
    )
    kafka = LocalKafka(updated)
    shared_libs = TEST_LOCAL / "kafka" / "libs"
    if not kafka.libs.exists() and (shared_libs / ".pom-sha1").exists():
        kafka.libs.parent.mkdir(parents=True, exist_ok=True)
        kafka.libs.symlink_to(shared_libs)
    return updated, kafka


def module_settings(base: Settings, name: str) -> Settings:
    """A scenario's own chDB path and Kafka topics (under the session's topic prefix)."""
    return base.model_copy(
        update={
            "clickhouse_url": f"chdb://{TEST_DIR / 'faults' / name / 'clickhouse'}",
            "kafka_topic_prefix": f"{base.kafka_topic_prefix}{name}.",
        }
    )


def remove_clickhouse(settings: Settings) -> None:
    from engagement_dagster.lib.clickhouse import chdb_path

    path = chdb_path(settings.clickhouse_dsn)
    assert path is not None and TEST_DIR / "faults" in path.parents, f"refusing to remove {path}"
    shutil.rmtree(path, ignore_errors=True)


def stream_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of an `engagement stream` process on these settings."""
    return {
        **os.environ,
        "ENGAGEMENT_PG_DSN": settings.pg_dsn,
        "ENGAGEMENT_REDIS_URL": settings.redis_url,
        "ENGAGEMENT_CLICKHOUSE_URL": settings.clickhouse_dsn,
        "ENGAGEMENT_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "ENGAGEMENT_KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "ENGAGEMENT_SLOT": settings.slot,
        "ENGAGEMENT_PUBLICATION": settings.publication,
        "ENGAGEMENT_CLICKHOUSE_HOLD_SECONDS": CLICKHOUSE_HOLD_S,
        **extra,
    }


class StreamProcess:
    """`engagement stream` as its own process (as a Dagster run worker runs it), its log in a
    file: a pipe that nobody reads would block it once full."""

    def __init__(
        self, settings: Settings, log: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "engagement"), "stream", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=stream_env(settings, **(env or {})),
        )
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM (finish the batch, checkpoint, exit) and the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=60)
        self._log.close()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def final_drain(settings: Settings, log: Path) -> None:
    """A stream run until caught up (as tests.faults.test_crash's, on these settings)."""
    stream = StreamProcess(settings, log, "--until-caught-up", "--run-seconds", "900")
    code = stream.wait(timeout_s=900)
    out = stream.output()
    assert code == 0, out[-4000:]
    assert "caught up=True" in out, out[-2000:]


class Traffic:
    """The generator's mix in a thread until stopped; with `resilient`, a failed generator (the
    database restarting under it) is started again until stopped."""

    def __init__(
        self, settings: Settings, rate: float, *, seed: int, resilient: bool = False
    ) -> None:
        self.settings = settings
        self.rate = rate
        self.seed = seed
        self.resilient = resilient
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.changes = 0
        self._thread = threading.Thread(target=self._run, name="fault-traffic", daemon=True)

    def _run(self) -> None:
        seed = self.seed
        while not self.stop_event.is_set():
            options = TrafficOptions(rate=self.rate, seed=seed, content_update_ratio=0.0, **MIX)
            try:
                report = run_traffic(self.settings.pg_dsn, options, stop=self.stop_event)
                self.changes += report.inserted + report.updated + report.deleted + report.invalid
            except Exception as exc:  # GeneratorError, psycopg2 errors while PostgreSQL restarts
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if not self.resilient:
                    return
                self.stop_event.wait(0.5)
            seed += 1

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the traffic generator did not stop"


@contextmanager
def traffic(
    settings: Settings, rate: float, *, seed: int, resilient: bool = False
) -> Iterator[Traffic]:
    running = Traffic(settings, rate, seed=seed, resilient=resilient).start()
    try:
        yield running
    finally:
        running.stop()


def wait_until(
    condition: Callable[[], object], *, timeout_s: float, what: str, poll_s: float = 0.2
) -> float:
    """Poll `condition()` until true; the seconds it took. Fails naming `what`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not after {timeout_s:.0f} s"
        time.sleep(poll_s)
    return time.monotonic() - started


def prepare(base: Settings, name: str, *, content: int = 200, seed: int = 1) -> Settings:
    """A clean pipeline for one scenario on `base`'s services: a fresh test database, slot and
    content, the Redis database flushed, its own chDB and topics; drained once."""
    import redis

    from engagement_dagster.lib.generator import seed_content
    from tests.faults.exactness import log_dir
    from tests.support import reset_test_database, start_pipeline_epoch

    settings = module_settings(base, name)
    reset_test_database(settings)
    start_pipeline_epoch(settings)  # Kafka versions are read from here on
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    client.close()
    remove_clickhouse(settings)
    seed_content(settings.pg_dsn, content, seed=seed)
    final_drain(settings, log_dir(name) / "setup.log")
    return settings


def crash_postgres(postgres: LocalPostgres) -> None:
    """Stop PostgreSQL as a crash would (immediate mode: no checkpoint, clients cut off)."""
    subprocess.run(
        postgres._as_owner(
            [postgres._bin("pg_ctl"), "-D", str(postgres.data), "-m", "immediate", "-w", "stop"]
        ),
        check=True,
        capture_output=True,
    )


def redis_ready(url: str) -> bool:
    """Redis answers commands (not only accepts connections: it may still load its AOF)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()
