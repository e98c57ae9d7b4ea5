"""The slot invalidated by max_slot_wal_keep_size: detected, alerted and recovered by the README
runbook (restart from a point) in under five minutes, then exact.

The fault tests' private PostgreSQL runs with max_slot_wal_keep_size = 64MB for this module only
(ALTER SYSTEM, reloaded; reset at the end). The stream stops (a daemon outage) while traffic goes
on; WAL piles up past the limit and a checkpoint removes what the slot still needed, so
wal_status becomes `lost`. Then:
- detected: a stream run exits at once (code 4) with a message naming the runbook and its
  command; `engagement status` reports the lost slot and exits 1; the metrics exporter serves
  engagement_slot_wal_status{status="lost"} 1, which the alert EngagementSlotWalAtRisk fires on
  (the rule itself is unit-tested with promtool in tests/unit/test_alert_rules.py);
- recovered: `engagement restart --from <a minute before the stream stopped>` and a new stream
  run, while traffic goes on;
- exact: ClickHouse FINAL, the Redis board and Kafka (read_committed, newest version per event)
  equal PostgreSQL, the changes made while no stream ran included.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from engagement_dagster.lib.metrics import serve
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect, slot_info
from tests.faults.conftest import FaultReport
from tests.faults.exactness import check_exact, log_dir, mark_fault_end, wait_caught_up
from tests.faults.stack import (
    BIN,
    StreamProcess,
    final_drain,
    prepare,
    stream_env,
    traffic,
)
from tests.support import scrape

NAME = "slot_lost"
KEEP = "64MB"
RUNBOOK_LIMIT_S = 300.0


def set_keep_size(settings: Settings, value: str | None) -> None:
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        if value is None:
            cur.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        else:
            cur.execute(f"ALTER SYSTEM SET max_slot_wal_keep_size = '{value}'")
        cur.execute("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def world(private_services: Settings) -> Iterator[Settings]:
    settings = prepare(private_services, NAME, seed=101)
    set_keep_size(settings, KEEP)
    try:
        yield settings
    finally:
        set_keep_size(settings, None)


def wal_status(settings: Settings) -> str | None:
    with connect(settings.pg_dsn) as conn:
        info = slot_info(conn, settings.slot)
    return info.wal_status if info else None


def push_wal_past_the_limit(settings: Settings) -> None:
    """Switch WAL segments (16 MB each, traffic writes into every one) and checkpoint until the
    checkpointer has invalidated the slot."""
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        for _ in range(40):
            for _ in range(3):
                cur.execute("SELECT pg_switch_wal()")
                time.sleep(0.1)
            cur.execute("CHECKPOINT")
            if wal_status(settings) == "lost":
                return
    raise AssertionError(f"wal_status still {wal_status(settings)!r} after 120 segment switches")


def engagement(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "engagement"), *args], capture_output=True, text=True, timeout=600,
        env={**stream_env(settings), "COLUMNS": "200"},
    )  # fmt: skip


def exported_wal_status(settings: Settings) -> dict[str, float]:
    """The exporter's engagement_slot_wal_status samples of our slot: value by status."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    stop = threading.Event()
    exporter = threading.Thread(
        target=serve, args=(settings.model_copy(update={"metrics_port": port}), stop), daemon=True
    )
    exporter.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                samples = scrape(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline, "the exporter did not answer"
                time.sleep(0.2)
    finally:
        stop.set()
        exporter.join(timeout=10)
    return {
        dict(labels)["status"]: value
        for (name, labels), value in samples.items()
        if name == "engagement_slot_wal_status" and dict(labels).get("slot") == settings.slot
    }


def test_slot_invalidated_detected_and_recovered_by_the_runbook(
    world: Settings, fault_report: FaultReport
) -> None:
    logs = log_dir(NAME)
    stream = StreamProcess(world, logs / "stream.log", "--run-seconds", "600")
    with traffic(world, rate=400, seed=102):
        time.sleep(6)
        assert stream.stop() == 0, stream.output()[-3000:]
        stopped_at = datetime.now(UTC)  # from here on, no stream reads the slot
        time.sleep(5)
        push_wal_past_the_limit(world)

        # Detected: a stream run refuses with the runbook, status and metrics say lost.
        failed = StreamProcess(world, logs / "stream-lost.log", "--until-caught-up")
        code = failed.wait(timeout_s=120)
        detected = time.monotonic()
        message = failed.output()
        assert code == 4, message[-3000:]
        assert "can no longer be read" in message and "engagement restart --from" in message, (
            message[-3000:]
        )
        assert "Traceback" not in message, message[-3000:]
        status = engagement(world, "status")
        assert status.returncode == 1, status.stdout + status.stderr
        assert "wal_status is lost" in " ".join(status.stdout.split()), status.stdout
        assert exported_wal_status(world).get("lost") == 1.0

        # The runbook: restart from a point before the stream stopped, then a stream run again.
        start = (stopped_at - timedelta(minutes=1)).isoformat()
        restart = engagement(world, "restart", "--from", start)
        assert restart.returncode == 0, restart.stdout + restart.stderr
        assert wal_status(world) == "reserved"
        streaming = StreamProcess(world, logs / "stream-after.log", "--run-seconds", "600")
        try:
            target = mark_fault_end(world)
            caught = wait_caught_up(world, target, timeout_s=RUNBOOK_LIMIT_S, since=detected)
            time.sleep(3)  # live traffic on the new slot
        finally:
            assert streaming.stop() == 0, streaming.output()[-3000:]
    recovery_s = max(caught.values())
    final_drain(world, logs / "drain.log")
    check_exact(
        fault_report, world, recovery_s=recovery_s,
        detail=f"max_slot_wal_keep_size {KEEP}, slot lost while the stream was down; detected "
        "(stream exit 4 naming the runbook, `engagement status`, exporter wal_status=lost); "
        f"detection -> restart --from -> new run caught up {caught}",
    )  # fmt: skip
    assert recovery_s < RUNBOOK_LIMIT_S
