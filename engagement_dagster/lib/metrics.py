"""Prometheus metrics of every process, served by one long-lived exporter on 127.0.0.1:9108.

Stream runs are short-lived processes: the Dagster daemon launches one every few minutes. So a
run does not serve its own metrics (Prometheus would miss whatever it counted after the last
scrape, and a run's end would reset every counter). Instead every process writes its metrics to
memory-mapped files in `ENGAGEMENT_METRICS_DIR` (prometheus_client's multiprocess mode), and
the exporter (`engagement metrics`, which `make run` starts) serves the sum over all processes,
running or gone. A counter a run increments just before it exits is already in its file, so
nothing is lost between runs or between scrapes. The exporter folds the files of processes that
have ended into one archive file per type, so the directory does not grow with every run.

What exists only at scrape time (slot lag and wal_status, each sink's lag in bytes, the live
board) the exporter reads from PostgreSQL and Redis on every scrape, so those values are right
even while no stream run is alive.

The directory is fixed when this module is first imported: set ENGAGEMENT_METRICS_DIR before.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg2
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from engagement_dagster.lib.secure import pg_connect, redis_client
from engagement_dagster.lib.settings import Settings, get_settings

log = logging.getLogger("engagement.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SINKS = ("clickhouse", "redis", "kafka")
WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")
TOP_CONTENT = 10  # items of the live board exported (a bounded set of content_id labels)


def _activate(directory: Path) -> None:
    """Every metric below writes to files in `directory` (multiprocess mode), whatever the order
    of imports: prometheus_client picks its value class from the environment at import time."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.get_value_class()


METRICS_DIR = get_settings().metrics_dir
_activate(METRICS_DIR)

# Seconds from a change's commit to its sink's write: 50 ms to 5 minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 10, 100, 500, 1_000, 5_000, 10_000, 20_000, 50_000)

# The stream: what it read from the slot.
CHANGES_READ = Counter(
    "engagement_changes_read",
    "Row changes read from the replication slot, by table and operation.",
    ["table", "op"],
)
BATCH_ROWS = Histogram(
    "engagement_batch_rows",
    "Changes per micro-batch of whole transactions.",
    buckets=BATCH_BUCKETS,
)
STREAM_READ_LSN = Gauge(
    "engagement_stream_read_lsn",
    "Commit LSN of the last change the stream read from the slot.",
    multiprocess_mode="mostrecent",
)
STREAM_ACKED_LSN = Gauge(
    "engagement_stream_acked_lsn",
    "LSN up to which the stream acknowledged the slot (the lowest sink checkpoint).",
    multiprocess_mode="mostrecent",
)

# Each sink.
SINK_ROWS = Counter(
    "engagement_sink_rows_applied",
    "Enriched rows written by each sink (retractions and dead letters not included).",
    ["sink"],
)
SINK_BATCHES = Counter(
    "engagement_sink_batches_applied", "Writes applied by each sink (merged batches).", ["sink"]
)
SINK_LATENCY = Histogram(
    "engagement_sink_latency_seconds",
    "End-to-end latency per micro-batch: PostgreSQL commit of its last change to the sink's "
    "write applied.",
    ["sink"],
    buckets=LATENCY_BUCKETS,
)
SINK_LAST_LATENCY = Gauge(
    "engagement_sink_last_latency_seconds",
    "Commit-to-applied latency of the sink's last write.",
    ["sink"],
    multiprocess_mode="mostrecent",
)
SINK_RETRIES = Counter(
    "engagement_sink_retries", "Attempts retried after a sink error, by sink.", ["sink"]
)
SINK_ERRORS = Counter(
    "engagement_sink_errors",
    "Sink errors by sink and exception class.",
    ["sink", "error"],
)
SINK_REPLAYS = Counter(
    "engagement_sink_replays",
    "Times a sink fell so far behind that its queue was dropped and it replayed from the slot.",
    ["sink"],
)
SINK_UP = Gauge(
    "engagement_sink_up",
    "1 while the sink applies writes, 0 while its writes fail or one hangs (over 2 s); live "
    "stream processes only.",
    ["sink"],
    multiprocess_mode="livemostrecent",
)
SINK_QUEUED_ROWS = Gauge(
    "engagement_sink_queued_rows",
    "Rows waiting in memory for the sink (live stream processes).",
    ["sink"],
    multiprocess_mode="livesum",
)
SINK_CHECKPOINT_LSN = Gauge(
    "engagement_sink_checkpoint_lsn",
    "The sink's checkpoint: the commit LSN up to which it holds every change.",
    ["sink"],
    multiprocess_mode="mostrecent",
)
SINK_LAST_APPLIED = Gauge(
    "engagement_sink_last_applied_timestamp_seconds",
    "Unix time of the sink's last applied write.",
    ["sink"],
    multiprocess_mode="mostrecent",
)

