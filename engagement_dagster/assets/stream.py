"""The change stream as assets: the enriched stream and its three sinks, run by job `cdc_stream`.

Wiring only: the stream itself is lib/stream.py built by lib/pipeline.py; this module never
decodes, enriches or writes a row. Dagster sees the run through materializations per report.
"""

# No `from __future__ import annotations`: Dagster must see the real context annotation.

import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from engagement_dagster.assets.sources import content_source, engagement_events_source
from engagement_dagster.lib.change_cursor import SlotBusy
from engagement_dagster.lib.pgoutput import format_lsn
from engagement_dagster.lib.pipeline import build_stream
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import (
    SlotInfo,
    connect,
    slot_info,
    successor_application_name,
)
from engagement_dagster.lib.stream import Stream, StreamOptions, StreamReport
from engagement_dagster.resources import (
    ClickHouseResource,
    KafkaResource,
    PostgresResource,
    RedisResource,
)

# Run tags (namespaced): what the sensor reads to keep exactly one stream consuming.
STREAM_TAG = "engagement/stream"
SLOT_TAG = "engagement/slot"
ENDS_AT_TAG = "engagement/stream_ends_at"  # ISO time, set as the run opens the free slot
SUCCESSOR_OF_TAG = "engagement/successor_of"

# What the materializations and observations carry: plain values Dagster renders and plots.
MetadataScalar = str | int | float | bool | None

SLOT_POLL_S = 0.05  # while a successor waits: the handover gap is at most this plus the open
STOP_JOIN_S = 120.0  # after termination: time for the stream to finish its batch and close
IDLE_WAKE_S = 0.5  # the op thread polls the stream thread's events this often

# The stream reports every 30 s while it runs: five quiet minutes mean no run is consuming.
STREAM_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=timedelta(minutes=5), warn_window=timedelta(minutes=1)
)

enriched_engagements = dg.AssetSpec(
    key=["engagement", "enriched_engagements"],
    deps=[content_source, engagement_events_source],
    group_name="stream",
    kinds={"polars"},
    skippable=True,
    description="The change stream decoded from the slot, enriched with content and validated "
    "(DESIGN §5), in micro-batches of whole transactions; lives in the stream run only.",
)
# The warehouse table is the daily-partitioned asset of assets/history.py (backfills); the
# stream reports its materializations for today's partition instead of owning an output.
CLICKHOUSE_ENRICHED_KEY = dg.AssetKey(["clickhouse", "enriched_engagements"])
redis_live_board = dg.AssetSpec(
    key=["redis", "engagement_live_board"],
    deps=[enriched_engagements],
    group_name="stream",
    kinds={"redis"},
    skippable=True,
    freshness_policy=STREAM_FRESHNESS,
    description="The live boards engagement:top:10m (seconds) and engagement:top:10m:events, "
    "applied atomically per batch with the Redis checkpoint.",
)
kafka_enriched_v1 = dg.AssetSpec(
    key=["kafka", "engagement_enriched_v1"],
    deps=[enriched_engagements],
    group_name="stream",
    kinds={"kafka"},
    skippable=True,
    freshness_policy=STREAM_FRESHNESS,
    description="Topic engagement.enriched.v1 (key content_id) and engagement.dlq.v1, one "
    "Kafka transaction per batch; read with isolation.level=read_committed.",
)

# The stream's sink names (lib/sinks/*.py SINK_NAME) and the asset each one feeds.
SINK_ASSETS: Mapping[str, dg.AssetKey] = {
    "clickhouse": CLICKHOUSE_ENRICHED_KEY,
    "redis": redis_live_board.key,
    "kafka": kafka_enriched_v1.key,
}
# What the stream's multi-asset (and so job cdc_stream) defines, and what each run reports.
STREAM_SPECS: Sequence[dg.AssetSpec] = [enriched_engagements, redis_live_board, kafka_enriched_v1]
REPORTED_KEYS: Sequence[dg.AssetKey] = [enriched_engagements.key, *SINK_ASSETS.values()]


