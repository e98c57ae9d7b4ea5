"""The job `cdc_stream` on the real services: a run drains and reports, a terminated run stops
cleanly, and under the daemon the sensor hands the slot from run to run in under a second."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from engagement_dagster.assets.stream import (
    ENDS_AT_TAG,
    REPORTED_KEYS,
    SLOT_TAG,
    SUCCESSOR_OF_TAG,
    today_partition_key,
)
from engagement_dagster.definitions import defs
from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.generator import TrafficOptions, run_traffic, seed_content
from engagement_dagster.lib.pgoutput import parse_lsn
from engagement_dagster.lib.pipeline import default_sinks
from engagement_dagster.lib.settings import PROJECT_ROOT, Settings
from engagement_dagster.lib.source_db import connect, slot_info
from engagement_dagster.sensors.change_cursor import ALIVE

BIN = Path(sys.executable).parent
LSN_TEXT = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
SINK_KEYS = {"clickhouse/enriched_engagements", "redis/engagement_live_board",
             "kafka/engagement_enriched_v1"}  # fmt: skip
STREAM_KEYS = {key.to_user_string() for key in REPORTED_KEYS}


def _max_event_id(dsn: str) -> int:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT coalesce(max(id), 0) FROM engagement_events")
        row = cur.fetchone()
    return int(row[0]) if row else 0


def _new_event_ids(dsn: str, *, after: int) -> tuple[int, int]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT min(id), max(id) FROM engagement_events WHERE id > %s", (after,))
        row = cur.fetchone()
    assert row is not None and row[0] is not None, "the traffic inserted no event"
    return int(row[0]), int(row[1])


LEFTOVER_STREAM = """
SELECT pg_terminate_backend(s.active_pid) FROM pg_replication_slots s
  JOIN pg_stat_activity a ON a.pid = s.active_pid
 WHERE s.slot_name = %s AND a.application_name LIKE 'engagement-stream:%%'
"""


def wait_for_free_slot(settings: Settings, timeout_s: float = 30) -> None:
    """Wait until no stream holds the test slot. A stream run still holding it after timeout_s
    is a leftover of an earlier test (a daemon stopped under a live run leaves it tailing for
    up to run_seconds); it is cut off, which the checkpoints make safe."""
    deadline = time.monotonic() + timeout_s
    terminated = False
    while True:
        with connect(settings.pg_dsn) as conn:
            info = slot_info(conn, settings.slot)
            assert info is not None, f"slot {settings.slot} is missing"
            if not info.active:
                return
            if time.monotonic() >= deadline and not terminated:
                with conn.cursor() as cur:
                    cur.execute(LEFTOVER_STREAM, (settings.slot,))
                terminated, deadline = True, time.monotonic() + 10
        assert time.monotonic() < deadline, f"slot held by pid {info.active_pid}"
        time.sleep(0.2)


def _sink_checkpoints(settings: Settings) -> dict[str, int]:
    checkpoints = {}
    for sink in default_sinks(settings):
        try:
            checkpoints[sink.name] = sink.read_checkpoint()
        finally:
            sink.close()
    return checkpoints


def _materializations(
    instance: dg.DagsterInstance, run_id: str
) -> dict[str, list[dict[str, object]]]:
    """Metadata of each asset's materializations in a run, in order, as plain values."""
    found: dict[str, list[dict[str, object]]] = {}
    for record in instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records:
        materialization = record.asset_materialization
        assert materialization is not None
        metadata = {key: value.value for key, value in materialization.metadata.items()}
        metadata["logged_at"] = record.timestamp
        metadata["partition"] = materialization.partition
        found.setdefault(materialization.asset_key.to_user_string(), []).append(metadata)
    return found