# Validation and enrichment.
DEAD_LETTERS = Counter(
    "engagement_dead_letters",
    "Changes routed to the dead letters (engagement.dead_letters, engagement.dlq.v1) by reason.",
    ["reason"],
)
UNKNOWN_CONTENT = Counter(
    "engagement_unknown_content_events",
    "Valid events whose content_id is not in the content table (content fields NULL).",
)
ENRICHED_EVENTS = Counter(
    "engagement_enriched_events",
    "Enriched events (inserts and updates' new images) by content type and event type.",
    ["content_type", "event_type"],
)
ENGAGEMENT_SECONDS = Counter(
    "engagement_engagement_seconds",
    "Engagement seconds of enriched events (inserts and updates' new images) by content type.",
    ["content_type"],
)

# Runs.
STREAM_RUNS = Counter("engagement_stream_runs", "Stream runs started (CLI or Dagster).")
STREAM_HANDOVERS = Counter(
    "engagement_stream_handovers", "Runs that ended by handing the slot to a waiting successor."
)
STREAM_RUNNING = Gauge(
    "engagement_stream_running",
    "Stream processes currently running (0 or 1; 2 only during a handover).",
    multiprocess_mode="livesum",
)
SLOT_WAIT = Histogram(
    "engagement_stream_slot_wait_seconds",
    "How long a starting run waited for the slot to be free.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 180),
)

# Each process of the platform that does stream work.
PROCESS_RSS = Gauge(
    "engagement_process_resident_memory_bytes",
    "Resident memory of each live stream process (label pid).",
    ["role"],
    multiprocess_mode="liveall",
)
PROCESS_CPU = Counter(
    "engagement_process_cpu_seconds",
    "CPU time (user and system) of stream processes, summed over every run.",
    ["role"],
)


class ProcessSampler:
    """Samples this process's CPU time and resident memory into the process metrics."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._process = psutil.Process()
        self._cpu_counted = 0.0

    def sample(self) -> None:
        times = self._process.cpu_times()
        cpu = times.user + times.system
        PROCESS_CPU.labels(self.role).inc(max(0.0, cpu - self._cpu_counted))
        self._cpu_counted = cpu
        PROCESS_RSS.labels(self.role).set(self._process.memory_info().rss)


# --- the exporter ---------------------------------------------------------------------------

# Metrics computed at scrape time, by the exporter: their names, for dashboards and tests.
SCRAPE_TIME_METRICS = (
    "engagement_slot_exists",
    "engagement_slot_active",
    "engagement_slot_lag_bytes",
    "engagement_slot_retained_wal_bytes",
    "engagement_slot_safe_wal_size_bytes",
    "engagement_slot_wal_status",
    "engagement_source_wal_lsn",
    "engagement_sink_lag_bytes",
    "engagement_top_content_engagement_seconds",
    "engagement_top_content_events",
    "engagement_exporter_source_up",
)

SLOT_QUERY = """
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
       s.active,
       s.active_pid,
       s.wal_status,
       s.safe_wal_size,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint
FROM (SELECT 1) AS one
LEFT JOIN pg_replication_slots AS s ON s.slot_name = %s
"""


@dataclass(frozen=True)
class SlotReading:
    """The slot as PostgreSQL reports it now; `exists` False leaves the rest None."""

    wal_lsn: int
    exists: bool
    active: bool | None = None
    active_pid: int | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None
    lag_bytes: int | None = None
    retained_bytes: int | None = None


def read_slot(settings: Settings) -> SlotReading:
    conn = pg_connect(
        settings.pg_dsn, settings=settings, connect_timeout=3, application_name="engagement-metrics"
    )
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(SLOT_QUERY, (settings.slot,))
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None  # the LEFT JOIN always returns one row
    wal_lsn, active, active_pid, wal_status, safe_wal_size, lag, retained = row
    if active is None:
        return SlotReading(wal_lsn, exists=False)
    return SlotReading(wal_lsn, True, active, active_pid, wal_status, safe_wal_size, lag, retained)


@dataclass(frozen=True)
class _FileName:
    """`{type}_{pid}.db` or `gauge_{mode}_{pid}.db`, as prometheus_client names its files."""

    path: str
    kind: str  # counter, histogram, or gauge_{mode}
    owner: str  # a pid, or "archive"

    @classmethod
    def parse(cls, path: str) -> _FileName:
        stem = os.path.basename(path)[: -len(".db")]
        kind, _, owner = stem.rpartition("_")
        return cls(path, kind, owner)

    @property
    def alive(self) -> bool:
        return self.owner.isdigit() and psutil.pid_exists(int(self.owner))


def fold_dead_processes(directory: Path) -> int:
    """Fold the metric files of processes that have ended into one archive per kind; returns
    how many files were folded. Counters and histograms are summed; `mostrecent` gauges keep the
    newest value; `live*` gauges of dead processes are dropped, as their mode says.

    Call it through `read_all`, which holds the fold lock: a read never sees a value twice.
    """
    dead: dict[str, list[str]] = {}
    for path in glob.glob(str(directory / "*.db")):
        name = _FileName.parse(path)
        if name.owner == "archive" or name.alive:
            continue
        dead.setdefault(name.kind, []).append(path)
    folded = 0
    for kind, paths in dead.items():
        if kind.startswith("gauge_live"):
            for path in paths:
                os.remove(path)
            folded += len(paths)
            continue
        if kind not in ("counter", "histogram", "gauge_mostrecent"):
            continue  # modes this module never uses are left alone
        archive = directory / f"{kind}_archive.db"
        merged: dict[str, tuple[float, float]] = {}
        sources = [str(archive), *paths] if archive.exists() else paths
        for path in sources:
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
                if kind == "gauge_mostrecent":
                    if key not in merged or timestamp >= merged[key][1]:
                        merged[key] = (value, timestamp)
                else:
                    merged[key] = (merged.get(key, (0.0, 0.0))[0] + value, 0.0)
        staging = directory / f"{kind}_archive.db.new"  # not *.db: never read half-written
        staging.unlink(missing_ok=True)
        out = MmapedDict(str(staging))
        for key, (value, timestamp) in merged.items():
            out.write_value(key, value, timestamp)
        out.close()
        os.replace(staging, archive)
        for path in paths:
            os.remove(path)
        folded += len(paths)
    return folded


@contextmanager
def _folding(directory: Path) -> Iterator[None]:
    """Exclusive across processes (the exporter, `engagement status`): a read never sees a file
    and the archive it is being folded into."""
    with open(directory / ".fold.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_all(directory: Path = METRICS_DIR) -> list[Metric]:
    """Every process's metrics, live and ended, summed as their multiprocess modes say."""
    with _folding(directory):
        try:
            fold_dead_processes(directory)
        except OSError as exc:  # a read still serves what it can
            log.warning("folding metric files of ended processes failed: %s", exc)
        files = glob.glob(str(directory / "*.db"))
        return list(MultiProcessCollector.merge(files, accumulate=True))


