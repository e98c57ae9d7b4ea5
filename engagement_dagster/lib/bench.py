"""The benchmark behind `make bench` and `make load`: throughput, latency and memory, JSON out.

It runs on the local services in a namespace of its own (database, slot, publication, Redis db,
chDB path, Kafka topic prefix, DAGSTER_HOME), so it never touches the demo's or the tests' data,
and it must never leave its slot behind (an idle slot pins WAL). A measurement, not a test: no
figure here passes or fails anything. Dagster is imported only by the Dagster-path section.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import psutil
import psycopg2.extensions
from psycopg2 import sql
from rich.table import Table

from engagement_dagster.lib.change_cursor import ChangeCursor
from engagement_dagster.lib.clickhouse import chdb_path, clickhouse_client
from engagement_dagster.lib.generator import (
    TrafficOptions,
    TrafficReport,
    run_traffic,
    seed_content,
)
from engagement_dagster.lib.kafka_config import delete_topics_under, kafka_client_config
from engagement_dagster.lib.pgoutput import parse_lsn
from engagement_dagster.lib.secure import redis_client
from engagement_dagster.lib.settings import PROJECT_ROOT, Settings, get_settings
from engagement_dagster.lib.sinks.clickhouse import READ_CHECKPOINT
from engagement_dagster.lib.sinks.clickhouse import SINK_NAME as CLICKHOUSE_SINK
from engagement_dagster.lib.sinks.kafka_contract import CHECKPOINT_TOPIC, checkpoint_lsn
from engagement_dagster.lib.sinks.redis import CHECKPOINT_KEY
from engagement_dagster.lib.source_db import connect, init_source, slot_info
from engagement_dagster.lib.stream import fewer_collections

BENCH_REDIS_DB = 9  # the demo uses 0, test sessions 10-15 (tests/conftest.py)
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
INVALID_RATIO = 0.01  # the generator's mix (5% updates, 2% deletes) plus 1% invalid rows
FOREVER_S = 86_400.0  # a stream child's --run-seconds: it ends when the bench says so
CLICKHOUSE_APPLIED_NOTE = (
    "clickhouse: with embedded chDB, commit -> row written by the stream, as ClickHouse stamped "
    "it (ingested_at - source_committed_at of every row committed in the steady window; "
    "'missing' counts probes absent afterwards). Embedded chDB opens in one process at a time: "
    "a probe reading it from here would make the stream hand it over, which stalls every sink "
    "of the stream ~0.5-1 s, so it is not watched live (hold: "
    "ENGAGEMENT_CLICKHOUSE_HOLD_SECONDS). With a ClickHouse server the probes are watched "
    "like the other sinks. clickhouse_applied: the stamped figure, for either."
)

PROBE_SQL = """
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,
                               raw_payload)
SELECT id, %s, 'play', now(), 1000, 'probe', '{"probe": true}' FROM content LIMIT 1
RETURNING id
"""
CURRENT_WAL_LSN = "SELECT pg_current_wal_lsn()::text"
CURRENT_WAL_INSERT_LSN = "SELECT pg_current_wal_insert_lsn()::text"
DROP_SLOTS_OF_DATABASE = """
SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
 WHERE database = %(db)s AND active_pid IS NOT NULL;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
 WHERE database = %(db)s AND NOT active;
"""
BUSIEST_DAY = """
SELECT (event_ts AT TIME ZONE 'UTC')::date, count(*) FROM engagement_events
 WHERE event_ts IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT 1
"""
CLICKHOUSE_APPLIED = """
SELECT quantiles(0.5, 0.95, 0.99)(dateDiff('millisecond', source_committed_at, ingested_at)),
       count(), max(dateDiff('millisecond', source_committed_at, ingested_at))
  FROM engagement.enriched_engagements
 WHERE source_committed_at >= {since:DateTime64(6)} AND source_committed_at < {until:DateTime64(6)}
"""
PROBES_PRESENT = """
SELECT count(DISTINCT event_id) FROM engagement.enriched_engagements
 WHERE event_id IN {ids:Array(Int64)}
"""
STREAM_DONE = re.compile(r"done: caught up=(\w+), ([\d,]+) changes")
FIRST_BATCH = re.compile(r"sink (\S+): first batch applied (\d+) ms after the start")
STREAM_SINKS = ("redis", "clickhouse", "kafka")

Say = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# The bench's own namespace on the shared local services.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchNamespace:
    """Names of everything one bench run owns; `env` hands them to its child processes."""

    name: str = "bench"
    redis_db: int = BENCH_REDIS_DB
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        if "bench" not in self.name or not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", self.name):
            raise ValueError(f"bench namespace {self.name!r}: lower-case, and must say 'bench'")

    @property
    def database(self) -> str:
        return f"engagement_{self.name}"

    @property
    def slot(self) -> str:
        return f"engagement_{self.name}_slot"

    @property
    def publication(self) -> str:
        return f"engagement_{self.name}_pub"

    @property
    def topic_prefix(self) -> str:
        """Per run: a run never reads another's records; the run deletes its topics at the end."""
        return f"{self.name}.{self.run_id}."

    def directory(self, base: Settings) -> Path:
        return base.local_dir / self.name

    def env(self, base: Settings) -> dict[str, str]:
        """ENGAGEMENT_* variables (Settings reads them) that point every process at us."""
        redis_url = urlparse(base.redis_url)._replace(path=f"/{self.redis_db}")
        return {
            "ENGAGEMENT_PG_DSN": psycopg2.extensions.make_dsn(base.pg_dsn, dbname=self.database),
            "ENGAGEMENT_REDIS_URL": urlunparse(redis_url),
            "ENGAGEMENT_CLICKHOUSE_URL": f"chdb://{self.directory(base) / 'clickhouse'}",
            "ENGAGEMENT_SLOT": self.slot,
            "ENGAGEMENT_PUBLICATION": self.publication,
            "ENGAGEMENT_KAFKA_TOPIC_PREFIX": self.topic_prefix,
            "DAGSTER_HOME": str(self.directory(base) / "dagster"),
        }


def enter_namespace(namespace: BenchNamespace) -> Settings:
    """Point this process (and so every child it starts) at the bench namespace.

    Changes os.environ: `engagement bench` is a process of its own for that reason.
    """
    os.environ.update(namespace.env(get_settings()))
    get_settings.cache_clear()
    return get_settings()