@contextmanager
def _traffic(dsn: str, rate: float) -> Iterator[None]:
    """Background inserts, updates and deletes until the block ends."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_traffic, args=(dsn, TrafficOptions(rate=rate, seed=11)), kwargs={"stop": stop}
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_run_drains_the_backlog_into_every_sink_and_reports_it(
    clean_sinks: Settings, source_dsn: str, settings: Settings
) -> None:
    wait_for_free_slot(settings)
    seed_content(source_dsn, 30, seed=5)
    before = _max_event_id(source_dsn)
    run_traffic(source_dsn, TrafficOptions(rate=150, duration_s=1.5, invalid_ratio=0.05, seed=3))
    # Ids come from a sequence that a TRUNCATE by an earlier module does not restart.
    first_new, last_new = _new_event_ids(source_dsn, after=before)
    assert last_new >= first_new

    job = defs.resolve_job_def("cdc_stream")
    config = {"linger_seconds": 0, "run_seconds": 90, "report_every_s": 30}
    started = time.monotonic()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            run_config={"ops": {"engagement_stream": {"config": config}}}, instance=instance
        )
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None
        found = _materializations(instance, result.run_id)
    assert time.monotonic() - started < 60, "linger_seconds=0 must exit once caught up"

    assert run.tags["engagement/stream"] == "true"
    assert run.tags[SLOT_TAG] == settings.slot
    assert ENDS_AT_TAG in run.tags
    # A short run reports once, at its end: one materialization per asset.
    assert set(found) == STREAM_KEYS
    assert all(len(reports) == 1 for reports in found.values()), found
    stream = found["engagement/enriched_engagements"][0]
    assert isinstance(stream["rows"], int) and stream["rows"] > 0
    assert isinstance(stream["batches"], int) and stream["batches"] > 0
    assert isinstance(stream["dead_letters"], int) and stream["dead_letters"] > 0
    assert LSN_TEXT.match(str(stream["first_lsn"])) and LSN_TEXT.match(str(stream["last_lsn"]))
    assert isinstance(stream["last_lsn_int"], int) and stream["last_lsn_int"] > 0
    assert isinstance(stream["acknowledged_lsn_int"], int)
    assert stream["acknowledged_lsn_int"] >= stream["last_lsn_int"]
    assert isinstance(stream["lag_bytes"], int)
    assert stream["caught_up"] is True
    # The warehouse table is daily-partitioned: the stream keeps today's partition fresh.
    assert found["clickhouse/enriched_engagements"][0]["partition"] == today_partition_key()
    assert stream["partition"] is None
    for key in SINK_KEYS:
        sink = found[key][0]
        assert sink["rows"] == stream["rows"]
        assert sink["last_lsn_int"] == stream["last_lsn_int"]
        p50, p99 = sink["latency_p50_ms"], sink["latency_p99_ms"]
        assert isinstance(p50, float) and isinstance(p99, float) and 0 < p50 <= p99
        assert sink["sink_error"] == ""

    # Every sink applied the run's last transaction, and ClickHouse holds the new events.
    checkpoints = _sink_checkpoints(settings)
    assert set(checkpoints.values()) == {stream["last_lsn_int"]}, checkpoints
    with clickhouse_client(settings.clickhouse_dsn) as client:
        rows = client.query(
            "SELECT countDistinct(event_id) FROM engagement.enriched_engagements "
            "WHERE event_id BETWEEN {first:Int64} AND {last:Int64}",
            parameters={"first": first_new, "last": last_new},
        ).result_rows
    assert rows[0][0] > 0.8 * (last_new - first_new + 1)  # the rest were invalid: dead letters


def test_sigterm_finishes_the_batch_checkpoints_and_releases_the_slot(
    clean_sinks: Settings, source_dsn: str, settings: Settings, tmp_path: Path
) -> None:
    """What a run worker gets when Kubernetes or the run monitor stops it; the UI's Terminate
    arrives as SIGINT on the same handler (covered under the daemon below)."""
    wait_for_free_slot(settings)
    seed_content(source_dsn, 30, seed=5)
    config = tmp_path / "run_config.yaml"
    config.write_text(
        "ops:\n  engagement_stream:\n    config:\n      run_seconds: 120\n      report_every_s: 2\n"
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    command = [str(BIN / "dagster"), "job", "execute", "-m", "engagement_dagster.definitions",
               "-j", "cdc_stream", "-c", str(config)]  # fmt: skip
    with _traffic(source_dsn, rate=80):
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, "DAGSTER_HOME": str(home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                run_id = _wait_for_run_tag(instance, ENDS_AT_TAG, process, timeout_s=90)
                time.sleep(4)  # a few batches and reports into the run
                process.send_signal(signal.SIGTERM)
                output, _ = process.communicate(timeout=90)
                run = instance.get_run_by_id(run_id)
                found = _materializations(instance, run_id)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "DagsterExecutionInterruptedError: finishing the batch" in output, output
    assert run is not None and run.status == dg.DagsterRunStatus.FAILURE  # no user termination
    with connect(settings.pg_dsn) as conn:
        info = slot_info(conn, settings.slot)
    assert info is not None and not info.active, "the slot outlived the run"
    # The last report is the one written after the stop: every sink holds everything read.
    assert set(found) == STREAM_KEYS, output
    assert all(len(found[key]) >= 2 for key in STREAM_KEYS), "reports while running, then final"
    final = found["engagement/enriched_engagements"][-1]
    assert isinstance(final["rows"], int) and final["rows"] > 0
    _assert_stopped_cleanly(settings, final, found)


def _assert_stopped_cleanly(
    settings: Settings, final: dict[str, object], found: dict[str, list[dict[str, object]]]
) -> None:
    """The batch in flight was finished and checkpointed by every sink that answers; a sink
    that was failing at the stop keeps the slot behind its checkpoint, so nothing is skipped."""
    last = final["last_lsn_int"]
    checkpoints = _sink_checkpoints(settings)
    errors = {key.split("/")[0]: found[key][-1]["sink_error"] for key in SINK_KEYS}
    healthy = [name for name, error in errors.items() if not error]
    assert {"clickhouse", "redis"} <= set(healthy), errors  # local sinks: never failing here
    for name, checkpoint in checkpoints.items():
        if name in healthy:
            assert checkpoint == last, (name, checkpoints, last)
    confirmed = _confirmed_flush_lsn(settings)
    if min(checkpoints.values()) < last:  # the lagging sink replays from the slot next run
        assert confirmed <= min(checkpoints.values()), (confirmed, checkpoints)
    else:
        assert confirmed >= last


def _confirmed_flush_lsn(settings: Settings) -> int:
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot,),
        )
        row = cur.fetchone()
    assert row is not None
    return parse_lsn(row[0])


def _wait_for_run_tag(
    instance: dg.DagsterInstance,
    tag: str,
    process: subprocess.Popen[str] | None = None,
    *,
    timeout_s: float,
    exclude: frozenset[str] = frozenset(),
) -> str:
    """The id of the newest cdc_stream run carrying `tag` (and not in exclude)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"dagster exited with {process.returncode}:\n{output}")
        for run in instance.get_runs(dg.RunsFilter(job_name="cdc_stream")):
            if tag in run.tags and run.run_id not in exclude:
                return run.run_id
        time.sleep(0.2)
    pytest.fail(f"no cdc_stream run with tag {tag} after {timeout_s:.0f}s")