def _gauge(name: str, documentation: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


class PlatformCollector:
    """What the exporter serves: every process's metrics (live and archived), plus what only
    PostgreSQL and Redis know at scrape time."""

    def __init__(self, settings: Settings, directory: Path | None = None) -> None:
        self.settings = settings
        self.directory = directory or settings.metrics_dir
        self._redis = redis_client(settings.redis_url, settings=settings, socket_timeout=2)

    def collect(self) -> Iterator[Metric]:
        merged = read_all(self.directory)
        yield from merged
        up = _gauge(
            "engagement_exporter_source_up",
            "1 when the exporter's last read of a source of scrape-time metrics succeeded.",
            ["source"],
        )
        checkpoints = {
            sample.labels["sink"]: sample.value
            for metric in merged
            if metric.name == "engagement_sink_checkpoint_lsn"
            for sample in metric.samples
        }
        try:
            yield from self._slot_metrics(checkpoints)
            up.add_metric(["postgres"], 1)
        except psycopg2.Error as exc:
            log.warning("slot metrics unavailable: %s", exc)
            up.add_metric(["postgres"], 0)
        try:
            yield from self._board_metrics()
            up.add_metric(["redis"], 1)
        except redis.RedisError as exc:
            log.warning("live board metrics unavailable: %s", exc)
            up.add_metric(["redis"], 0)
        yield up

    def _slot_metrics(self, checkpoints: dict[str, float]) -> Iterator[Metric]:
        slot = self.settings.slot
        reading = read_slot(self.settings)
        wal_lsn = reading.wal_lsn
        source = _gauge(
            "engagement_source_wal_lsn", "PostgreSQL's current WAL position (pg_current_wal_lsn)."
        )
        source.add_metric([], wal_lsn)
        yield source
        exists = _gauge("engagement_slot_exists", "1 when the replication slot exists.", ["slot"])
        exists.add_metric([slot], int(reading.exists))
        yield exists
        sink_lag = _gauge(
            "engagement_sink_lag_bytes",
            "WAL bytes between PostgreSQL's current position and the sink's checkpoint.",
            ["sink"],
        )
        for sink, lsn in sorted(checkpoints.items()):
            sink_lag.add_metric([sink], max(0.0, wal_lsn - lsn))
        yield sink_lag
        if not reading.exists:
            return  # no slot: nothing more to say about it (slot_exists 0 alerts)
        for name, doc, value in (
            (
                "engagement_slot_active",
                "1 while a stream run consumes the slot.",
                int(bool(reading.active)),
            ),
            (
                "engagement_slot_lag_bytes",
                "WAL bytes not yet confirmed by the slot's consumer.",
                reading.lag_bytes,
            ),
            (
                "engagement_slot_retained_wal_bytes",
                "WAL bytes the slot keeps on disk (from its restart_lsn).",
                reading.retained_bytes,
            ),
            (
                "engagement_slot_safe_wal_size_bytes",
                "WAL bytes that can still be written before the slot is in danger of being "
                "lost (max_slot_wal_keep_size); absent when unlimited.",
                reading.safe_wal_size,
            ),
        ):
            if value is None:
                continue
            family = _gauge(name, doc, ["slot"])
            family.add_metric([slot], value)
            yield family
        status = _gauge(
            "engagement_slot_wal_status",
            "1 for the slot's current wal_status (reserved, extended, unreserved or lost).",
            ["slot", "status"],
        )
        for candidate in WAL_STATUSES:
            status.add_metric([slot, candidate], int(reading.wal_status == candidate))
        yield status

    def _board_metrics(self) -> Iterator[Metric]:
        from engagement_dagster.lib.board import fetch_live

        data = fetch_live(self._redis)
        ranked = sorted(data.seconds.items(), key=lambda item: (-item[1], item[0]))
        seconds = _gauge(
            "engagement_top_content_engagement_seconds",
            f"The live 10-minute board's top {TOP_CONTENT}: engagement seconds by rank.",
            ["rank", "content_id"],
        )
        events = _gauge(
            "engagement_top_content_events",
            f"The live 10-minute board's top {TOP_CONTENT} (by seconds): events by rank.",
            ["rank", "content_id"],
        )
        for rank, (content_id, value) in enumerate(ranked[:TOP_CONTENT], start=1):
            seconds.add_metric([str(rank), content_id], value)
            events.add_metric([str(rank), content_id], data.events.get(content_id) or 0)
        yield seconds
        yield events


def exporter_registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlatformCollector(settings))
    return registry


def metric_names() -> frozenset[str]:
    """Every metric family the exporter can serve, as PromQL names it (counters with _total,
    histograms with _bucket, _sum and _count): what dashboards and alert rules may query."""
    names: set[str] = set(SCRAPE_TIME_METRICS)
    for metric in _STREAM_METRICS:
        for family in metric.describe():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}_{part}" for part in ("bucket", "sum", "count"))
            else:
                names.add(family.name)
    return frozenset(names)


_STREAM_METRICS = (
    CHANGES_READ,
    BATCH_ROWS,
    STREAM_READ_LSN,
    STREAM_ACKED_LSN,
    SINK_ROWS,
    SINK_BATCHES,
    SINK_LATENCY,
    SINK_LAST_LATENCY,
    SINK_RETRIES,
    SINK_ERRORS,
    SINK_REPLAYS,
    SINK_UP,
    SINK_QUEUED_ROWS,
    SINK_CHECKPOINT_LSN,
    SINK_LAST_APPLIED,
    DEAD_LETTERS,
    UNKNOWN_CONTENT,
    ENRICHED_EVENTS,
    ENGAGEMENT_SECONDS,
    STREAM_RUNS,
    STREAM_HANDOVERS,
    STREAM_RUNNING,
    SLOT_WAIT,
    PROCESS_RSS,
    PROCESS_CPU,
)


def serve(settings: Settings, stop: threading.Event) -> None:
    """Serve every process's metrics on settings.metrics_host:metrics_port until `stop`."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_host, registry=exporter_registry(settings)
    )
    log.info(
        "metrics of %s on http://%s:%d/metrics",
        settings.metrics_dir, settings.metrics_host, settings.metrics_port,
    )  # fmt: skip
    try:
        stop.wait()
    finally:
        server.shutdown()
        thread.join(timeout=5)
