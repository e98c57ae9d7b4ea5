"""change_cursor_sensor against the real test slot: launch, hand over, hold back, observe lag."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg
import pytest

from engagement_dagster.assets.stream import ENDS_AT_TAG, SLOT_TAG, SUCCESSOR_OF_TAG
from engagement_dagster.lib.change_cursor import ChangeCursor
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import SlotInfo, connect, slot_info
from engagement_dagster.resources import PostgresResource
from engagement_dagster.sensors.change_cursor import (
    HANDOVER_S,
    MAX_HANDOVER_S,
    StreamRun,
    change_cursor_sensor,
    handover_lead_s,
    plan_tick,
)
from tests.integration.test_dagster_stream import wait_for_free_slot

pytestmark = pytest.mark.integration  # reads the slot of the test database


def _slot(settings: Settings) -> SlotInfo | None:
    with connect(settings.pg_dsn) as conn:
        return slot_info(conn, settings.slot)


@pytest.fixture
def free_slot(source_dsn: str, settings: Settings) -> SlotInfo:
    """The test slot exists and no stream holds it."""
    wait_for_free_slot(settings)
    info = _slot(settings)
    assert info is not None
    return info


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def _tick(instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"postgres": PostgresResource()}
    )
    result = change_cursor_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def _skipped(result: dg.SensorResult) -> str:
    """The skip message of a tick that launched nothing."""
    assert not result.run_requests
    assert result.skip_reason is not None
    return result.skip_reason.skip_message or ""


def _add_run(
    instance: dg.DagsterInstance,
    settings: Settings,
    *,
    status: dg.DagsterRunStatus = dg.DagsterRunStatus.STARTED,
    ends_in_s: float | None = None,
) -> str:
    tags = {SLOT_TAG: settings.slot}
    if ends_in_s is not None:
        ends_at = datetime.fromtimestamp(time.time() + ends_in_s, UTC)
        tags[ENDS_AT_TAG] = ends_at.isoformat(timespec="seconds")
    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name="cdc_stream", run_id=run_id, status=status, tags=tags))
    return run_id


def test_launches_a_run_when_none_is_alive(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    result = _tick(instance)
    assert result.skip_reason is None
    [request] = result.run_requests or []
    assert request.run_key == "after:none"
    assert request.tags[SLOT_TAG] == settings.slot
    assert request.tags["engagement/stream"] == "true"
    # Idempotent: the same situation asks for the same run key, which Dagster launches once.
    again = _tick(instance, result.cursor)
    assert [r.run_key for r in again.run_requests or []] == ["after:none"]


def test_the_observation_carries_slot_lag(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    result = _tick(instance)
    [observation] = result.asset_events
    assert isinstance(observation, dg.AssetObservation)
    assert observation.asset_key == dg.AssetKey(["postgres", "engagement_events"])
    metadata = {key: value.value for key, value in observation.metadata.items()}
    assert isinstance(metadata["lag_bytes"], int) and metadata["lag_bytes"] >= 0
    assert metadata["wal_status"] in {"reserved", "extended", "unreserved"}
    assert metadata["active"] is False
    assert metadata["slot"] == settings.slot
    # The cursor keeps observations to one per 30 s while the slot's state stays the same.
    assert json.loads(result.cursor or "{}")["state"] == [False, metadata["wal_status"]]
    assert _tick(instance, result.cursor).asset_events == []


def test_does_not_launch_while_the_live_run_is_far_from_its_end(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    run_id = _add_run(instance, settings, ends_in_s=120)
    assert f"run {run_id[:8]} streams for another" in _skipped(_tick(instance))


def test_launches_the_successor_within_15s_of_the_end(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    run_id = _add_run(instance, settings, ends_in_s=HANDOVER_S - 5)
    [request] = _tick(instance).run_requests or []
    assert request.run_key == f"successor-of:{run_id}"
    assert request.tags[SUCCESSOR_OF_TAG] == run_id


def test_never_more_than_two_runs(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    _add_run(instance, settings, ends_in_s=2)
    _add_run(instance, settings, status=dg.DagsterRunStatus.NOT_STARTED)
    assert "one streams, the other takes over" in _skipped(_tick(instance))


def test_a_run_still_waiting_for_the_slot_gets_no_successor(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    run_id = _add_run(instance, settings, status=dg.DagsterRunStatus.STARTING)
    assert f"run {run_id[:8]} is starting" in _skipped(_tick(instance))


def test_waits_after_a_failed_run(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    run_id = _add_run(instance, settings, status=dg.DagsterRunStatus.FAILURE)
    assert f"run {run_id[:8]} failed" in _skipped(_tick(instance))


def test_after_a_finished_run_the_next_is_keyed_on_it(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    run_id = _add_run(instance, settings, status=dg.DagsterRunStatus.SUCCESS, ends_in_s=-30)
    [request] = _tick(instance).run_requests or []
    assert request.run_key == f"after:{run_id}"


def test_does_not_launch_while_a_stream_outside_dagster_holds_the_slot(
    free_slot: SlotInfo, instance: dg.DagsterInstance, settings: Settings
) -> None:
    cursor = ChangeCursor(settings.pg_dsn, slot=settings.slot, publication=settings.publication)
    cursor.open()
    try:
        result = _tick(instance)
    finally:
        cursor.close()
    assert "in use by pid" in _skipped(result)
    [observation] = result.asset_events
    assert observation.metadata["active"].value is True


def test_a_lost_slot_launches_nothing_and_says_why(free_slot: SlotInfo, settings: Settings) -> None:
    lost = dataclasses.replace(free_slot, wal_status="lost")
    plan = plan_tick(lost, [], None, time.time(), slot_name=settings.slot)
    assert not plan.launch
    assert "lost" in plan.reason and "recreate the slot" in plan.reason


def test_the_successor_is_requested_earlier_when_runs_start_slowly() -> None:
    def run(latency: float | None) -> StreamRun:
        created = time.time() - 100
        started = None if latency is None else created + latency
        return StreamRun(str(uuid.uuid4()), created, started_at=started)

    assert handover_lead_s([]) == HANDOVER_S
    assert handover_lead_s([run(None), run(3.0)]) == HANDOVER_S
    assert handover_lead_s([run(3.0), run(12.0)]) == 24.0
    assert handover_lead_s([run(60.0)]) == MAX_HANDOVER_S


def test_a_run_whose_worker_vanished_does_not_block_the_slot(
    free_slot: SlotInfo, settings: Settings
) -> None:
    now = time.time()
    zombie = StreamRun("zombie-run", now - 900, started_at=now - 899, ends_at=now - 500)
    successor = StreamRun("successor", now - 400, started_at=now - 399, ends_at=now + 5)
    plan = plan_tick(free_slot, [zombie, successor], successor, now, slot_name=settings.slot)
    assert plan.run_key == "successor-of:successor"
    stuck = StreamRun("stuck-run", now - 600, started_at=now - 590)  # never took the slot
    plan = plan_tick(free_slot, [stuck], stuck, now, slot_name=settings.slot)
    assert plan.run_key == "after:stuck-run"
