"""A transaction left open for over a minute while other traffic commits.

pgoutput sends a transaction at its commit, in commit order: an open one must neither delay the
others (they flow with their usual latency) nor be lost when it finally commits, although the
slot has been acknowledged past its first changes meanwhile. Its updates and deletes touch
events committed before it, with REPLICA IDENTITY FULL old rows.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator

import pytest

from engagement_dagster.lib.pgoutput import parse_lsn
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect
from tests.faults.conftest import FaultReport
from tests.faults.exactness import (
    check_exact,
    log_dir,
    mark_fault_end,
    redis_checkpoint,
    wait_caught_up,
)
from tests.faults.stack import StreamProcess, final_drain, prepare, traffic

NAME = "long_transaction"
OPEN_S = float(os.environ.get("ENGAGEMENT_LONG_TRANSACTION_SECONDS", "62"))
EVENTS = """
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,
                               raw_payload)
SELECT (SELECT id FROM content ORDER BY id OFFSET (i %% 50) LIMIT 1), gen_random_uuid(),
       (ARRAY['play', 'pause', 'finish', 'click'])[1 + i %% 4], now() - (i %% 120) * interval '1 s',
       (i * 37) %% 900000, 'ios', jsonb_build_object('app', '1.2', 'n', i)
  FROM generate_series(1, %s) AS i
"""
PROBE = """
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,
                               raw_payload)
SELECT id, gen_random_uuid(), 'play', now(), 1000, 'web', '{"probe": true}' FROM content LIMIT 1
"""


@pytest.fixture(scope="module")
def world(private_services: Settings) -> Iterator[Settings]:
    settings = prepare(private_services, NAME, seed=61)
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(EVENTS, (2000,))  # older events for the long transaction to change
    yield settings


def probe_latency_s(settings: Settings) -> float:
    """Commit one event; seconds until the Redis sink's checkpoint (moved atomically with its
    data) covers it."""
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(PROBE)
        committed = time.monotonic()
        cur.execute("SELECT pg_current_wal_insert_lsn()::text")  # past the probe's commit
        row = cur.fetchone()
    assert row is not None
    lsn = parse_lsn(row[0])
    while redis_checkpoint(settings) < lsn:
        assert time.monotonic() - committed < 60, "a probe was not applied within 60 s"
        time.sleep(0.02)
    return time.monotonic() - committed


def latencies(settings: Settings, seconds: float) -> list[float]:
    found, until = [], time.monotonic() + seconds
    while time.monotonic() < until:
        found.append(probe_latency_s(settings))
        time.sleep(0.5)
    return found


def test_a_transaction_open_for_over_a_minute(world: Settings, fault_report: FaultReport) -> None:
    logs = log_dir(NAME)
    stream = StreamProcess(world, logs / "stream.log", "--run-seconds", "600")
    try:
        with traffic(world, rate=300, seed=62):
            time.sleep(4)
            before = latencies(world, 8)
            with connect(world.pg_dsn, autocommit=False) as long_open, long_open.cursor() as cur:
                cur.execute(EVENTS, (1000,))
                cur.execute("SELECT min(id) FROM engagement_events")
                row = cur.fetchone()
                first = int(row[0]) if row and row[0] is not None else 0
                cur.execute(
                    "UPDATE engagement_events SET duration_ms = duration_ms + 1 "
                    "WHERE id BETWEEN %s AND %s", (first, first + 99),
                )  # fmt: skip
                cur.execute(
                    "DELETE FROM engagement_events WHERE id BETWEEN %s AND %s",
                    (first + 100, first + 149),
                )
                during = latencies(world, OPEN_S)
                long_open.commit()
            committed = time.monotonic()
            target = mark_fault_end(world)
            caught = wait_caught_up(world, target, timeout_s=120, since=committed)
            time.sleep(2)
    finally:
        code = stream.stop()
    out = stream.output()
    assert code == 0, out[-3000:]
    final_drain(world, logs / "drain.log")
    p50_before, p50_during = statistics.median(before), statistics.median(during)
    worst = max(during)
    check_exact(
        fault_report, world, recovery_s=max(caught.values()),
        detail=f"open {OPEN_S:.0f} s (1,000 inserts, 100 updates, 50 deletes); commit -> Redis "
        f"of other transactions meanwhile p50 {p50_during:.2f} s, max {worst:.2f} s "
        f"({len(during)} probes; before: p50 {p50_before:.2f} s); its commit -> caught up {caught}",
    )  # fmt: skip
    # "Normal latency": no worse than a loaded two-core machine gives without the open one.
    assert p50_during < max(3 * p50_before, 1.0), (before, during)
    assert worst < 5.0, during