def reset_namespace(settings: Settings, namespace: BenchNamespace) -> None:
    """A fresh database (schema, publication, slot), Redis db and chDB: every run alike."""
    _drop_database(settings, namespace)
    init_source(settings.pg_dsn, slot=settings.slot, publication=settings.publication)
    client = redis_client(settings.redis_url, settings=settings)
    client.flushdb()
    client.close()
    for scratch in ("clickhouse", "backfill_clickhouse", "dagster"):
        _remove_scratch(settings, namespace, namespace.directory(settings) / scratch)


def release_namespace(settings: Settings, namespace: BenchNamespace, *, keep_data: bool) -> None:
    """Drop the slot (so it pins no WAL) and this run's Kafka topics; the database too unless
    keep_data (the next run resets it anyway)."""
    if keep_data:
        maintenance = psycopg2.extensions.make_dsn(settings.pg_dsn, dbname="postgres")
        with connect(maintenance) as conn, conn.cursor() as cur:
            _drop_slots(cur, namespace.database)
    else:
        _drop_database(settings, namespace)
        _remove_scratch(settings, namespace, namespace.directory(settings) / "clickhouse")
    delete_topics_under(settings, namespace.topic_prefix)


def _drop_database(settings: Settings, namespace: BenchNamespace) -> None:
    dbname = psycopg2.extensions.parse_dsn(settings.pg_dsn)["dbname"]
    if dbname != namespace.database:
        raise RuntimeError(f"refusing to drop {dbname!r}: not the bench database")
    maintenance = psycopg2.extensions.make_dsn(settings.pg_dsn, dbname="postgres")
    with connect(maintenance) as conn, conn.cursor() as cur:
        _drop_slots(cur, dbname)
        cur.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def _drop_slots(cur: psycopg2.extensions.cursor, dbname: str) -> None:
    """Drop every slot of the bench database, ending whoever still consumes one."""
    for _ in range(100):  # a slot user terminated a moment ago may hold it a little longer
        cur.execute(DROP_SLOTS_OF_DATABASE, {"db": dbname})
        cur.execute("SELECT count(*) FROM pg_replication_slots WHERE database = %s", (dbname,))
        left = cur.fetchone()
        if not left or left[0] == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"could not drop the replication slots of {dbname}: still in use")


def _remove_scratch(settings: Settings, namespace: BenchNamespace, path: Path) -> None:
    if path.parent != namespace.directory(settings):
        raise RuntimeError(f"refusing to remove {path}: not under the bench directory")
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Commit -> visible, from outside the pipeline (bench/latency.py is a thin wrapper of this).
# ---------------------------------------------------------------------------------------------


@dataclass
class Probe:
    event_id: int
    lsn: int  # a WAL position at or below the probe's commit LSN (see commit_probe)
    committed_at: float  # time.time() right after COMMIT returned
    seen: dict[str, float] = field(default_factory=dict)


