"""One transaction of a million inserts (INSERT ... SELECT generate_series) without running out of
memory, applied exactly once by every sink.

The stream cuts batches at whole transactions, so this transaction is one batch from the
decoder to the sinks. The stream process's resident memory is sampled every 0.1 s (psutil) and
its peak must stay under RSS_LIMIT_MB. Measured on the two-core machine: 380 MB idle (chDB,
librdkafka), 2.26 GB at the peak, while the transaction is decoded into Python objects (~0.8 GB),
framed as text (~0.4 GB) and enriched (~0.3 GB); the bound leaves 25% for variation. It was
3.9 GB before the transaction stopped being read twice and the Kafka JSON all at once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect
from tests.faults.conftest import FaultReport
from tests.faults.exactness import check_exact, log_dir, mark_fault_end, wait_caught_up
from tests.faults.stack import StreamProcess, prepare, wait_until

NAME = "huge_transaction"
ROWS = int(os.environ.get("ENGAGEMENT_HUGE_TRANSACTION_ROWS", "1000000"))
RSS_LIMIT_MB = float(os.environ.get("ENGAGEMENT_HUGE_TRANSACTION_RSS_MB", "2800"))
# Event times spread over the last five minutes, so the live board counts all of them.
MILLION = """
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,
                               raw_payload)
SELECT c.ids[1 + i %% array_length(c.ids, 1)], gen_random_uuid(),
       (ARRAY['play', 'pause', 'finish', 'click'])[1 + i %% 4],
       now() - (i %% 300) * interval '1 s', (i * 37) %% 900000,
       (ARRAY['ios', 'android', 'web'])[1 + i %% 3], jsonb_build_object('app', '1.2', 'n', i)
  FROM generate_series(1, %s) AS i, (SELECT array_agg(id ORDER BY id) AS ids FROM content) AS c
"""


class PeakRss(threading.Thread):
    """The highest resident memory of a process, sampled every 0.1 s until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="peak-rss", daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return


@pytest.fixture(scope="module")
def world(private_services: Settings) -> Iterator[Settings]:
    yield prepare(private_services, NAME, seed=71)


def test_a_million_row_transaction(world: Settings, fault_report: FaultReport) -> None:
    logs = log_dir(NAME)
    stream = StreamProcess(world, logs / "stream.log", "--run-seconds", "900")
    sampler = PeakRss(stream.pid)
    sampler.start()
    try:
        wait_until(lambda: " open in " in stream.output() or not stream.alive(),
                   timeout_s=60, what="the stream holding the slot")  # fmt: skip
        time.sleep(3)  # its sinks set up
        idle_mb = sampler.process.memory_info().rss / 2**20
        started = time.monotonic()
        with connect(world.pg_dsn) as conn, conn.cursor() as cur:
            cur.execute(MILLION, (ROWS,))
        committed = time.monotonic()
        target = mark_fault_end(world)
        caught = wait_caught_up(world, target, timeout_s=600, since=committed)
    finally:
        sampler.stop.set()
        code = stream.stop()
    out = stream.output()
    assert code == 0, out[-3000:]
    peak_mb = sampler.peak / 2**20
    check_exact(
        fault_report, world, recovery_s=max(caught.values()),
        detail=f"{ROWS:,} rows in one INSERT (committed in {committed - started:.0f} s); commit "
        f"-> caught up {caught}; stream RSS idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB "
        f"(limit {RSS_LIMIT_MB:.0f} MB)",
    )  # fmt: skip
    assert peak_mb < RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
