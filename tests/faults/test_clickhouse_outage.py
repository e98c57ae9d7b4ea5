"""ClickHouse unavailable under load: Redis and Kafka stay fresh, ClickHouse catches up.

Embedded chDB can be open in one process at a time, behind a file lock (lib/clickhouse.py). The
test takes that lock from its own process and holds it for longer than the stream's lock timeout
(60 s): the ClickHouse writer first hangs waiting (and is marked stalled, so the reader never
waits for it), then fails and retries with backoff, exactly as it would against a ClickHouse
server that is down. The other sinks must not notice; nothing may be lost or doubled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from engagement_dagster.lib.clickhouse import _acquire_lock, _release_lock, chdb_path
from engagement_dagster.lib.settings import Settings
from tests.faults.conftest import FaultReport
from tests.faults.exactness import (
    check_exact,
    kafka_checkpoint,
    log_dir,
    mark_fault_end,
    redis_checkpoint,
    wait_caught_up,
)
from tests.faults.stack import StreamProcess, final_drain, prepare, traffic

NAME = "clickhouse_outage"
OUTAGE_S = float(os.environ.get("ENGAGEMENT_CLICKHOUSE_OUTAGE_SECONDS", "65"))


@pytest.fixture(scope="module")
def world(private_services: Settings) -> Iterator[Settings]:
    yield prepare(private_services, NAME, seed=51)


def test_clickhouse_unavailable_under_load(world: Settings, fault_report: FaultReport) -> None:
    path = chdb_path(world.clickhouse_dsn)
    assert path is not None, "this scenario needs embedded ClickHouse"
    logs = log_dir(NAME)
    stream = StreamProcess(world, logs / "stream.log", "--run-seconds", "600")
    try:
        with traffic(world, rate=400, seed=52):
            time.sleep(6)
            lock = _acquire_lock(path, timeout_s=60)  # the stream lets go once we wait
            stale: list[tuple[bool, bool]] = []
            try:
                until = time.monotonic() + OUTAGE_S
                while time.monotonic() < until:
                    redis_before, kafka_before = redis_checkpoint(world), kafka_checkpoint(world)
                    time.sleep(5)
                    stale.append(
                        (redis_checkpoint(world) > redis_before,
                         kafka_checkpoint(world) > kafka_before)
                    )  # fmt: skip
                    assert stream.alive(), stream.output()[-3000:]
            finally:
                back = time.monotonic()
                target = mark_fault_end(world)
                _release_lock(lock)
            assert all(r and k for r, k in stale), f"(redis, kafka) fresh every 5 s: {stale}"
            caught = wait_caught_up(world, target, timeout_s=120, since=back)
            time.sleep(3)
    finally:
        code = stream.stop()
    out = stream.output()
    assert code == 0, out[-3000:]
    assert "sink clickhouse failed" in out, out[-3000:]  # the lock timeout, then retries
    final_drain(world, logs / "drain.log")
    check_exact(
        fault_report, world, recovery_s=max(caught.values()),
        detail=f"chDB locked by another process for {OUTAGE_S:.0f} s; Redis and Kafka moved "
        f"in each of {len(stale)} 5-s checks; lock released -> caught up {caught}",
    )  # fmt: skip
