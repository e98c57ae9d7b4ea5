"""Crash safety: kill -9 the stream anywhere; after a final drain every sink equals PostgreSQL.

The stream runs as its own process (`engagement stream --until-caught-up`), exactly as the
Dagster run worker would, and dies by SIGKILL: at random moments while it drains a backlog,
and at the named fault-injection points between two sink writes and before the slot
acknowledgement. Nothing may be lost and nothing doubled.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engagement_dagster.lib.generator import TrafficOptions, run_traffic, seed_content
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect
from tests.faults.conftest import FaultReport
from tests.faults.exactness import check_exact

BIN = Path(sys.executable).parent
BACKLOG = int(os.environ.get("ENGAGEMENT_CRASH_BACKLOG", "200000"))
KILLS = int(os.environ.get("ENGAGEMENT_CRASH_KILLS", "20"))
MIX = {"update_ratio": 0.05, "delete_ratio": 0.02, "invalid_ratio": 0.01}


def stream_process(**env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "engagement"), "stream", "--until-caught-up", "--run-seconds", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )


def final_drain() -> None:
    done = subprocess.run(
        [str(BIN / "engagement"), "stream", "--until-caught-up", "--run-seconds", "900"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "caught up=True" in done.stdout, done.stdout[-2000:]


def timed_final_drain() -> float:
    """final_drain(), and how long it took."""
    started = time.monotonic()
    final_drain()
    return time.monotonic() - started


@pytest.fixture(scope="module")
def crash_db(source_dsn: str, clean_sinks: Settings) -> Settings:
    with connect(source_dsn) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE engagement_events, content")
    final_drain()
    seed_content(source_dsn, 300, seed=11)
    final_drain()
    return clean_sinks


def changes_in_slot(settings: Settings) -> int:
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s)",
            (settings.slot, settings.publication),
        )
        row = cur.fetchone()
    return int(row[0]) if row else 0


def test_kill_9_at_random_moments_while_draining_a_backlog(
    crash_db: Settings, fault_report: FaultReport
) -> None:
    # Generate until the backlog is there: a busy machine writes slower, never less.
    backlog, deadline = 0, time.monotonic() + 180
    while backlog < BACKLOG and time.monotonic() < deadline:
        report = run_traffic(
            crash_db.pg_dsn,
            TrafficOptions(rate=20_000, duration_s=(BACKLOG - backlog) / 8_000, workers=2,
                           seed=5 + backlog, content_update_ratio=0.0, **MIX),
        )  # fmt: skip
        backlog += report.inserted + report.updated + report.deleted + report.invalid
    assert backlog >= BACKLOG * 0.9, f"only {backlog} changes generated in 180 s"

    # More traffic keeps arriving while the stream is being killed, as in production.
    stop = threading.Event()
    live = threading.Thread(
        target=run_traffic,
        args=(crash_db.pg_dsn, TrafficOptions(rate=300, seed=6, content_update_ratio=0.0, **MIX)),
        kwargs={"stop": stop},
    )
    live.start()
    rng = random.Random(2026)
    kills = 0
    try:
        while kills < KILLS:
            process = stream_process()
            time.sleep(rng.uniform(1.0, 6.0))  # startup takes ~2-3 s: some die before work
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                kills += 1
            else:
                _, err = process.communicate()
                assert process.returncode == 0, err.decode()[-3000:]
    finally:
        stop.set()
        live.join(timeout=60)
    drained_in = timed_final_drain()
    check_exact(
        fault_report, crash_db, recovery_s=drained_in,
        detail=f"{kills} kill -9 while draining a {backlog:,}-change backlog under live "
        "traffic; recovery: the run after the last kill, start to caught up",
    )  # fmt: skip


@pytest.mark.parametrize(
    "fault", ["after_sink:redis", "after_sink:clickhouse", "after_sink:kafka", "before_ack"]
)
def test_kill_9_between_sink_writes_and_before_the_acknowledgement(
    crash_db: Settings, fault: str, fault_report: FaultReport
) -> None:
    run_traffic(
        crash_db.pg_dsn,
        TrafficOptions(rate=2_000, duration_s=2, seed=hash(fault) % 1000,
                       content_update_ratio=0.0, **MIX),
    )  # fmt: skip
    process = stream_process(ENGAGEMENT_FAULT=fault)
    _, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, err.decode()[-3000:]
    assert f"fault injection: kill -9 at {fault}" in err.decode()
    assert changes_in_slot(crash_db) > 0, "the slot moved past changes that were not applied"
    drained_in = timed_final_drain()
    check_exact(
        fault_report, crash_db, recovery_s=drained_in,
        detail=f"kill -9 at {fault}; recovery: the next run, start to caught up",
    )  # fmt: skip
