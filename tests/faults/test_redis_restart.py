"""Redis restarted under a running stream: with its append-only file (killed with SIGKILL, so up
to its last second of writes may be gone), and without persistence (its data is gone).

A Redis that comes back with less than the stream applied (its checkpoint lower than the one
the stream last wrote, or missing) cannot be repaired from the slot, which has moved on: the
Redis sink rebuilds the keys the stream owns (the live board with its per-second buckets, and
the open 10m/1h/1d/1w windows) from a snapshot of PostgreSQL and continues from the snapshot's
position (lib/sinks/redis.py `RedisSink.rebuild`). Closed windows belong to the rollups.
Runs on the fault tests' private Redis; ClickHouse and Kafka must not notice.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from engagement_dagster.lib.local_services import LocalRedis
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.redis import read_window
from engagement_dagster.lib.source_db import connect
from engagement_dagster.lib.windows import WINDOW_SECONDS, WINDOWS, window_start
from tests.faults.conftest import FaultReport
from tests.faults.exactness import (
    check_exact,
    clickhouse_checkpoint,
    kafka_checkpoint,
    log_dir,
    mark_fault_end,
    wait_caught_up,
)
from tests.faults.stack import StreamProcess, final_drain, prepare, redis_ready, traffic, wait_until
from tests.support import VALID_EVENT

NAME = "redis_restart"
DOWN_S = 3.0
WINDOW_EVENTS = f"""
SELECT e.content_id::text, count(*), sum(coalesce(e.duration_ms, 0))
  FROM engagement_events e
 WHERE {VALID_EVENT} AND e.event_ts >= %(start)s AND e.event_ts < %(end)s
 GROUP BY 1
"""


@pytest.fixture(scope="module")
def world(private_services: Settings) -> Iterator[Settings]:
    yield prepare(private_services, NAME, seed=81)


def assert_open_windows_match_postgres(settings: Settings) -> None:
    """Each window open now (10m, 1h, 1d, 1w): events and engagement ms per content in Redis
    equal PostgreSQL's valid events of the window."""
    client = redis.Redis.from_url(settings.redis_url)
    now = datetime.now(UTC)
    try:
        for window in WINDOWS:
            start = window_start(window, now)
            end = datetime.fromtimestamp(start.timestamp() + WINDOW_SECONDS[window], UTC)
            with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
                cur.execute(WINDOW_EVENTS, {"start": start, "end": end})
                want = {cid: (int(n), int(ms)) for cid, n, ms in cur.fetchall()}
            held = read_window(client, window, start)
            got = {
                cid: (n, round(seconds * 1000))
                for cid, n, seconds in held.select(
                    "content_id", "events", "engagement_seconds_sum"
                ).iter_rows()
            }
            assert got == want, f"window {window} {start}: Redis differs from PostgreSQL"
    finally:
        client.close()


@pytest.mark.parametrize("persistence", ["aof", "none"])
def test_redis_restarted_under_load(
    world: Settings, fault_report: FaultReport, persistence: str
) -> None:
    service = LocalRedis(world)
    logs = log_dir(NAME)
    stream = StreamProcess(world, logs / f"stream-{persistence}.log", "--run-seconds", "600")
    try:
        with traffic(world, rate=400, seed=82 if persistence == "aof" else 83):
            time.sleep(8)
            others_before = (clickhouse_checkpoint(world) or 0, kafka_checkpoint(world))
            pid = int(service.pid_file.read_text().split()[0])
            if persistence == "aof":
                os.kill(pid, signal.SIGKILL)  # the AOF (fsync every second) is all that is left
            else:
                service.stop()
                shutil.rmtree(service.home / "appendonlydir")  # as a Redis without persistence
            time.sleep(DOWN_S)
            others_after = (clickhouse_checkpoint(world) or 0, kafka_checkpoint(world))
            service.start()
            wait_until(lambda: redis_ready(world.redis_url), timeout_s=60, what="Redis loaded")
            back = time.monotonic()
            target = mark_fault_end(world)
            caught = wait_caught_up(world, target, timeout_s=120, since=back)
            assert stream.alive(), stream.output()[-3000:]
            time.sleep(5)  # and on with live traffic
    finally:
        code = stream.stop()
    out = stream.output()
    assert code == 0, out[-3000:]
    assert all(a > b for a, b in zip(others_after, others_before, strict=True)), (
        f"ClickHouse and Kafka stalled while Redis was down: {others_before} -> {others_after}"
    )
    rebuilt = "rebuilt from a snapshot of the source" in out
    final_drain(world, logs / f"drain-{persistence}.log")
    how = "SIGKILL, AOF reloaded" if persistence == "aof" else "data gone"
    check_exact(
        fault_report, world, recovery_s=max(caught.values()),
        detail=f"Redis {how}, down {DOWN_S:.0f} s; "
        + ("lost data detected, live board and open windows rebuilt from PostgreSQL; "
           if rebuilt else "checkpoint intact, no rebuild; ")
        + f"Redis back -> caught up {caught}; open 10m/1h/1d/1w windows checked too",
    )  # fmt: skip
    assert_open_windows_match_postgres(world)
    assert rebuilt or persistence == "aof", out[-3000:]
