"""SinkWorker: retries with exponential backoff and jitter, whatever the batch rate; the
first-batch log line."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import polars as pl
import pytest

from engagement_dagster.lib.enrich import DEAD_LETTERS_SCHEMA, DELTAS_SCHEMA, ENRICHED_ROWS_SCHEMA
from engagement_dagster.lib.sinks.base import Sink, SinkBatch
from engagement_dagster.lib.stream import SinkWorker, StreamOptions, StreamReport


class MemorySink(Sink):
    """A sink in memory from checkpoint `start`: records when each write was tried and the
    batches it wrote; `down` makes every write fail (a broker that is down)."""

    name = "memory"

    def __init__(self, *, start: int = 0, down: bool = False) -> None:
        super().__init__()
        self.start, self.down = start, down
        self.attempts: list[float] = []
        self.written: list[int] = []

    def read_checkpoint(self) -> int:
        return self.start

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        self.attempts.append(time.monotonic())
        if self.down:
            raise ConnectionError("broker down")
        self.written.append(batch.last_lsn)


def _batch(lsn: int) -> SinkBatch:
    return SinkBatch(
        last_lsn=lsn,
        rows=pl.DataFrame(schema=ENRICHED_ROWS_SCHEMA),
        deltas=pl.DataFrame(schema=DELTAS_SCHEMA),
        dead_letters=pl.DataFrame(schema=DEAD_LETTERS_SCHEMA),
        first_commit_at=datetime.now(UTC),
        last_commit_at=datetime.now(UTC),
    )


def test_new_batches_do_not_cut_the_backoff_short() -> None:
    sink = MemorySink(down=True)
    options = StreamOptions(retry_base_s=0.4, retry_max_s=1.6)
    worker = SinkWorker(sink, options, StreamReport())
    stop = threading.Event()
    worker.start()
    deadline = time.monotonic() + 4.0
    lsn = 1
    while time.monotonic() < deadline:  # a batch every 50 ms, as a live stream submits them
        worker.submit(_batch(lsn), stop=stop)
        lsn += 1
        time.sleep(0.05)
    worker.close(timeout_s=2)
    gaps = [b - a for a, b in zip(sink.attempts, sink.attempts[1:], strict=False)]
    # Backoff 0.4, 0.8, 1.6, 1.6 s (jitter: 50-100% of it): a handful of tries in 4 s, not 80.
    assert 3 <= len(sink.attempts) <= 8, sink.attempts
    assert all(gap >= 0.19 for gap in gaps), gaps
    assert max(gaps) <= 1.6 + 0.3, gaps  # retry_max_s caps it


def test_first_batch_is_logged_once_when_it_passes_the_checkpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A successor re-reads what a sink already has: those batches are skipped, not "applied"."""
    sink = MemorySink(start=100)
    worker = SinkWorker(sink, StreamOptions(), StreamReport())
    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="engagement.stream"):
        worker.start()
        for lsn in (50, 80, 150, 200):
            worker.submit(_batch(lsn), stop=stop)
            deadline = time.monotonic() + 5
            while not worker.idle and time.monotonic() < deadline:
                time.sleep(0.01)
        worker.close(timeout_s=2)
    logged = [r.getMessage() for r in caplog.records if "first batch applied" in r.getMessage()]
    assert sink.written == [150, 200]
    assert len(logged) == 1 and logged[0].startswith("sink memory: first batch applied")
