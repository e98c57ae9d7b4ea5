"""The metrics exporter on real services: a stream run's counts survive the run, and the
scrape-time values (slot, sink lag, live board) come from PostgreSQL and Redis as they are."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engagement_dagster.lib.metrics import PlatformCollector, serve
from engagement_dagster.lib.pgoutput import format_lsn
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect
from tests.support import Samples, postgres_board, scrape

BIN = Path(sys.executable).parent

VIDEO, PODCAST = str(uuid.uuid4()), str(uuid.uuid4())
UNKNOWN_CONTENT = str(uuid.uuid4())
USER = str(uuid.uuid4())
INSERTS = 40  # valid ones: 30 video (10 s each), 9 podcast (20 s each), 1 unknown content
INVALID = 3  # event_type 'like': dead letters


@pytest.fixture(scope="module")
def metered(clean_sinks: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """This module's own metrics directory: streams that earlier tests ran inside the test
    process are still alive as far as their metric files go, and would be counted too."""
    directory = tmp_path_factory.mktemp("metrics")
    return clean_sinks.model_copy(update={"metrics_dir_override": directory})


def metrics_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "ENGAGEMENT_METRICS_DIR": str(settings.metrics_dir)}


def collect(settings: Settings) -> Samples:
    collector = PlatformCollector(settings)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _load_source(dsn: str) -> None:
    with connect(dsn, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute(  # unknown content must be possible: the stream never relies on an FK
            "ALTER TABLE engagement_events DROP CONSTRAINT IF EXISTS "
            "engagement_events_content_id_fkey"
        )
        cur.execute(
            "INSERT INTO content (id, slug, content_type, length_seconds) VALUES "
            "(%s, 'metrics-video', 'video', 100), (%s, 'metrics-pod', 'podcast', 600)",
            (VIDEO, PODCAST),
        )
        rows = [(VIDEO, "play", 10_000)] * 30 + [(PODCAST, "pause", 20_000)] * 9
        rows += [(UNKNOWN_CONTENT, "click", 0)] + [(VIDEO, "like", 1)] * INVALID
        for content_id, event_type, duration_ms in rows:
            cur.execute(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, "
                "duration_ms) VALUES (%s, %s, %s, now(), %s)",
                (content_id, USER, event_type, duration_ms),
            )
        conn.commit()
        cur.execute(
            "UPDATE engagement_events SET duration_ms = 30000 "
            "WHERE id = (SELECT min(id) FROM engagement_events WHERE content_id = %s)",
            (PODCAST,),
        )
        cur.execute(
            "DELETE FROM engagement_events "
            "WHERE id = (SELECT max(id) FROM engagement_events WHERE event_type = 'play')"
        )
        conn.commit()


@pytest.fixture(scope="module")
def stream_run(metered: Settings) -> Iterator[tuple[Samples, Samples]]:
    """Metrics before and after one `engagement stream --until-caught-up` over known data."""
    before = collect(metered)
    _load_source(metered.pg_dsn)
    result = subprocess.run(
        [str(BIN / "engagement"), "stream", "--until-caught-up"],
        capture_output=True,
        text=True,
        timeout=300,
        env=metrics_env(metered),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield before, collect(metered)


def test_counts_of_a_finished_run_are_kept(stream_run: tuple[Samples, Samples]) -> None:
    before, after = stream_run
    read = "engagement_changes_read_total"
    assert delta(after, before, read, table="engagement_events", op="insert") == INSERTS + INVALID
    assert delta(after, before, read, table="engagement_events", op="update") == 1
    assert delta(after, before, read, table="engagement_events", op="delete") == 1
    assert delta(after, before, read, table="content", op="insert") == 2
    assert delta(after, before, "engagement_dead_letters_total", reason="unknown_event_type") == (
        INVALID
    )
    assert delta(after, before, "engagement_unknown_content_events_total") == 1
    # Rows written: 40 inserts, the update's new image and the delete's tombstone.
    for sink in ("clickhouse", "redis", "kafka"):
        assert delta(after, before, "engagement_sink_rows_applied_total", sink=sink) == 42
        assert delta(after, before, "engagement_sink_latency_seconds_count", sink=sink) >= 1
        assert delta(after, before, "engagement_sink_errors_total", sink=sink, error="x") == 0
    assert delta(after, before, "engagement_stream_runs_total") == 1
    assert delta(after, before, "engagement_process_cpu_seconds_total", role="stream") > 0
    # The run has ended: its live gauges are gone, its counters are not.
    assert after.get(("engagement_stream_running", ()), 0) == 0
    assert not any(name == "engagement_sink_up" for name, _ in after)


def test_business_counters_by_content_type(stream_run: tuple[Samples, Samples]) -> None:
    before, after = stream_run
    events = "engagement_enriched_events_total"
    # Events as enriched (inserts and updates' new images): 30 plays (one later deleted; its
    # insert was counted), 9 pauses and the update's new image, 1 click on unknown content.
    assert delta(after, before, events, content_type="video", event_type="play") == 30
    assert delta(after, before, events, content_type="podcast", event_type="pause") == 10
    assert delta(after, before, events, content_type="unknown", event_type="click") == 1
    seconds = "engagement_engagement_seconds_total"
    assert delta(after, before, seconds, content_type="video") == pytest.approx(300.0)
    assert delta(after, before, seconds, content_type="podcast") == pytest.approx(9 * 20 + 30)


def test_scrape_time_values_come_from_the_sources(
    stream_run: tuple[Samples, Samples], clean_sinks: Settings
) -> None:
    _, after = stream_run
    slot = (("slot", clean_sinks.slot),)
    assert after[("engagement_slot_exists", slot)] == 1
    assert after[("engagement_slot_active", slot)] == 0  # the run has ended
    assert after[("engagement_slot_wal_status", (*slot, ("status", "reserved")))] == 1
    checkpoints = {
        sink: after[("engagement_sink_checkpoint_lsn", (("sink", sink),))]
        for sink in ("clickhouse", "redis", "kafka")
    }
    assert len(set(checkpoints.values())) == 1, checkpoints  # every sink holds every change
    wal = after[("engagement_source_wal_lsn", ())]
    for sink, lsn in checkpoints.items():
        lag = after[("engagement_sink_lag_bytes", (("sink", sink),))]
        assert lag == wal - lsn >= 0, (sink, lag)  # WAL is the cluster's: others write too
    # The live board's leader, as PostgreSQL computes it: the video (29 plays of 10 s).
    board = postgres_board(clean_sinks.pg_dsn)
    leader = max(board, key=lambda content_id: board[content_id][0])
    top = (("content_id", leader), ("rank", "1"))
    assert leader == VIDEO
    assert after[("engagement_top_content_engagement_seconds", top)] == pytest.approx(290.0)
    assert after[("engagement_top_content_events", top)] == board[leader][1]
    assert after[("engagement_exporter_source_up", (("source", "postgres"),))] == 1


def test_files_of_ended_runs_are_folded(
    stream_run: tuple[Samples, Samples], metered: Settings
) -> None:
    files = sorted(p.name for p in metered.metrics_dir.glob("*.db"))
    owners = {name.rsplit("_", 1)[1][: -len(".db")] for name in files}
    assert owners <= {"archive", str(os.getpid())}, files


def test_endpoint_serves_the_same_values(
    stream_run: tuple[Samples, Samples], metered: Settings
) -> None:
    _, after = stream_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = threading.Event()
    server = threading.Thread(
        target=serve, args=(metered.model_copy(update={"metrics_port": port}), stop), daemon=True
    )
    server.start()
    try:
        for _ in range(50):
            try:
                served = scrape(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                threading.Event().wait(0.1)
        else:
            pytest.fail("the exporter did not answer")
    finally:
        stop.set()
        server.join(timeout=10)
    key = ("engagement_sink_rows_applied_total", (("sink", "kafka"),))
    assert served[key] == after[key]


def test_status_shows_checkpoints_dead_letters_and_what_to_do(
    stream_run: tuple[Samples, Samples], metered: Settings
) -> None:
    _, after = stream_run
    result = subprocess.run(
        [str(BIN / "engagement"), "status"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**metrics_env(metered), "COLUMNS": "200"},
    )
    out = result.stdout
    assert result.returncode == 1, out  # nothing consumes the slot: something to do
    checkpoint = int(after[("engagement_sink_checkpoint_lsn", (("sink", "redis"),))])
    for sink in ("clickhouse", "redis", "kafka"):
        line = next(line for line in out.splitlines() if f"│ {sink} " in line)
        assert format_lsn(checkpoint) in line and "no live run" in line, line
    assert f"dead letters not replayed: {INVALID}" in out
    assert f"unknown_event_type {INVALID}" in out
    assert "no stream run consumes the slot" in out
    assert "engagement dlq replay" in out