@dataclass
class SlotHolders:
    """Who holds the slot, sampled every few milliseconds: (monotonic time, active pid)."""

    samples: list[tuple[float, int | None]]

    def handovers(self) -> list[tuple[int, int, float]]:
        """(from pid, to pid, seconds with no holder in between) for each change of holder."""
        found = []
        last_pid, last_seen = None, 0.0
        for at, pid in self.samples:
            if pid is None:
                continue
            if last_pid is not None and pid != last_pid:
                found.append((last_pid, pid, at - last_seen))
            last_pid, last_seen = pid, at
        return found


@contextmanager
def _sample_slot(settings: Settings) -> Iterator[SlotHolders]:
    holders = SlotHolders([])
    stop = threading.Event()

    def sample() -> None:
        with connect(settings.pg_dsn) as conn:
            while not stop.is_set():
                info = slot_info(conn, settings.slot)
                holders.samples.append((time.monotonic(), info.active_pid if info else None))
                time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield holders
    finally:
        stop.set()
        thread.join(timeout=10)


def _wait_for_status(
    instance: dg.DagsterInstance, run_id: str, statuses: set[dg.DagsterRunStatus], timeout_s: float
) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in statuses:
            return run
        time.sleep(0.2)
    run = instance.get_run_by_id(run_id)
    pytest.fail(f"run {run_id} is {run.status if run else 'gone'}, not {statuses}")


