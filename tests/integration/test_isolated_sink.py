"""The embedded ClickHouse sink in a process of its own: the same writes and checkpoints as
in-process, its exceptions come back by type, it dies with a stream killed -9, and other
processes reopening chDB no longer freeze the stream's threads."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import psutil
import pytest

from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.enrich import DEAD_LETTERS_SCHEMA, DELTAS_SCHEMA, ENRICHED_ROWS_SCHEMA
from engagement_dagster.lib.sinks.base import Sink, SinkBatch
from engagement_dagster.lib.sinks.clickhouse import SINK_NAME, ClickHouseSink
from engagement_dagster.lib.sinks.isolated import IsolatedSink, SinkProcessError


def empty_batch(lsn: int) -> SinkBatch:
    return SinkBatch(
        last_lsn=lsn,
        rows=ENRICHED_ROWS_SCHEMA.to_frame(),
        deltas=DELTAS_SCHEMA.to_frame(),
        dead_letters=DEAD_LETTERS_SCHEMA.to_frame(),
    )


class Refusing(Sink):
    """A sink whose writes fail with a ValueError, built in the child."""

    name = "refusing"

    def read_checkpoint(self) -> int:
        return 7

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        if batch.last_lsn == SLOW_LSN:
            time.sleep(60)
        raise ValueError(f"refused batch {batch.last_lsn} above {checkpoint}")


SLOW_LSN = 99


def test_writes_and_checkpoints_as_in_process(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'db'}"
    sink = IsolatedSink(SINK_NAME, functools.partial(ClickHouseSink, dsn, hold_s=1.0))
    try:
        sink.setup()
        assert sink.pid is not None and sink.pid != os.getpid()
        assert sink.checkpoint() == 0
        assert sink.apply(empty_batch(100))
        assert not sink.apply(empty_batch(90))  # at or below the checkpoint: nothing to do
        assert sink.read_checkpoint() == 100
    finally:
        sink.close()
    assert sink.pid is None and sink.exit_code == 0
    with clickhouse_client(dsn) as client:  # the child let go of the database
        rows = client.query("SELECT max(lsn) FROM engagement._checkpoints").result_rows
    assert rows == [(100,)]


def test_the_child_outlives_the_thread_that_started_it_and_closes_cleanly(tmp_path: Path) -> None:
    """A stream's sink worker thread starts the child and ends before the sink is closed."""
    dsn = f"chdb://{tmp_path / 'db'}"
    sink = IsolatedSink(SINK_NAME, functools.partial(ClickHouseSink, dsn))
    worker = threading.Thread(target=lambda: (sink.setup(), sink.apply(empty_batch(3))))
    worker.start()
    worker.join(60)
    assert sink.pid is not None
    time.sleep(1.0)
    child = psutil.Process(sink.pid)
    assert child.status() != psutil.STATUS_ZOMBIE
    sink.close()
    assert sink.exit_code == 0  # closed, not killed


def test_exceptions_come_back_by_type_and_a_dead_child_is_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = IsolatedSink("refusing", Refusing)
    try:
        assert sink.checkpoint() == 7
        with pytest.raises(ValueError, match="refused batch 9 above 7"):
            sink.apply(empty_batch(9))
        first = sink.pid
        assert first is not None
        threading.Timer(1.0, os.kill, (first, signal.SIGKILL)).start()
        with pytest.raises(SinkProcessError, match=r"process ended .* during write"):
            sink.apply(empty_batch(SLOW_LSN))  # the child dies in the middle of it
        assert sink.read_checkpoint() == 7  # a new child
        second = sink.pid
        assert second not in (None, first)

        os.kill(second, signal.SIGKILL)  # between calls: the next call starts another
        psutil.Process(second).wait(timeout=10)
        assert sink.read_checkpoint() == 7
        assert sink.pid not in (None, first, second)
        assert "process ended (exit code" in caplog.text
    finally:
        sink.close()


