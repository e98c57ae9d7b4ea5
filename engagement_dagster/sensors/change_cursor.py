"""`change_cursor_sensor`: polls the replication slot and keeps exactly one stream run consuming.

It launches `cdc_stream` runs and records slot lag; it never reads the slot's changes, never
terminates a run and never touches the sinks (the slot itself keeps two runs from consuming).
"""

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import dagster as dg

from engagement_dagster.assets.sources import engagement_events_source
from engagement_dagster.assets.stream import (
    ENDS_AT_TAG,
    SLOT_TAG,
    STREAM_TAG,
    SUCCESSOR_OF_TAG,
    MetadataScalar,
)
from engagement_dagster.jobs import cdc_stream
from engagement_dagster.lib.source_db import SlotInfo, slot_info
from engagement_dagster.resources import PostgresResource

HANDOVER_S = 15.0  # launch the successor at least this long before the live run ends ...
MAX_HANDOVER_S = 45.0  # ... and at most this long (a successor waits up to 60 s for the slot)
STUCK_AFTER_S = 120.0  # a started run that has not taken the slot by then is not waited for
STALE_AFTER_S = 180.0  # nor one still "started" this long after its end (its worker is gone)
FAILURE_BACKOFF_S = 30.0  # after a failed run, wait this long before launching the next
OBSERVE_EVERY_S = 30.0  # slot lag observations; sooner when active or wal_status changes
RECENT_RUNS = 20

ALIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dataclass(frozen=True)
class StreamRun:
    """A `cdc_stream` run as the sensor sees it (times in epoch seconds)."""

    run_id: str
    created_at: float
    started_at: float | None = None  # the run worker started (after the run queue)
    ends_at: float | None = None  # when it stops tailing; None until it takes the slot
    failed_at: float | None = None  # set for a run that ended in failure

    @property
    def start_latency_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.created_at

    def stale(self, now: float) -> bool:
        """Still counted alive by Dagster, but no longer streaming or about to: a worker that
        died without a word (run monitoring will mark it failed) must not block the slot."""
        if self.ends_at is not None:
            return now - self.ends_at > STALE_AFTER_S
        return self.started_at is not None and now - self.started_at > STUCK_AFTER_S


def handover_lead_s(runs: Sequence[StreamRun]) -> float:
    """How long before the live run's end its successor is requested: HANDOVER_S, or twice
    the slowest recent start (run queue plus worker start) when the platform is slower, so
    the successor is waiting for the slot when it frees."""
    latencies = [run.start_latency_s for run in runs if run.start_latency_s is not None]
    slowest = max(latencies, default=0.0)
    return min(MAX_HANDOVER_S, max(HANDOVER_S, 2 * slowest))


@dataclass(frozen=True)
class Plan:
    """What one tick does: launch a run (with its run key) or skip, and why."""

    reason: str
    run_key: str | None = None
    successor_of: str | None = None

    @property
    def launch(self) -> bool:
        return self.run_key is not None


def plan_tick(
    slot: SlotInfo | None,
    alive: Sequence[StreamRun],
    latest: StreamRun | None,
    now: float,
    *,
    slot_name: str,
    lead_s: float = HANDOVER_S,
) -> Plan:
    """Keep one run consuming: launch when none is alive or the live one ends within lead_s;
    never more than two (one live, one waiting to take over)."""
    if slot is None:
        return Plan(f"slot {slot_name!r} does not exist: run `engagement db init`")
    if slot.wal_status == "lost":
        return Plan(
            f"slot {slot_name!r} has wal_status 'lost': the WAL it needed is gone, so no run is "
            "launched; recreate the slot and backfill the missed days (runbook)"
        )
    live = [run for run in alive if not run.stale(now)]
    if len(live) >= 2:
        ids = ", ".join(run.run_id[:8] for run in live)
        return Plan(f"runs {ids} are alive: one streams, the other takes over")
    if len(live) == 1:
        run = live[0]
        if run.ends_at is None:
            return Plan(f"run {run.run_id[:8]} is starting or waiting for the slot")
        left = run.ends_at - now
        if left > lead_s:
            return Plan(
                f"run {run.run_id[:8]} streams for another {left:.0f}s; its successor is "
                f"requested {lead_s:.0f}s before the end"
            )
        return Plan(
            f"run {run.run_id[:8]} ends in {max(left, 0):.0f}s: launching its successor",
            run_key=f"successor-of:{run.run_id}",
            successor_of=run.run_id,
        )
    if slot.active:
        return Plan(
            f"slot {slot_name!r} is in use by pid {slot.active_pid}, not by a live cdc_stream "
            "run (an `engagement stream`?); a run is launched once it is free"
        )
    if latest is not None and latest.failed_at is not None:
        wait = latest.failed_at + FAILURE_BACKOFF_S - now
        if wait > 0:
            return Plan(f"run {latest.run_id[:8]} failed; launching again in {wait:.0f}s")
    after = latest.run_id if latest is not None else "none"
    return Plan("no stream run is alive: launching one", run_key=f"after:{after}")


