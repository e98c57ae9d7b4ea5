"""`engagement status`: the pipeline on one screen, and what to do when something is wrong.

It reads what the exporter serves (the metric files of every stream process, and the slot from
PostgreSQL), plus the dead-letter counts from ClickHouse; it needs no exporter running.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg2
from prometheus_client.metrics_core import Metric
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from engagement_dagster.lib import metrics
from engagement_dagster.lib.board import human_age
from engagement_dagster.lib.clickhouse import ClickHouseLockTimeout
from engagement_dagster.lib.dead_letters import list_dead_letters
from engagement_dagster.lib.pgoutput import format_lsn
from engagement_dagster.lib.settings import Settings

MIB = 1 << 20
SINK_LAG_WARN_BYTES = 64 * MIB  # a sink this far behind the WAL is worth a look
SLOT_LAG_WARN_BYTES = 1 << 30  # as the EngagementSlotLagHigh alert
LATENCY_WARN_S = 5.0  # as the EngagementSinkLatencyHigh alert


@dataclass(frozen=True)
class SinkStatus:
    name: str
    checkpoint_lsn: int | None  # None: no run has reported one yet
    lag_bytes: int | None
    last_latency_s: float | None
    last_applied_at: float | None  # unix time
    up: bool | None  # None: no stream process is alive to say
    errors: int
    queued_rows: int


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str


@dataclass(frozen=True)
class PlatformStatus:
    slot_name: str
    slot: metrics.SlotReading | None  # None: PostgreSQL did not answer
    postgres_error: str | None
    sinks: tuple[SinkStatus, ...]
    stream_processes: int
    dead_letters_pending: int | None  # None: ClickHouse was busy or unreachable
    dead_letters_by_reason: dict[str, int]
    clickhouse_error: str | None
    read_at: float

    @property
    def problems(self) -> tuple[Problem, ...]:
        return tuple(_problems(self))


def _samples(families: Iterable[Metric]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in families:
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def gather(settings: Settings) -> PlatformStatus:
    samples = _samples(metrics.read_all(settings.metrics_dir))
    slot: metrics.SlotReading | None = None
    postgres_error = None
    try:
        slot = metrics.read_slot(settings)
    except psycopg2.Error as exc:
        postgres_error = str(exc).strip().splitlines()[0]

    def value(name: str, sink: str) -> float | None:
        return samples.get(name, {}).get((("sink", sink),))

    sinks = []
    for sink in metrics.SINKS:
        checkpoint = value("engagement_sink_checkpoint_lsn", sink)
        up = value("engagement_sink_up", sink)
        applied = value("engagement_sink_last_applied_timestamp_seconds", sink)
        latency = value("engagement_sink_last_latency_seconds", sink)
        errors = sum(
            v
            for labels, v in samples.get("engagement_sink_errors_total", {}).items()
            if ("sink", sink) in labels
        )
        sinks.append(
            SinkStatus(
                name=sink,
                checkpoint_lsn=None if checkpoint is None else int(checkpoint),
                lag_bytes=(
                    None
                    if checkpoint is None or slot is None
                    else max(0, slot.wal_lsn - int(checkpoint))
                ),
                last_latency_s=latency,
                last_applied_at=applied,
                up=None if up is None else up == 1,
                errors=int(errors),
                queued_rows=int(value("engagement_sink_queued_rows", sink) or 0),
            )
        )
    pending, by_reason, clickhouse_error = _dead_letters(settings)
    return PlatformStatus(
        slot_name=settings.slot,
        slot=slot,
        postgres_error=postgres_error,
        sinks=tuple(sinks),
        stream_processes=int(samples.get("engagement_stream_running", {}).get((), 0)),
        dead_letters_pending=pending,
        dead_letters_by_reason=by_reason,
        clickhouse_error=clickhouse_error,
        read_at=time.time(),
    )


def _dead_letters(settings: Settings) -> tuple[int | None, dict[str, int], str | None]:
    try:
        listing = list_dead_letters(settings.clickhouse_dsn, limit=0)
    except ClickHouseLockTimeout:
        return None, {}, "busy: another process holds embedded ClickHouse"
    except Exception as exc:  # reported on the screen, never fatal to the status
        return None, {}, f"{type(exc).__name__}: {exc}"
    by_reason = {count.reason: count.pending for count in listing.counts if count.pending}
    return sum(by_reason.values()), by_reason, None


def _problems(status: PlatformStatus) -> Iterable[Problem]:
    slot = status.slot
    if slot is None:
        yield Problem(
            f"PostgreSQL does not answer: {status.postgres_error}",
            "check `engagement services status`; start it with `engagement services up`",
        )
    elif not slot.exists:
        yield Problem(
            f"replication slot {status.slot_name} does not exist",
            "run `engagement db init`; if it was lost, follow the README runbook "
            '"The slot was lost" (restart from a point in time)',
        )
    else:
        if slot.wal_status in ("unreserved", "lost"):
            yield Problem(
                f"slot wal_status is {slot.wal_status}: WAL it needs is (about to be) removed",
                'follow the README runbook "The slot was lost" now',
            )
        if not slot.active:
            yield Problem(
                "no stream run consumes the slot",
                "is `make run` (the Dagster daemon and change_cursor_sensor) up? "
                "Or run `engagement stream`",
            )
        if (slot.lag_bytes or 0) > SLOT_LAG_WARN_BYTES:
            yield Problem(
                f"the slot is {_bytes(slot.lag_bytes)} behind",
                "see which sink is behind below; the slot waits for the slowest",
            )
    for sink in status.sinks:
        if sink.up is False:
            yield Problem(
                f"sink {sink.name} is failing ({sink.errors} errors so far)",
                f"check `engagement services status`; the stream retries and {sink.name} "
                "catches up from the slot when it is back",
            )
        if sink.checkpoint_lsn is None:
            yield Problem(
                f"sink {sink.name} has no checkpoint in the metrics yet",
                "no stream run has applied a batch since the metrics started",
            )
        elif (sink.lag_bytes or 0) > SINK_LAG_WARN_BYTES:
            yield Problem(
                f"sink {sink.name} is {_bytes(sink.lag_bytes)} behind the WAL",
                "is the stream running and the sink healthy? (rows above)",
            )
        if (sink.last_latency_s or 0) > LATENCY_WARN_S:
            yield Problem(
                f"sink {sink.name}: last batch {sink.last_latency_s:.1f} s after its commit",
                "see the performance dashboard; a backlog drains at several times the load",
            )
    if status.dead_letters_pending:
        yield Problem(
            f"{status.dead_letters_pending:,} dead letters not replayed",
            "`engagement dlq list` shows why; fix the cause, then `engagement dlq replay`",
        )


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    if value < MIB:
        return f"{value / 1024:,.0f} kB"
    return f"{value / MIB:,.1f} MB"


def status_view(status: PlatformStatus) -> RenderableType:
    slot = status.slot
    slot_table = Table(title=f"slot {status.slot_name}", title_justify="left")
    for column in ("consumer", "wal_status", "lag", "WAL kept", "safe WAL left"):
        slot_table.add_column(column, justify="right" if column != "consumer" else "left")
    if slot is None:
        slot_table.add_row(f"[red]PostgreSQL down: {status.postgres_error}[/red]", *"----")
    elif not slot.exists:
        slot_table.add_row("[red]no such slot[/red]", *"----")
    else:
        consumer = f"pid {slot.active_pid}" if slot.active else "[red]none[/red]"
        slot_table.add_row(
            consumer,
            slot.wal_status or "-",
            _bytes(slot.lag_bytes),
            _bytes(slot.retained_bytes),
            "unlimited" if slot.safe_wal_size is None else _bytes(slot.safe_wal_size),
        )
    sinks = Table(title="sinks", title_justify="left")
    for column in ("sink", "state", "checkpoint", "behind WAL", "last batch", "applied", "queued"):
        sinks.add_column(column, justify="left" if column in ("sink", "state") else "right")
    for sink in status.sinks:
        state = {
            True: "[green]up[/green]",
            False: f"[red]failing ({sink.errors} errors)[/red]",
            None: "no live run",
        }[sink.up]
        sinks.add_row(
            sink.name,
            state,
            "-" if sink.checkpoint_lsn is None else format_lsn(sink.checkpoint_lsn),
            _bytes(sink.lag_bytes),
            "-" if sink.last_latency_s is None else f"{sink.last_latency_s * 1000:,.0f} ms",
            "-"
            if sink.last_applied_at is None
            else human_age(status.read_at - sink.last_applied_at) + " ago",
            f"{sink.queued_rows:,}",
        )
    if status.dead_letters_pending is None:
        dlq = Text(f"dead letters: unknown ({status.clickhouse_error})")
    else:
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(status.dead_letters_by_reason.items()))
        dlq = Text(
            f"dead letters not replayed: {status.dead_letters_pending:,}"
            + (f" ({reasons})" if reasons else "")
        )
    runs = Text(f"stream processes alive: {status.stream_processes}")
    problems = status.problems
    if problems:
        advice = Table(title="what to do", title_justify="left", show_lines=True)
        advice.add_column("problem", style="red")
        advice.add_column("fix")
        for problem in problems:
            advice.add_row(problem.what, problem.fix)
        verdict: RenderableType = advice
    else:
        verdict = Text("all good: nothing to do", style="green")
    return Group(slot_table, sinks, runs, dlq, verdict)