class StreamRunConfig(dg.Config):
    """Run config of one stream run; resources (and so the environment) give the rest."""

    run_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Tail this long after taking the slot, then exit cleanly "
        "(default: $ENGAGEMENT_STREAM_RUN_SECONDS).",
    )
    linger_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Once caught up, exit after this long; 0 = at once (one run per backlog); "
        "unset = tail until run_seconds.",
    )
    batch_max_ms: int = Field(default=200, ge=1, description="Cut a batch this often ...")
    batch_max_rows: int = Field(default=20_000, ge=1, description="... or at this many rows.")
    report_every_s: float = Field(
        default=30.0, gt=0, description="At most one materialization per asset this often."
    )
    slot_wait_seconds: float = Field(
        default=180.0,
        ge=0,
        description="A successor waits this long for the run before it to release the slot.",
    )
    handover_grace_seconds: float = Field(
        default=120.0,
        ge=0,
        description="After run_seconds, stream on until a successor waits for the slot, at most "
        "this long: the handover then never waits for a slow run launch. 0: end at run_seconds.",
    )
    handover_restart_wait_seconds: float = Field(
        default=20.0,
        ge=0,
        description="Once a successor waits, stream on up to this long until the slot's restart "
        "point is within 4 MB of what was confirmed (PostgreSQL 15 moves it every 15 s), so the "
        "successor does not re-decode up to 15 s of WAL before its first batch. 0: at once.",
    )

    def stream_options(self, settings: Settings) -> StreamOptions:
        run_seconds = self.run_seconds
        return StreamOptions(
            batch_max_ms=self.batch_max_ms,
            batch_max_rows=self.batch_max_rows,
            run_seconds=float(settings.stream_run_seconds if run_seconds is None else run_seconds),
            linger_seconds=self.linger_seconds,
            report_every_s=self.report_every_s,
            handover_grace_seconds=self.handover_grace_seconds,
            handover_restart_wait_seconds=self.handover_restart_wait_seconds,
        )


def stream_settings(
    postgres: PostgresResource,
    clickhouse: ClickHouseResource,
    redis: RedisResource,
    kafka: KafkaResource,
) -> Settings:
    """One Settings from the four resources: each owns its system's fields, env fills the rest."""
    return postgres.settings.model_copy(
        update={
            "redis_url": redis.settings.redis_url,
            "clickhouse_url": clickhouse.settings.clickhouse_url,
            "kafka_bootstrap": kafka.settings.kafka_bootstrap,
            "kafka_security_protocol": kafka.settings.kafka_security_protocol,
        }
    )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def report_metadata(
    report: StreamReport, *, rows_per_s: float | None = None
) -> dict[dg.AssetKey, dict[str, MetadataScalar]]:
    """What each stream asset's materialization carries, from one report of the run so far."""
    lsn_range: dict[str, MetadataScalar] = {
        "first_lsn": format_lsn(report.first_lsn) if report.first_lsn else "",
        "last_lsn": format_lsn(report.last_lsn),
        "last_lsn_int": report.last_lsn,
        "acknowledged_lsn": format_lsn(report.acknowledged_lsn),
        "acknowledged_lsn_int": report.acknowledged_lsn,
    }
    stream: dict[str, MetadataScalar] = {
        "rows": report.rows,
        "changes": report.changes,
        "transactions": report.transactions,
        "batches": report.batches,
        "dead_letters": report.dead_letters,
        "unknown_content": report.unknown_content,
        "caught_up": report.caught_up,
        **lsn_range,
    }
    if rows_per_s is not None:
        stream["rows_per_s"] = round(rows_per_s, 1)
    result = {enriched_engagements.key: stream}
    for sink, key in SINK_ASSETS.items():
        metadata: dict[str, MetadataScalar] = {
            "rows": report.rows,
            "batches": report.batches,
            **lsn_range,
        }
        if sink != "redis":  # Redis keeps aggregates only; the others store the letters
            metadata["dead_letters"] = report.dead_letters
        latencies = report.latencies_ms.get(sink) or []
        if latencies:  # commit in PostgreSQL -> applied in the sink, over this run's batches
            metadata["latency_p50_ms"] = round(percentile(latencies, 50), 1)
            metadata["latency_p99_ms"] = round(percentile(latencies, 99), 1)
        error = report.sink_errors.get(sink)
        metadata["sink_error"] = error or ""
        result[key] = metadata
    return result