def _stream_run(record: dg.RunRecord) -> StreamRun:
    run = record.dagster_run
    ends_at = run.tags.get(ENDS_AT_TAG)
    failed = run.status == dg.DagsterRunStatus.FAILURE
    return StreamRun(
        run_id=run.run_id,
        created_at=record.create_timestamp.timestamp(),
        started_at=record.start_time,
        ends_at=datetime.fromisoformat(ends_at).timestamp() if ends_at else None,
        failed_at=(record.end_time or record.update_timestamp.timestamp()) if failed else None,
    )


def _runs_of_slot(
    instance: dg.DagsterInstance, slot: str, statuses: list[dg.DagsterRunStatus] | None
) -> list[StreamRun]:
    """Stream runs on this slot, newest first (runs launched without a slot tag count too)."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=cdc_stream.name, statuses=statuses or []),
        limit=None if statuses else RECENT_RUNS,
    )
    return [_stream_run(r) for r in records if r.dagster_run.tags.get(SLOT_TAG, slot) == slot]


def _observation(slot: SlotInfo | None, slot_name: str) -> dg.AssetObservation:
    metadata: dict[str, MetadataScalar] = {"slot": slot_name, "exists": slot is not None}
    if slot is not None:
        metadata.update(
            lag_bytes=slot.lag_bytes,
            wal_status=slot.wal_status or "",
            active=slot.active,
            active_pid=slot.active_pid,
        )
    return dg.AssetObservation(asset_key=engagement_events_source.key, metadata=metadata)


def _observe_due(cursor: str | None, slot: SlotInfo | None, now: float) -> bool:
    """An observation every OBSERVE_EVERY_S (not every tick: event storage stays small), and
    at once when the slot's state changes."""
    if not cursor:
        return True
    last = json.loads(cursor)
    state = [slot.active, slot.wal_status] if slot else None
    return state != last.get("state") or now - float(last.get("observed_at", 0)) >= OBSERVE_EVERY_S


@dg.sensor(
    name="change_cursor_sensor",
    target=cdc_stream,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=5,
    description="Polls the replication slot (lag, active pid, wal_status) and keeps exactly "
    "one cdc_stream run consuming, launching its successor 15 s before it ends (up to 45 s "
    "when runs are slow to start).",
)
def change_cursor_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult:
    slot_name = postgres.settings.slot
    with postgres.connection() as conn:
        slot = slot_info(conn, slot_name)
    now = time.time()
    alive = _runs_of_slot(context.instance, slot_name, ALIVE)
    recent = _runs_of_slot(context.instance, slot_name, None)
    latest = recent[0] if recent else None
    lead_s = handover_lead_s(recent)
    plan = plan_tick(slot, alive, latest, now, slot_name=slot_name, lead_s=lead_s)

    events: list[dg.AssetObservation] = []
    cursor = context.cursor
    if _observe_due(context.cursor, slot, now):
        events.append(_observation(slot, slot_name))
        state = [slot.active, slot.wal_status] if slot else None
        cursor = json.dumps({"observed_at": now, "state": state})
    if not plan.launch:
        return dg.SensorResult(skip_reason=plan.reason, asset_events=events, cursor=cursor)
    context.log.info(plan.reason)
    tags = {STREAM_TAG: "true", SLOT_TAG: slot_name}
    if plan.successor_of:
        tags[SUCCESSOR_OF_TAG] = plan.successor_of
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=plan.run_key, tags=tags)],
        asset_events=events,
        cursor=cursor,
    )
