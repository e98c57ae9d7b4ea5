"""PostgreSQL restarted under a running stream: the replication connection drops mid-stream.

The stream run must survive it: reconnect once the server is back and continue from the slot,
every sink skipping what it already applied. Runs on the fault tests' private PostgreSQL (a
restart of the shared one would cut off every other session), under live traffic that keeps
committing before, and (after a few failed commits while the server is down) after, the restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from engagement_dagster.lib.local_services import LocalPostgres
from engagement_dagster.lib.settings import Settings
from tests.faults.conftest import FaultReport
from tests.faults.exactness import check_exact, log_dir, mark_fault_end, wait_caught_up
from tests.faults.stack import StreamProcess, crash_postgres, final_drain, prepare, traffic

NAME = "postgres_restart"


@pytest.fixture(scope="module")
def world(private_services: Settings) -> Iterator[Settings]:
    yield prepare(private_services, NAME, seed=31)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_mid_stream(world: Settings, fault_report: FaultReport, mode: str) -> None:
    postgres = LocalPostgres(world)
    logs = log_dir(NAME)
    stream = StreamProcess(world, logs / f"stream-{mode}.log", "--run-seconds", "600")
    try:
        with traffic(world, rate=400, seed=hash(mode) % 1000, resilient=True):
            time.sleep(10)  # streaming under load
            if mode == "fast":
                postgres.stop()  # fast shutdown: the walsender is told to stop
            else:
                crash_postgres(postgres)  # as a crash: no shutdown checkpoint
            time.sleep(3)
            postgres.start()
            back = time.monotonic()
            target = mark_fault_end(world)
            caught = wait_caught_up(world, target, timeout_s=120, since=back)
            recovery_s = max(caught.values())
            assert stream.alive(), (
                "the stream run died with the replication connection:\n" + (stream.output()[-3000:])
            )
            time.sleep(5)  # and it keeps streaming the traffic after the restart
    finally:
        code = stream.stop()
    out = stream.output()
    assert code == 0, out[-3000:]
    assert "reconnect" in out, out[-3000:]
    final_drain(world, logs / f"drain-{mode}.log")
    check_exact(
        fault_report, world, recovery_s=recovery_s,
        detail=f"PostgreSQL {mode} stop, down 3 s; server back -> sinks caught up {caught}",
    )  # fmt: skip