@dataclass(frozen=True)
class _Opening:
    """The stream thread is about to take the slot."""

    at: datetime


@dataclass(frozen=True)
class _Reported:
    metadata: dict[dg.AssetKey, dict[str, MetadataScalar]]


class _Finished:
    """The stream thread is done (its result or error is on the thread)."""


_Event = _Opening | _Reported | _Finished


class _StreamThread(threading.Thread):
    """Runs the stream off the op's thread: Dagster interrupts that thread to terminate a run,
    and the stream must instead finish its batch, checkpoint and release the slot."""

    def __init__(
        self, stream: Stream, settings: Settings, wait_s: float, events: queue.Queue[_Event]
    ) -> None:
        super().__init__(name="cdc-stream", daemon=True)
        self.stream = stream
        self.settings = settings
        self.wait_s = wait_s
        self.events = events
        self.report: StreamReport | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.report = self._run_when_slot_free()
        except BaseException as exc:  # handed to the op thread, which raises it
            self.error = exc
        finally:
            self.events.put(_Finished())

    def _run_when_slot_free(self) -> StreamReport | None:
        """The successor of a live run waits here until the slot frees, so the handover gap is
        one poll plus the open; None when stopped while waiting."""
        deadline = time.monotonic() + self.wait_s
        while self._wait_for_slot(deadline):
            self.events.put(_Opening(datetime.now(UTC)))
            try:
                return self.stream.run()
            except SlotBusy as exc:  # taken between the poll and the open, or never freed
                if time.monotonic() >= deadline:
                    raise SlotBusy(
                        f"replication slot {self.settings.slot!r} is still in use after "
                        f"{self.wait_s:.0f}s: another stream holds it (a cdc_stream run or "
                        "`engagement stream`); stop it or raise slot_wait_seconds"
                    ) from exc
                time.sleep(SLOT_POLL_S)
        return None

    def _wait_for_slot(self, deadline: float) -> bool:
        """Poll until the slot is free or the deadline passes (True), or the run stops (False)."""
        slot = self.settings.slot
        # Named so the run holding the slot sees us waiting and hands over (Stream._hand_over).
        waiting_as = successor_application_name(slot)
        with connect(self.settings.pg_dsn, application_name=waiting_as) as conn:
            while not self.stream.stop.is_set():
                info = _require_slot(slot_info(conn, slot), slot)
                if not info.active or time.monotonic() >= deadline:
                    return True
                time.sleep(SLOT_POLL_S)
        return False


def _require_slot(info: SlotInfo | None, slot: str) -> SlotInfo:
    if info is None:
        raise dg.Failure(
            description=f"replication slot {slot!r} does not exist; create it with "
            "`engagement db init` (then backfill the days it missed)"
        )
    return info


def _lag_bytes(settings: Settings) -> int | None:
    """Slot lag for the report; a metric must never fail the run, so errors give None."""
    try:
        with connect(settings.pg_dsn) as conn:
            info = slot_info(conn, settings.slot)
    except Exception:
        return None
    return info.lag_bytes if info else None


