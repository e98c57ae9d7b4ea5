"""Two stream runs started at the same moment: only one consumes the slot, the other exits at
once with a clear message, and nothing is applied twice.

The slot is exclusive in PostgreSQL: the second START_REPLICATION fails, before the losing run has
touched any sink (its sink workers start only once the slot is open). Under Dagster the successor
of a live run waits for the slot instead (tests/integration/test_dagster_stream.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect
from tests.faults.conftest import FaultReport
from tests.faults.exactness import check_exact, log_dir
from tests.faults.stack import StreamProcess, final_drain, prepare, traffic, wait_until

NAME = "two_streams"
CONSUMERS = "SELECT count(*) FROM pg_stat_replication WHERE application_name = %s"


@pytest.fixture(scope="module")
def world(private_services: Settings) -> Iterator[Settings]:
    yield prepare(private_services, NAME, seed=41)


def consumers(settings: Settings) -> int:
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(CONSUMERS, (f"engagement-stream:{settings.slot}",))
        row = cur.fetchone()
    return int(row[0]) if row else 0


def test_two_stream_runs_started_at_once(world: Settings, fault_report: FaultReport) -> None:
    logs = log_dir(NAME)
    with traffic(world, rate=400, seed=42):
        time.sleep(2)
        started = time.monotonic()
        runs = [StreamProcess(world, logs / f"run-{i}.log", "--run-seconds", "600") for i in (1, 2)]
        try:
            wait_until(lambda: not all(r.alive() for r in runs), timeout_s=60,
                       what="one of two simultaneous stream runs exits")  # fmt: skip
            resolved_s = time.monotonic() - started
            losers = [r for r in runs if not r.alive()]
            (winner,) = [r for r in runs if r.alive()]
            assert len(losers) == 1
            (loser,) = losers
            out = loser.output()
            assert loser.process.returncode != 0, out[-2000:]
            assert "is in use by another process" in out, out[-3000:]
            assert "Traceback" not in out, out[-3000:]
            time.sleep(5)  # the winner streams on alone
            assert winner.alive(), winner.output()[-3000:]
            assert consumers(world) == 1
        finally:
            codes = [r.stop() for r in runs]
    assert codes[runs.index(winner)] == 0, winner.output()[-3000:]
    assert "sink redis: first batch" not in loser.output()
    final_drain(world, logs / "drain.log")
    check_exact(
        fault_report, world, recovery_s=resolved_s,
        detail=f"the second run exited {resolved_s:.1f} s after both started, code "
        f"{loser.process.returncode}, 'not started: ... in use by another process'; the first "
        "streamed on",
    )  # fmt: skip