def commit_probe(dsn: str, user: str) -> Probe:
    """One probe event, committed at once. Its `lsn` is the WAL insert position taken inside
    the transaction just before COMMIT: the commit record (the LSN sink checkpoints hold) lies
    at or after it. The position after COMMIT would lie past the commit record, and only the
    next transaction's checkpoint would reach it. A transaction committed by another session in
    the instant between the two may share a batch boundary with the probe: rare, and early by
    at most one batch."""
    with connect(dsn, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SET synchronous_commit = on")
        cur.execute(PROBE_SQL, (user,))
        row = cur.fetchone()
        if row is None:
            raise RuntimeError("no content to probe with: run `engagement seed` first")
        cur.execute(CURRENT_WAL_INSERT_LSN)
        lsn_row = cur.fetchone()
        conn.commit()
        committed_at = time.time()
    return Probe(int(row[0]), parse_lsn(lsn_row[0]) if lsn_row else 0, committed_at)


def current_wal_lsn(dsn: str) -> int:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(CURRENT_WAL_LSN)
        row = cur.fetchone()
    return parse_lsn(row[0]) if row else 0


class Watchers:
    """Poll each sink and stamp the probes it shows. Redis and Kafka by their checkpoints
    (written atomically with the data, so a checkpoint at or past the probe's LSN means the
    probe is visible), ClickHouse by the probe row itself. Only reads the sinks."""

    def __init__(self, settings: Settings, probes: list[Probe], lock: threading.Lock) -> None:
        self.settings = settings
        self.probes = probes
        self.lock = lock
        self.stop = threading.Event()
        self.checkpoints: dict[str, int] = {}
        # Stalls of the Redis checkpoint: (last move, next move) in time.time().
        self.redis_stalls: list[tuple[float, float]] = []
        self.redis_last_move = time.time()

    def _mark(self, sink: str, visible: dict[int, bool] | int) -> None:
        now = time.time()
        with self.lock:
            if isinstance(visible, int):
                self.checkpoints[sink] = visible
            for probe in self.probes:
                if sink in probe.seen:
                    continue
                shown = (
                    visible >= probe.lsn
                    if isinstance(visible, int)
                    else visible.get(probe.event_id, False)
                )
                if shown:
                    probe.seen[sink] = now

    def redis(self) -> None:
        client = redis_client(self.settings.redis_url, settings=self.settings)
        last_value = None
        while not self.stop.is_set():
            value = int(client.get(CHECKPOINT_KEY) or 0)
            now = time.time()
            if last_value is not None and value != last_value:
                self.redis_stalls.append((self.redis_last_move, now))
            if value != last_value:
                last_value, self.redis_last_move = value, now
            self._mark("redis", value)
            time.sleep(0.005)
        client.close()

    def kafka(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        topic = self.settings.kafka_topic_prefix + CHECKPOINT_TOPIC
        consumer = KafkaConsumer(
            **kafka_client_config(self.settings),
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_end(partition)
        while not self.stop.is_set():
            for record in consumer.poll(timeout_ms=50).get(partition, []):
                if record.value:
                    self._mark("kafka", checkpoint_lsn(record.value))
        consumer.close()

    def clickhouse(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                wanted = [p.event_id for p in self.probes if "clickhouse" not in p.seen]
            if wanted:
                with clickhouse_client(self.settings.clickhouse_dsn) as client:
                    found = client.query(
                        "SELECT event_id FROM engagement.enriched_engagements "
                        "WHERE event_id IN {ids:Array(Int64)}",
                        parameters={"ids": wanted},
                    ).result_rows
                self._mark("clickhouse", {int(r[0]): True for r in found})
            time.sleep(0.02)

    @contextmanager
    def running(self, sinks: tuple[str, ...] = ("redis", "clickhouse", "kafka")) -> Iterator[None]:
        threads = [threading.Thread(target=getattr(self, s), daemon=True) for s in sinks]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=70)  # a ClickHouse poll may wait for the chDB lock

    def all_seen(self, sinks: tuple[str, ...]) -> bool:
        with self.lock:
            return all(s in p.seen for p in self.probes for s in sinks)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max (ms, one decimal); None for each when there are no values."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    cut = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else []

    def at(q: int) -> float:
        return round(cut[q - 1] if cut else ordered[0], 1)

    return {"p50": at(50), "p95": at(95), "p99": at(99), "max": round(ordered[-1], 1)}


@dataclass(frozen=True)
class LatencyRun:
    """What one steady-load window measured from outside the pipeline."""

    offered_rate: float
    traffic: TrafficReport  # what the generator committed
    started_at: float  # time.time() when traffic started
    stopped_at: float  # ... and stopped
    drain_s: float | None  # after traffic stopped, until Redis and Kafka held all of it
    latency_ms: dict[str, dict[str, float | int | None]]
    redis_longest_stall_ms: float
    probes: int
    series: list[dict[str, float | None]]  # per probe: committed_at and ms to each sink


def offer_traffic(
    settings: Settings, options: TrafficOptions, stop: threading.Event
) -> tuple[threading.Thread, list[TrafficReport]]:
    """The generator in a started daemon thread; its report is in the list once it has ended
    (the list stays empty if it failed: the error is in the log)."""
    reports: list[TrafficReport] = []
    thread = threading.Thread(
        target=lambda: reports.append(run_traffic(settings.pg_dsn, options, stop=stop)),
        daemon=True,
    )
    thread.start()
    return thread, reports


def measure_latency(
    settings: Settings,
    *,
    rate: float,
    seconds: float,
    probe_every: float = 0.2,
    workers: int = 2,
    settle_s: float = 15.0,
    sinks: tuple[str, ...] | None = None,
) -> LatencyRun:
    """Offer `rate` changes/s for `seconds` while committing a probe every `probe_every`
    seconds; then wait up to settle_s for the last probes. The stream must already run.
    `sinks` are watched live (default: watched_sinks); an embedded chDB left out is measured
    from ClickHouse's own stamps once the traffic is over (clickhouse_applied)."""
    sinks = sinks or watched_sinks(settings)
    probes: list[Probe] = []
    lock = threading.Lock()
    watchers = Watchers(settings, probes, lock)
    stop_traffic = threading.Event()
    options = TrafficOptions(rate=rate, workers=workers, invalid_ratio=INVALID_RATIO)
    user = str(uuid.uuid4())
    with watchers.running(sinks):
        started_at = time.time()
        thread, traffic_report = offer_traffic(settings, options, stop_traffic)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and thread.is_alive():
            probe = commit_probe(settings.pg_dsn, user)
            with lock:
                probes.append(probe)
            time.sleep(probe_every)
        stop_traffic.set()
        thread.join()
        stopped_at = time.time()
        if not traffic_report:
            raise RuntimeError("traffic generation failed; see the log above")
        final_lsn = commit_probe(settings.pg_dsn, user).lsn  # after the last change offered
        drain_s = None
        settle_deadline = time.monotonic() + settle_s
        while time.monotonic() < settle_deadline:
            with lock:
                behind = [
                    s
                    for s in sinks
                    if s != "clickhouse" and watchers.checkpoints.get(s, 0) < final_lsn
                ]
            if not behind and drain_s is None:
                drain_s = time.time() - stopped_at
            if drain_s is not None and watchers.all_seen(sinks):
                break
            time.sleep(0.05)
    latency: dict[str, dict[str, float | int | None]] = {}
    for sink in sinks:
        values = [(p.seen[sink] - p.committed_at) * 1000 for p in probes if sink in p.seen]
        latency[sink] = {**percentiles(values), "missing": len(probes) - len(values)}
    if "clickhouse" not in sinks:
        latency["clickhouse"] = stamped_clickhouse_latency(
            settings, started_at, stopped_at, [p.event_id for p in probes], final_lsn, settle_s
        )
    stalls = [end - begin for begin, end in watchers.redis_stalls if end >= started_at]
    return LatencyRun(
        offered_rate=rate,
        traffic=traffic_report[0],
        started_at=started_at,
        stopped_at=stopped_at,
        drain_s=None if drain_s is None else round(drain_s, 3),
        latency_ms=latency,
        redis_longest_stall_ms=round(max(stalls, default=0.0) * 1000, 1),
        probes=len(probes),
        series=[
            {
                "committed_at": round(p.committed_at, 3),
                **{
                    s: round((p.seen[s] - p.committed_at) * 1000, 1) if s in p.seen else None
                    for s in sinks
                },
            }
            for p in probes
        ],
    )


# ---------------------------------------------------------------------------------------------
# The stream as a child process: `engagement stream`, with its resource use.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildUsage:
    wall_s: float
    cpu_s: float
    rss_mb: float  # peak of the stream and its sink process together (sampled every 0.25 s)
    largest_rss_mb: float  # the kernel's peak of the largest one of them (rusage when reaped)
    # Peak of their memory less the pages mapped from files (shared libraries: chDB's is 555 MB
    # on disk), which the kernel can drop and re-read, and other processes share.
    private_mb: float
    stream_rss_mb: float  # peak of the stream process alone, without its sink process
    exit_code: int
    changes: int | None  # from its last line, `done: caught up=..., N changes`
    caught_up: bool | None

    @property
    def cpu_pct(self) -> float:
        return round(100 * self.cpu_s / self.wall_s, 1) if self.wall_s > 0 else 0.0


class StreamChild:
    """`engagement stream` in its own process, output in a log file; reaped with os.wait4 so
    its CPU time (its sink process's included) is the kernel's figure. Its memory is the sum
    over the stream and the process its embedded ClickHouse sink runs in, sampled every 0.25 s
    (the kernel's peak is per process: `largest_rss_mb`)."""

    def __init__(self, log: Path, *, until_caught_up: bool) -> None:
        command = [str(Path(sys.executable).parent / "engagement"), "stream"]
        command += ["--run-seconds", str(FOREVER_S)]
        if until_caught_up:
            command.append("--until-caught-up")
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with log.open("wb") as out:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=PROJECT_ROOT,
                env={**os.environ, "COLUMNS": "200"},
            )
        self.usage: ChildUsage | None = None
        self.peak_rss_mb = self.peak_private_mb = self.peak_stream_mb = 0.0
        threading.Thread(target=self._sample_rss, name="stream-rss", daemon=True).start()

    def _sample_rss(self) -> None:
        while self.usage is None:
            rss, private, stream = self.memory_mb() or (0.0, 0.0, 0.0)
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            self.peak_private_mb = max(self.peak_private_mb, private)
            self.peak_stream_mb = max(self.peak_stream_mb, stream)
            time.sleep(0.25)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> ChildUsage | None:
        """The child's usage once it has exited (reaping it), else None."""
        if self.usage is None:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            if pid != 0:
                self._reaped(status, rusage)
        return self.usage

    def wait(self, timeout_s: float) -> ChildUsage:
        deadline = time.monotonic() + timeout_s
        while (usage := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the stream child ran over {timeout_s:.0f}s; see {self.log}")
            time.sleep(0.02)
        return usage

    def stop(self, timeout_s: float = 90.0) -> ChildUsage:
        """SIGTERM: the stream finishes its batch, checkpoints and exits."""
        if self.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        if self.usage is None:
            self.process.kill()
            _, status, rusage = os.wait4(self.pid, 0)
            self._reaped(status, rusage)

    def _reaped(self, status: int, rusage: Any) -> None:
        code = os.waitstatus_to_exitcode(status)
        self.process.returncode = code  # we reaped it, not Popen
        done = STREAM_DONE.findall(self.log.read_text(errors="replace"))
        self.usage = ChildUsage(
            wall_s=time.monotonic() - self.started,
            cpu_s=rusage.ru_utime + rusage.ru_stime,
            rss_mb=round(max(self.peak_rss_mb, rusage.ru_maxrss / 1024), 1),
            largest_rss_mb=round(rusage.ru_maxrss / 1024, 1),  # Linux: kilobytes
            private_mb=self.peak_private_mb,
            stream_rss_mb=self.peak_stream_mb,
            exit_code=code,
            changes=int(done[-1][1].replace(",", "")) if done else None,
            caught_up=done[-1][0] == "True" if done else None,
        )

    def first_batches_ms(self) -> dict[str, int]:
        """Sink -> ms from the stream's start to its first batch applied, as the stream logs it."""
        found = FIRST_BATCH.findall(self.log.read_text(errors="replace"))
        return {sink: int(ms) for sink, ms in found}

    def rss_mb(self) -> float | None:
        """Current RSS of the stream and its children, from /proc (None once it has ended)."""
        memory = self.memory_mb()
        return memory[0] if memory else None

    def memory_mb(self) -> tuple[float, float, float] | None:
        """Current RSS of the stream and its children, the part of it not mapped from files
        (RSS less the resident file-backed and shared pages, /proc/<pid>/statm), and the RSS of
        the stream process alone."""
        try:
            stream = psutil.Process(self.pid)
            infos = [p.memory_info() for p in (stream, *stream.children(recursive=True))]
        except psutil.Error:
            return None
        rss = sum(i.rss for i in infos)
        private = rss - sum(i.shared for i in infos)
        return round(rss / 2**20, 1), round(private / 2**20, 1), round(infos[0].rss / 2**20, 1)


def wait_for_slot_holder(settings: Settings, child: StreamChild, timeout_s: float = 120) -> None:
    """Until the child's stream holds the slot (its start-up: imports, sinks, replication)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the stream exited early; see {child.log}")
        with connect(settings.pg_dsn) as conn:
            info = slot_info(conn, settings.slot)
        if info is not None and info.active:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the stream did not take slot {settings.slot} in {timeout_s:.0f}s")


@contextmanager
def tailing_stream(settings: Settings, log: Path) -> Iterator[StreamChild]:
    """A stream child tailing the slot, from when every sink has applied a first batch (so what
    is measured from here is the stream's steady work, not its start-up: the embedded
    ClickHouse sink's process starts in 1.5-4 s); killed at the end."""
    child = StreamChild(log, until_caught_up=False)
    try:
        wait_for_slot_holder(settings, child)
        warm_up = commit_probe(settings.pg_dsn, str(uuid.uuid4()))
        _wait_for_redis(settings, warm_up.lsn, child)
        deadline = time.monotonic() + 120
        while not set(STREAM_SINKS) <= child.first_batches_ms().keys():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"a sink did not apply its first batch; see {child.log}")
            time.sleep(0.05)
        yield child
    finally:
        child.kill()


# ---------------------------------------------------------------------------------------------
# Phases of `make bench`.
# ---------------------------------------------------------------------------------------------


def generate_backlog(settings: Settings, changes: int, workers: int) -> TrafficReport:
    """At least `changes` changes as fast as the generator commits them (the stream is down,
    so they wait in the slot); synchronous_commit is off in the generator's connections."""
    stop = threading.Event()

    def progress(report: TrafficReport) -> None:
        if report.changes >= changes:
            stop.set()

    options = TrafficOptions(rate=1e9, workers=workers, seed=7, invalid_ratio=INVALID_RATIO)
    return run_traffic(settings.pg_dsn, options, stop=stop, on_progress=progress)


@dataclass(frozen=True)
class DecodeRun:
    changes: int
    transactions: int
    seconds: float

    @property
    def eps(self) -> float:
        return self.changes / self.seconds if self.seconds > 0 else 0.0


def raw_decode(settings: Settings, target_lsn: int, timeout_s: float = 1800) -> DecodeRun:
    """Read the slot's backlog up to target_lsn with pgoutput decoding and transaction assembly
    only: no enrichment, no sinks. Never acknowledges, so the slot stays where it was and the
    stream reads the same changes next. Timed to the last transaction read: the end is known
    only from a later keepalive, which is not decoding work."""
    cursor = ChangeCursor(
        settings.pg_dsn, slot=settings.slot, publication=settings.publication, status_interval_s=1
    )
    changes = transactions = 0
    started = last_read = time.monotonic()
    cursor.open()
    try:
        with fewer_collections():  # as the stream decodes
            while time.monotonic() - started < timeout_s:
                transaction = cursor.read(timeout_s=0.5)
                if transaction is not None:
                    changes += len(transaction.changes)
                    transactions += 1
                    last_read = time.monotonic()
                elif cursor.position.server_wal_end >= target_lsn:
                    break
            else:
                raise TimeoutError(f"raw decode did not reach the target in {timeout_s:.0f}s")
    finally:
        cursor.close()
    return DecodeRun(changes, transactions, last_read - started)


@dataclass(frozen=True)
class CatchUp:
    usage: ChildUsage
    first_batch_s: float | None  # start-up: spawn -> the first batch applied in Redis
    cpu_s: dict[str, float | None]  # where the machine's CPU went (CpuLedger)


class CpuLedger:
    """CPU seconds each process of a catch-up spent: the stream, its ClickHouse process, and the
    local services that work for it (its PostgreSQL walsender, Redis, the Kafka broker). Where
    the time goes on a machine the pipeline shares with its services, and so what bounds it.

    Sampled every 0.25 s from /proc; a process's last sample counts, so one that ends (the
    walsender, with the stream) is short by at most that. A service that is not a process on
    this machine (or not ours to read) is None.
    """

    EVERY_S = 0.25

    def __init__(self, settings: Settings, child: StreamChild) -> None:
        self.settings, self.child = settings, child
        self._services = {
            "redis": _listener_pid(urlparse(settings.redis_url).port or 6379),
            "kafka_broker": _listener_pid(int(settings.kafka_bootstrap.rsplit(":", 1)[1])),
        }
        self._start = {name: _cpu_s(pid) for name, pid in self._services.items()}
        self._last: dict[str, float | None] = dict(self._start)
        self._walsender: int | None = None
        self._children: dict[int, float] = {}  # the stream's child processes: pid -> CPU s

    def sample(self, conn: psycopg2.extensions.connection) -> None:
        for name, pid in self._services.items():
            self._last[name] = _cpu_s(pid)
        if self._walsender is None:
            info = slot_info(conn, self.settings.slot)
            self._walsender = info.active_pid if info is not None else None
        if self._walsender is not None:
            self._last["postgres_walsender"] = _cpu_s(self._walsender) or self._last.get(
                "postgres_walsender"
            )
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(self.child.pid).children(recursive=True):
                self._children[process.pid] = _cpu_s(process.pid) or self._children.get(
                    process.pid, 0.0
                )

    def seconds(self, usage: ChildUsage) -> dict[str, float | None]:
        children = sum(self._children.values())
        spent: dict[str, float | None] = {
            "stream": round(usage.cpu_s - children, 2),
            "clickhouse_process": round(children, 2),
            "postgres_walsender": self._last.get("postgres_walsender"),
        }
        for name, before in self._start.items():
            after = self._last[name]
            spent[name] = None if before is None or after is None else round(after - before, 2)
        known = [v for v in spent.values() if v is not None]
        spent["total"] = round(sum(known), 2)
        return spent


def _listener_pid(port: int) -> int | None:
    """The process listening on this machine's TCP `port`, if it is one we may read."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    return None


def _cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return round(times.user + times.system, 2)


def catch_up(settings: Settings, log: Path, timeout_s: float = 3600) -> CatchUp:
    """`engagement stream --until-caught-up` on the backlog, from spawn to its exit."""
    client = redis_client(settings.redis_url, settings=settings)
    before = int(client.get(CHECKPOINT_KEY) or 0)
    child = StreamChild(log, until_caught_up=True)
    ledger = CpuLedger(settings, child)
    first_batch_s = None
    deadline = time.monotonic() + timeout_s
    try:
        with connect(settings.pg_dsn, application_name="engagement-bench") as conn:
            sampled = 0.0
            while child.poll() is None and time.monotonic() < deadline:
                if first_batch_s is None and int(client.get(CHECKPOINT_KEY) or 0) != before:
                    first_batch_s = round(time.monotonic() - child.started, 3)
                if time.monotonic() - sampled >= CpuLedger.EVERY_S:
                    ledger.sample(conn)
                    sampled = time.monotonic()
                time.sleep(0.05)
        usage = child.wait(timeout_s=5)
    finally:
        child.kill()
        client.close()
    if usage.exit_code != 0 or not usage.caught_up:
        raise RuntimeError(f"the catch-up stream ended with {usage}; see {log}")
    return CatchUp(usage, first_batch_s, ledger.seconds(usage))


def watched_sinks(settings: Settings) -> tuple[str, ...]:
    """The sinks whose probes are watched live: all three, but not an embedded chDB. Reading
    chDB from another process makes the stream hand it over and open it again, which stalls all
    of the stream's sinks 0.5-1 s each time (a reader every 10 s: Redis p99 0.89-1.06 s against
    0.33 s without; 2,000 changes/s, quiet machine)."""
    if chdb_path(settings.clickhouse_dsn) is None:
        return ("redis", "clickhouse", "kafka")
    return ("redis", "kafka")


def clickhouse_applied(
    settings: Settings, since: float, until: float
) -> dict[str, float | int | None]:
    """Commit -> written by the stream, per row, as ClickHouse stamped it (ingested_at)."""
    with clickhouse_client(settings.clickhouse_dsn) as client:
        row = client.query(
            CLICKHOUSE_APPLIED,
            parameters={
                "since": datetime.fromtimestamp(since, UTC),
                "until": datetime.fromtimestamp(until, UTC),
            },
        ).result_rows[0]
    if not row[1]:
        return {"p50": None, "p95": None, "p99": None, "max": None, "rows": 0}
    p50, p95, p99 = (round(float(v), 1) for v in row[0])
    return {"p50": p50, "p95": p95, "p99": p99, "max": round(float(row[2]), 1), "rows": int(row[1])}


def stamped_clickhouse_latency(
    settings: Settings,
    since: float,
    until: float,
    probe_ids: list[int],
    final_lsn: int,
    settle_s: float,
) -> dict[str, float | int | None]:
    """clickhouse_applied over the window once ClickHouse's checkpoint passed final_lsn (or
    settle_s ran out), and how many probes it lacks then."""
    deadline = time.monotonic() + settle_s
    while True:
        with clickhouse_client(settings.clickhouse_dsn) as client:
            checkpoint = client.query(
                READ_CHECKPOINT, parameters={"sink": CLICKHOUSE_SINK}
            ).result_rows[0][0]
            present = client.query(PROBES_PRESENT, parameters={"ids": probe_ids}).result_rows
        if int(checkpoint or 0) >= final_lsn or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # a reader holding chDB keeps the stream from writing: let go a while
    return {
        **clickhouse_applied(settings, since, until),
        "missing": len(probe_ids) - int(present[0][0]),
    }


@dataclass(frozen=True)
class Steady:
    run: LatencyRun
    usage: ChildUsage
    clickhouse_applied: dict[str, float | int | None]
    first_batch_ms: dict[str, int]  # the stream's start-up, before the window: per sink

    @property
    def steady_eps(self) -> float:
        """Changes committed in the window over the time until all of them were applied."""
        window = self.run.stopped_at - self.run.started_at + (self.run.drain_s or 0.0)
        return self.run.traffic.changes / window if window > 0 else 0.0


def steady(
    settings: Settings, log: Path, *, rate: float, seconds: float, workers: int, settle_s: float
) -> Steady:
    """The stream tailing at a steady offered load, probed from outside."""
    with tailing_stream(settings, log) as child:
        run = measure_latency(
            settings, rate=rate, seconds=seconds, workers=workers, settle_s=settle_s
        )
        usage = child.stop()
    applied = clickhouse_applied(settings, run.started_at, run.stopped_at)
    return Steady(run, usage, applied, child.first_batches_ms())


def _wait_for_redis(
    settings: Settings, lsn: int, child: StreamChild, timeout_s: float = 120
) -> None:
    client = redis_client(settings.redis_url, settings=settings)
    deadline = time.monotonic() + timeout_s
    try:
        while int(client.get(CHECKPOINT_KEY) or 0) < lsn:
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stream did not apply a probe; see {child.log}")
            time.sleep(0.05)
    finally:
        client.close()


@dataclass(frozen=True)
class Backfill:
    rows_per_s: float | None
    rows: int | None
    day: str | None
    note: str | None


def backfill_rate(settings: Settings, namespace: BenchNamespace) -> Backfill:
    """One day partition (the bench database's busiest UTC day) backfilled into an empty
    scratch chDB, with lib/backfill.py's `backfill_days` (the daily asset's code)."""
    try:
        from engagement_dagster.lib.backfill import backfill_days
    except ImportError as exc:
        return Backfill(None, None, None, f"lib/backfill.py has no backfill_days: {exc}")
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(BUSIEST_DAY)
        row = cur.fetchone()
    if row is None:
        return Backfill(None, None, None, "no events to backfill")
    day: date = row[0]
    scratch = namespace.directory(settings) / "backfill_clickhouse"
    _remove_scratch(settings, namespace, scratch)
    target = settings.model_copy(update={"clickhouse_url": f"chdb://{scratch}"})
    report = backfill_days(target, day, day)
    _remove_scratch(settings, namespace, scratch)
    note = "into an empty embedded ClickHouse, no Kafka replay"
    return Backfill(round(report.rows_per_s), report.rows_read, day.isoformat(), note)


# ---------------------------------------------------------------------------------------------
# The Dagster path: sensor -> run start, and the gap at a handover between two stream runs.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DagsterPath:
    sensor_to_run_start_ms: list[float]
    handover_gaps_ms: list[float]  # longest Redis checkpoint stall across each handover
    slot_gaps_ms: list[float]  # no process holding the slot, at each handover
    runs: int
    note: str | None = None


@dataclass
class SlotHolders:
    """Who holds the slot, sampled every 20 ms: (time.time(), active pid or None)."""

    samples: list[tuple[float, int | None]] = field(default_factory=list)

    def handovers(self) -> list[tuple[float, float]]:
        """(last seen with the old holder, first seen with the new one) per change of holder."""
        found = []
        last_pid, last_seen = None, 0.0
        for at, pid in self.samples:
            if pid is None:
                continue
            if last_pid is not None and pid != last_pid:
                found.append((last_seen, at))
            last_pid, last_seen = pid, at
        return found


def _sample_slot(settings: Settings, holders: SlotHolders, stop: threading.Event) -> None:
    with connect(settings.pg_dsn) as conn:
        while not stop.is_set():
            info = slot_info(conn, settings.slot)
            holders.samples.append((time.time(), info.active_pid if info else None))
            time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dagster_path(
    settings: Settings,
    namespace: BenchNamespace,
    *,
    rate: float,
    run_seconds: int,
    handovers: int,
    timeout_s: float,
    say: Say,
) -> DagsterPath:
    """`make run`'s daemon, code location and generator (lib/supervisor.py) on the bench
    namespace, with stream runs of run_seconds, until `handovers` handovers have happened."""
    import dagster as dg

    from engagement_dagster.lib.supervisor import Platform, PlatformOptions

    class BenchPlatform(Platform):
        @property
        def logs(self) -> Path:
            return namespace.directory(self.settings) / "logs"

    os.environ["ENGAGEMENT_STREAM_RUN_SECONDS"] = str(run_seconds)
    _remove_scratch(settings, namespace, namespace.directory(settings) / "dagster")
    options = PlatformOptions(ui_port=_free_port(), rate=rate)
    bench_platform = BenchPlatform(settings, options, say=say)
    holders, stop = SlotHolders(), threading.Event()
    watchers = Watchers(settings, [], threading.Lock())
    sampler = threading.Thread(target=_sample_slot, args=(settings, holders, stop), daemon=True)
    sampler.start()  # before the platform: a start that fails must reach the `finally` as is
    try:
        bench_platform.start()
        with watchers.running(("redis",)):
            _wait_for_handovers(holders, handovers, timeout_s, bench_platform.check_children)
    finally:
        stop.set()
        bench_platform.stop()
        sampler.join(timeout=10)
    with dg.DagsterInstance.from_config(str(bench_platform.dagster_home)) as instance:
        starts = _sensor_to_run_start_ms(instance)
        runs = len(instance.get_run_records(dg.RunsFilter(job_name="cdc_stream")))
    stalls = [*watchers.redis_stalls, (watchers.redis_last_move, time.time())]
    gaps, slot_gaps = [], []
    for released, taken in holders.handovers()[:handovers]:
        across = [end - begin for begin, end in stalls if begin <= taken and end >= released]
        gaps.append(round(max(across, default=0.0) * 1000, 1))
        slot_gaps.append(round((taken - released) * 1000, 1))
    note = None if len(gaps) >= handovers else f"saw {len(gaps)} of {handovers} handovers"
    return DagsterPath(starts, gaps, slot_gaps, runs, note)


def _wait_for_handovers(
    holders: SlotHolders, wanted: int, timeout_s: float, check: Callable[[], None]
) -> None:
    """Until `wanted` handovers, plus a few seconds of the last successor streaming."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check()
        done = holders.handovers()
        if len(done) >= wanted and time.time() - done[wanted - 1][1] > 5:
            return
        time.sleep(0.5)


def _sensor_to_run_start_ms(instance: Any) -> list[float]:
    """Each sensor-launched cdc_stream run: its tick's time -> its RUN_START (run record)."""
    import dagster as dg

    tick_at: dict[str, float] = {}
    for state in instance.all_instigator_state():
        if state.name != "change_cursor_sensor":
            continue
        for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id):
            for run_id in tick.run_ids:
                tick_at[run_id] = tick.timestamp
    found = []
    for record in instance.get_run_records(dg.RunsFilter(job_name="cdc_stream")):
        run_id = record.dagster_run.run_id
        if record.start_time is not None and run_id in tick_at:
            found.append(round((record.start_time - tick_at[run_id]) * 1000, 1))
    return found