@dg.multi_asset(
    name="engagement_stream",
    specs=STREAM_SPECS,
    can_subset=False,
    description="One stream run: drain the slot, tail it for run_seconds, exit cleanly. "
    "Terminating the run finishes the current batch, checkpoints every sink and exits.",
)
def engagement_stream(
    context: dg.AssetExecutionContext,
    config: StreamRunConfig,
    postgres: PostgresResource,
    clickhouse: ClickHouseResource,
    redis: RedisResource,
    kafka: KafkaResource,
) -> Iterator[dg.MaterializeResult]:
    settings = stream_settings(postgres, clickhouse, redis, kafka)
    options = config.stream_options(settings)
    events: queue.Queue[_Event] = queue.Queue()
    last = {"rows": 0, "at": time.monotonic()}

    def on_report(report: StreamReport) -> None:  # in the stream thread
        now = time.monotonic()
        rate = (report.rows - last["rows"]) / max(now - last["at"], 1e-3)
        last.update(rows=report.rows, at=now)
        events.put(_Reported(report_metadata(report, rows_per_s=rate)))

    stream = build_stream(settings, options, on_report=on_report)
    worker = _StreamThread(stream, settings, config.slot_wait_seconds, events)
    context.instance.add_run_tags(context.run.run_id, {STREAM_TAG: "true", SLOT_TAG: settings.slot})
    context.log.info(
        f"stream on slot {settings.slot}: run_seconds={options.run_seconds:g}, "
        f"linger_seconds={options.linger_seconds}, waiting up to {config.slot_wait_seconds:g}s "
        "for the slot"
    )
    worker.start()
    try:
        _relay(context, events, settings, options.run_seconds)
    except BaseException as exc:  # Dagster's termination (DagsterExecutionInterruptedError)
        context.log.warning(
            f"{type(exc).__name__}: finishing the batch, checkpointing, exiting",
            exc_info=True,
        )
        stream.stop.set()
        _join(worker, STOP_JOIN_S)
        _relay(context, events, settings, options.run_seconds, block=False)
        if worker.is_alive():
            context.log.error(
                f"the stream did not stop within {STOP_JOIN_S:.0f}s; the slot is released when "
                "this process exits and every sink replays from its own checkpoint"
            )
        elif worker.error is not None:
            context.log.error(f"the stream failed while stopping: {worker.error!r}")
        raise
    if worker.error is not None:
        raise worker.error
    if worker.report is not None:
        report = worker.report
        context.log.info(
            f"stream done: {report.rows:,} rows in {report.batches:,} batches, caught up="
            f"{report.caught_up}, acknowledged {format_lsn(report.acknowledged_lsn)}"
        )
    # The assets are skippable: every materialization was logged per report by _relay.
    yield from ()


def _relay(
    context: dg.AssetExecutionContext,
    events: queue.Queue[_Event],
    settings: Settings,
    run_seconds: float,
    *,
    block: bool = True,
) -> None:
    """Turn the stream thread's events into run tags and materializations until it finishes
    (block) or the queue is empty."""
    while True:
        try:
            event = events.get(timeout=IDLE_WAKE_S) if block else events.get_nowait()
        except queue.Empty:
            if block:
                continue
            return
        if isinstance(event, _Finished):
            return
        if isinstance(event, _Opening):
            ends_at = event.at.timestamp() + run_seconds
            context.instance.add_run_tags(
                context.run.run_id,
                {ENDS_AT_TAG: datetime.fromtimestamp(ends_at, UTC).isoformat(timespec="seconds")},
            )
            continue
        lag = _lag_bytes(settings)
        today = today_partition_key()
        for key, metadata in event.metadata.items():
            if lag is not None:
                metadata = {**metadata, "lag_bytes": lag}
            partition = today if key == CLICKHOUSE_ENRICHED_KEY else None
            context.log_event(
                dg.AssetMaterialization(asset_key=key, metadata=metadata, partition=partition)
            )


def today_partition_key() -> str:
    """The daily partition (UTC, ISO date: assets/history.py) the stream keeps fresh."""
    return datetime.now(UTC).date().isoformat()


def _join(worker: threading.Thread, timeout_s: float) -> None:
    """Wait for the stream to stop; a repeated interrupt does not cut the checkpoint short."""
    deadline = time.monotonic() + timeout_s
    while worker.is_alive() and time.monotonic() < deadline:
        try:
            worker.join(timeout=IDLE_WAKE_S)
        except BaseException:
            continue