PARENT = """
import functools, sys, time
from engagement_dagster.lib.sinks.clickhouse import SINK_NAME, ClickHouseSink
from engagement_dagster.lib.sinks.isolated import IsolatedSink
sink = IsolatedSink(SINK_NAME, functools.partial(ClickHouseSink, sys.argv[1]))
sink.setup()
print(sink.pid, flush=True)
time.sleep(600)
"""


def test_the_child_dies_with_a_parent_killed_minus_9(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'db'}"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, dsn], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.ppid() == parent.pid
        parent.kill()
        parent.wait(10)
        child.wait(timeout=10)  # gone, not orphaned with the database locked
    finally:
        parent.kill()
    started = time.monotonic()
    with clickhouse_client(dsn, lock_timeout_s=10) as client:
        assert client.query("SELECT 1").result_rows == [(1,)]
    assert time.monotonic() - started < 5


def test_another_process_reopening_chdb_does_not_freeze_this_one(tmp_path: Path) -> None:
    """The sink holds the database while this process's threads keep ticking; one reader
    after another makes the child hand it over and reopen it. No tick here may wait for that.
    Opening chDB loads every part; with 2,000 of them an in-process open held the GIL ~0.47 s."""
    dsn = f"chdb://{tmp_path / 'db'}"
    with clickhouse_client(dsn) as client:
        client.command("CREATE DATABASE IF NOT EXISTS parts")
        client.command(
            "CREATE TABLE parts.many (k UInt32) ENGINE = MergeTree PARTITION BY k ORDER BY k"
        )
        client.command(
            "INSERT INTO parts.many SELECT number FROM numbers(2000) "
            "SETTINGS max_partitions_per_insert_block = 0"
        )
    sink = IsolatedSink(SINK_NAME, functools.partial(ClickHouseSink, dsn, hold_s=0.5))
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.002)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick, daemon=True)
    finished = 0  # readers that got the database and ended
    lsn = 0
    try:
        sink.setup()
        ticker.start()
        deadline = time.monotonic() + 90
        reader = subprocess.Popen([sys.executable, "-c", READ_ONCE, dsn])
        while finished < 3 and time.monotonic() < deadline:
            lsn += 1
            sink.apply(empty_batch(lsn))
            sink.tick()
            if reader.poll() is not None:
                assert reader.returncode == 0
                finished += 1
                reader = subprocess.Popen([sys.executable, "-c", READ_ONCE, dsn])
            time.sleep(0.05)
        reader.kill()
        stop.set()
        assert sink.read_checkpoint() == lsn
    finally:
        stop.set()
        sink.close()
    assert finished == 3, f"only {finished} readers got the database in 90 s"
    # In-process, each reopen held the GIL 0.1-0.5 s (more on a busy machine).
    assert max(gaps) < 0.2, f"a thread of this process waited {max(gaps):.3f} s"


READ_ONCE = """
import sys
from engagement_dagster.lib.clickhouse import clickhouse_client
with clickhouse_client(sys.argv[1], lock_timeout_s=30) as client:
    client.query("SELECT count() FROM engagement._checkpoints")
"""


def test_frames_cross_the_process_boundary_whole(tmp_path: Path) -> None:
    """Not just empty batches: rows and dead letters arrive with their types."""
    dsn = f"chdb://{tmp_path / 'db'}"
    sink = IsolatedSink(SINK_NAME, functools.partial(ClickHouseSink, dsn))
    letters = pl.DataFrame(
        {
            "source_lsn": [5],
            "event_id": [1],
            "reason": ["null_content_id"],
            "op": ["I"],
            "raw_change": ['{"id": 1}'],
            "source_committed_at": [datetime(2026, 11, 25, tzinfo=UTC)],
        },
        schema=DEAD_LETTERS_SCHEMA,
    )
    batch = SinkBatch(
        last_lsn=5,
        rows=ENRICHED_ROWS_SCHEMA.to_frame(),
        deltas=DELTAS_SCHEMA.to_frame(),
        dead_letters=letters,
    )
    try:
        sink.setup()
        assert sink.apply(batch)
    finally:
        sink.close()
    with clickhouse_client(dsn) as client:
        rows = client.query("SELECT lsn, reason FROM engagement.dead_letters").result_rows
    assert rows == [(5, "null_content_id")]