# ---------------------------------------------------------------------------------------------
# The whole bench, the load test, and what they print.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    backlog: int = 500_000
    rate: float = 5_000.0
    seconds: float = 60.0
    workers: int = 4  # generator connections, for the backlog and the steady load
    settle_s: float = 20.0
    dagster: bool = True
    dagster_run_seconds: int = 40
    handovers: int = 2
    dagster_timeout_s: float = 420.0
    keep_data: bool = False


def machine() -> dict[str, object]:
    meminfo = Path("/proc/meminfo").read_text().split()
    memory_kib = int(meminfo[meminfo.index("MemTotal:") + 1])

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024**2, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "--short", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _rate(count: int, seconds: float) -> int | None:
    return round(count / seconds) if seconds > 0 else None


def _busy_pct(cpu_s: dict[str, float | None], wall_s: float) -> float | None:
    """The share of the machine's cores the catch-up's processes kept busy."""
    cores = os.cpu_count() or 1
    return round(100 * (cpu_s["total"] or 0.0) / (wall_s * cores), 1) if wall_s > 0 else None


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def run_bench(namespace: BenchNamespace, options: BenchOptions, say: Say) -> dict[str, Any]:
    """Every figure of `make bench`, as one JSON-ready dict. Leaves no slot behind."""
    settings = enter_namespace(namespace)
    logs = namespace.directory(settings) / "logs"
    result: dict[str, Any] = {"benchmark": "engagement", "run_id": namespace.run_id}
    say(f"namespace: database {namespace.database}, Redis db {namespace.redis_db}, ...")
    reset_namespace(settings, namespace)
    try:
        seed_content(settings.pg_dsn, 500, seed=1)
        say(f"generating a backlog of {options.backlog:,} changes (stream down)")
        backlog = generate_backlog(settings, options.backlog, options.workers)
        target = current_wal_lsn(settings.pg_dsn)
        say(f"  {backlog.changes:,} changes in {backlog.elapsed_s:.1f}s; raw decode")
        decoded = raw_decode(settings, target)
        say(f"  {decoded.changes:,} changes decoded in {decoded.seconds:.2f}s; catch-up")
        caught = catch_up(settings, logs / "catchup.log")
        catchup_eps = decoded.changes / caught.usage.wall_s
        say(f"  caught up in {caught.usage.wall_s:.1f}s; steady {options.rate:g}/s")
        held = steady(
            settings,
            logs / "steady.log",
            rate=options.rate,
            seconds=options.seconds,
            workers=options.workers,
            settle_s=options.settle_s,
        )
        say("  backfill of one day partition")
        backfill = backfill_rate(settings, namespace)
        dagster = (
            dagster_path(
                settings,
                namespace,
                rate=options.rate,
                run_seconds=options.dagster_run_seconds,
                handovers=options.handovers,
                timeout_s=options.dagster_timeout_s,
                say=say,
            )
            if options.dagster
            else None
        )
    finally:
        release_namespace(settings, namespace, keep_data=options.keep_data)
    result.update(
        {
            "catchup_eps": round(catchup_eps),
            "raw_decode_eps": round(decoded.eps),
            "efficiency": round(catchup_eps / decoded.eps, 3) if decoded.eps else None,
            "backlog_changes": decoded.changes,
            "catchup_changes": caught.usage.changes,
            "backlog_generated_eps": round(backlog.events_per_s),
            # Without the child's start-up (imports, sinks, replication) and its first batch:
            "catchup_eps_after_first_batch": _rate(
                decoded.changes, caught.usage.wall_s - (caught.first_batch_s or 0.0)
            ),
            "catchup_s": round(caught.usage.wall_s, 2),
            "catchup_first_batch_s": caught.first_batch_s,
            "raw_decode_s": round(decoded.seconds, 2),
            "rss_mb": caught.usage.rss_mb,
            "rss_mb_largest_process": caught.usage.largest_rss_mb,
            "rss_private_mb": caught.usage.private_mb,
            "rss_mb_stream_process": caught.usage.stream_rss_mb,
            "cpu_pct": caught.usage.cpu_pct,
            "catchup_cpu_s": caught.cpu_s,
            "catchup_machine_busy_pct": _busy_pct(caught.cpu_s, caught.usage.wall_s),
            "steady_eps": round(held.steady_eps),
            "offered_eps": round(held.run.traffic.events_per_s),
            "latency_ms": {**held.run.latency_ms, "clickhouse_applied": held.clickhouse_applied},
            "latency_note": CLICKHOUSE_APPLIED_NOTE,
            "steady_first_batch_ms": held.first_batch_ms,
            "steady_drain_s": held.run.drain_s,
            "steady_probes": held.run.probes,
            "steady_rss_mb": held.usage.rss_mb,
            "steady_cpu_pct": held.usage.cpu_pct,
            "backfill_rows_per_s": backfill.rows_per_s,
            "backfill_rows": backfill.rows,
            "backfill_day": backfill.day,
            "backfill_note": backfill.note,
            "sensor_to_run_start_ms": _median(dagster.sensor_to_run_start_ms) if dagster else None,
            "sensor_to_run_start_ms_all": dagster.sensor_to_run_start_ms if dagster else [],
            "handover_gap_ms": max(dagster.handover_gaps_ms, default=None) if dagster else None,
            "handover_gaps_ms": dagster.handover_gaps_ms if dagster else [],
            "slot_handover_gaps_ms": dagster.slot_gaps_ms if dagster else [],
            "dagster_note": (dagster.note if dagster else "skipped (--no-dagster)"),
            "settings": {
                "backlog": options.backlog,
                "rate": options.rate,
                "seconds": options.seconds,
                "namespace": namespace.name,
                "redis_db": namespace.redis_db,
                "clickhouse_hold_seconds": settings.clickhouse_hold_seconds,
                "kafka_client": settings.kafka_client,
                "dagster_run_seconds": options.dagster_run_seconds if options.dagster else None,
            },
            "machine": machine(),
        }
    )
    return result


