"""The embedded ClickHouse's long-held session: kept open while nobody else wants the database
(every reopen of chDB 4.4 leaks threads and memory), let go soon after another process waits."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from engagement_dagster.lib.clickhouse import ClickHouseSession

READER = """
import sys, time
from engagement_dagster.lib.clickhouse import clickhouse_client
started = time.monotonic()
with clickhouse_client(sys.argv[1], lock_timeout_s=30) as client:
    client.query("SELECT 1")
print(f"{time.monotonic() - started:.3f}")
"""


def test_held_while_nobody_waits_released_when_somebody_does(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'db'}"
    session = ClickHouseSession(dsn, hold_s=2.0, idle_s=0.5)
    with session.use() as client:
        client.command("CREATE TABLE IF NOT EXISTS t (x UInt8) ENGINE = Memory")
    client_before = session._client
    threads_after_open = psutil.Process().num_threads()
    deadline = time.monotonic() + 4  # past both hold_s and idle_s
    while time.monotonic() < deadline:
        with session.use() as client:
            client.query("SELECT count() FROM t")
        session.release_if_due()
        time.sleep(0.2)
    assert session._client is client_before, "reopened although nobody waited"
    assert psutil.Process().num_threads() <= threads_after_open + 2

    # Another process asks for the database while we keep using it: it gets it within
    # hold_s plus a tick, and we reopen afterwards.
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, dsn], stdout=subprocess.PIPE, text=True
    )
    while reader.poll() is None:
        with session.use() as client:
            client.query("SELECT 1")
        session.release_if_due()
        time.sleep(0.2)
    assert reader.returncode == 0
    assert reader.stdout is not None
    waited_s = float(reader.stdout.read().strip().splitlines()[-1])
    assert waited_s < 2.0 + 1.0, waited_s
    with session.use() as client:
        assert client.query("SELECT 1").result_rows == [(1,)]
    session.release()