def test_under_the_daemon_the_sensor_hands_over_and_termination_is_clean(
    clean_sinks: Settings, source_dsn: str, settings: Settings, tmp_path: Path
) -> None:
    """The product as deployed: daemon, sensor, run workers. Runs of 20 s so that the sensor
    launches a successor, which takes the slot as its predecessor releases it; then the UI's
    Terminate (the run coordinator's cancel_run) stops a run cleanly and the sensor replaces it."""
    wait_for_free_slot(settings)
    seed_content(source_dsn, 30, seed=5)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(PROJECT_ROOT / "workspace.yaml")],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DAGSTER_HOME": str(home), "ENGAGEMENT_STREAM_RUN_SECONDS": "20"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        with _traffic(source_dsn, rate=40), _sample_slot(settings) as holders:
            first = _wait_for_run_tag(instance, ENDS_AT_TAG, timeout_s=120)
            second = _wait_for_run_tag(instance, ENDS_AT_TAG, timeout_s=60, exclude={first})
            run = _wait_for_status(instance, first, {dg.DagsterRunStatus.SUCCESS}, 60)
            successor = instance.get_run_by_id(second)
            assert successor is not None and successor.tags[SUCCESSOR_OF_TAG] == first
            time.sleep(3)  # the successor streams for a while

            canceled_at = time.time()
            instance.run_coordinator.cancel_run(second)  # what the UI's Terminate button does
            run = _wait_for_status(instance, second, {dg.DagsterRunStatus.CANCELED}, 90)
            third = _wait_for_run_tag(instance, ENDS_AT_TAG, timeout_s=60, exclude={first, second})
        handovers = holders.handovers()
    finally:
        _stop_stream_daemon(daemon, instance)
        log.close()
    daemon_log = (tmp_path / "daemon.log").read_text()

    assert run.status == dg.DagsterRunStatus.CANCELED
    assert third not in {first, second}, daemon_log
    assert handovers, "the slot never changed hands"
    first_handover = handovers[0]
    assert first_handover[2] < 1.0, f"handover gap {first_handover[2]:.3f}s: {handovers}"
    # The terminated run reported once more after the stop: its stream left through the
    # clean path (batch finished, sinks closed, slot acknowledged), not by being cut off.
    final = _materializations(instance, second)["engagement/enriched_engagements"][-1]
    assert isinstance(final["rows"], int) and final["rows"] > 0
    assert float(str(final["logged_at"])) >= canceled_at
    observations = instance.fetch_observations(dg.AssetKey(["postgres", "engagement_events"]), 5)
    assert observations.records, "the sensor recorded no slot lag"
    instance.dispose()


def _stop_stream_daemon(daemon: subprocess.Popen[bytes], instance: dg.DagsterInstance) -> None:
    """Stop the daemon, then terminate the stream runs it left (they would hold the slot)."""
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
    alive = instance.get_runs(dg.RunsFilter(job_name="cdc_stream", statuses=ALIVE))
    for run in alive:
        instance.run_coordinator.cancel_run(run.run_id)
    ended = {dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS}
    for run in alive:
        _wait_for_status(instance, run.run_id, ended, 90)