@dataclass(frozen=True)
class LoadOptions:
    rate: float = 10_000.0
    seconds: float = 600.0
    sample_every_s: float = 5.0
    workers: int = 4
    drain_timeout_s: float = 300.0
    keep_data: bool = False


def run_load(namespace: BenchNamespace, options: LoadOptions, say: Say) -> dict[str, Any]:
    """`make load`: `rate` changes/s offered for `seconds` to a tailing stream; slot lag and
    stream RSS sampled over time, then how long the stream takes to drain what is left."""
    settings = enter_namespace(namespace)
    logs = namespace.directory(settings) / "logs"
    reset_namespace(settings, namespace)
    samples: list[dict[str, float | int | None]] = []
    try:
        seed_content(settings.pg_dsn, 500, seed=1)
        with tailing_stream(settings, logs / "load.log") as child:  # RSS is the stream's
            say(f"offering {options.rate:g} changes/s for {options.seconds:g}s")
            traffic_options = TrafficOptions(
                rate=options.rate,
                duration_s=options.seconds,
                workers=options.workers,
                invalid_ratio=INVALID_RATIO,
            )
            started = time.monotonic()
            traffic, reports = offer_traffic(settings, traffic_options, threading.Event())
            while traffic.is_alive():
                samples.append(_load_sample(settings, child, started))
                say(f"  {samples[-1]}")
                traffic.join(timeout=options.sample_every_s)
            if child.poll() is not None:
                raise RuntimeError(f"the stream exited under load; see {child.log}")
            drain_started = time.monotonic()
            drain_s = _drain(settings, options.drain_timeout_s)
            samples.append(_load_sample(settings, child, started))
            usage = child.stop()
    finally:
        release_namespace(settings, namespace, keep_data=options.keep_data)
    if not reports:
        raise RuntimeError("traffic generation failed")
    lags = [int(s["lag_bytes"]) for s in samples if s["lag_bytes"] is not None]
    rss = [float(s["rss_mb"]) for s in samples if s["rss_mb"] is not None]
    quarter = max(1, len(rss) // 4)
    return {
        "benchmark": "engagement-load",
        "run_id": namespace.run_id,
        "offered_rate": options.rate,
        "offered_eps": round(reports[0].events_per_s),
        "changes": reports[0].changes,
        "seconds": round(reports[0].elapsed_s, 1),
        "applied_eps": round((usage.changes or 0) / (drain_started - started + (drain_s or 0))),
        "max_lag_bytes": max(lags, default=None),
        "final_lag_bytes": lags[-1] if lags else None,
        "drain_s": drain_s,
        "rss_mb_first_quarter": round(statistics.mean(rss[:quarter]), 1) if rss else None,
        "rss_mb_last_quarter": round(statistics.mean(rss[-quarter:]), 1) if rss else None,
        "rss_mb": usage.rss_mb,
        "cpu_pct": usage.cpu_pct,
        "samples": samples,
        "settings": {
            "namespace": namespace.name,
            "redis_db": namespace.redis_db,
            "workers": options.workers,
            "kafka_client": settings.kafka_client,
        },
        "machine": machine(),
    }


def _load_sample(settings: Settings, child: StreamChild, started: float) -> dict[str, Any]:
    with connect(settings.pg_dsn) as conn:
        info = slot_info(conn, settings.slot)
    return {
        "t_s": round(time.monotonic() - started, 1),
        "lag_bytes": info.lag_bytes if info else None,
        "rss_mb": child.rss_mb(),
    }


def _drain(settings: Settings, timeout_s: float) -> float | None:
    """Seconds until Redis holds everything committed so far (None: not within timeout_s)."""
    target = commit_probe(settings.pg_dsn, str(uuid.uuid4())).lsn
    client = redis_client(settings.redis_url, settings=settings)
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s:
            if int(client.get(CHECKPOINT_KEY) or 0) >= target:
                return round(time.monotonic() - started, 2)
            time.sleep(0.1)
    finally:
        client.close()
    return None


def save_result(result: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    suffix = "-load" if result.get("benchmark") == "engagement-load" else ""
    path = directory / f"{stamp}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) < 10:
        return f"{value:.3g}"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
    return str(value)


def bench_table(result: dict[str, Any]) -> Table:
    """The figures a person reads, with the issue's targets beside them."""
    table = Table(title=f"engagement bench {result['run_id']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target (2 cores)")
    rows: list[tuple[str, object, str]] = [
        ("catchup_eps", result["catchup_eps"], ">= 50,000"),
        ("  after start-up and first batch", result["catchup_eps_after_first_batch"], ""),
        ("raw_decode_eps", result["raw_decode_eps"], ""),
        ("efficiency", result["efficiency"], ">= 0.3"),
        ("rss_mb (catch-up peak)", result["rss_mb"], "< 600"),
        ("  of it not mapped from files", result["rss_private_mb"], ""),
        ("  the stream process alone (no sink process)", result["rss_mb_stream_process"], ""),
        ("cpu_pct (catch-up)", result["cpu_pct"], ""),
        ("machine busy % (catch-up, all processes)", result["catchup_machine_busy_pct"], ""),
        *((f"  CPU s: {name}", value, "") for name, value in result["catchup_cpu_s"].items()),
        ("steady_eps", result["steady_eps"], f"offered {result['settings']['rate']:,.0f}"),
    ]
    for sink, target in (("redis", "< 1,000"), ("kafka", ""), ("clickhouse", "< 2,000"),
                         ("clickhouse_applied", "< 2,000")):  # fmt: skip
        figures = result["latency_ms"][sink]
        rows.append((f"{sink} p50 / p99 ms", f"{_fmt(figures['p50'])} / {_fmt(figures['p99'])}",
                     f"p99 {target}" if target else ""))  # fmt: skip
    rows += [
        ("backfill_rows_per_s", result["backfill_rows_per_s"], ">= 200,000"),
        ("sensor_to_run_start_ms (median)", result["sensor_to_run_start_ms"], ""),
        ("handover_gap_ms (max)", result["handover_gap_ms"], "< 1,000"),
    ]
    for name, value, target in rows:
        table.add_row(name, _fmt(value), target)
    return table


LOAD_FIGURES = (
    "offered_rate",
    "offered_eps",
    "applied_eps",
    "max_lag_bytes",
    "final_lag_bytes",
    "drain_s",
    "rss_mb_first_quarter",
    "rss_mb_last_quarter",
    "rss_mb",
    "cpu_pct",
)


def load_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"engagement load {result['run_id']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in LOAD_FIGURES:
        table.add_row(key, _fmt(result[key]))
    return table
