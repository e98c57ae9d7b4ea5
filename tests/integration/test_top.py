"""`engagement top` on the real Redis and PostgreSQL: the board it prints is the one in Redis.

Boards are written into the test Redis database (15) either directly on the contract keys or by
the Redis sink itself; each test removes what it wrote and leaves the sink's checkpoint as found.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import redis

from engagement_dagster.lib.board import TOP_CLIENT_NAME
from engagement_dagster.lib.enrich import DEAD_LETTERS_SCHEMA, DELTAS_SCHEMA, ENRICHED_ROWS_SCHEMA
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.base import SinkBatch
from engagement_dagster.lib.sinks.redis import (
    BUCKET_EVENTS,
    BUCKET_MS,
    CHECKPOINT_KEY,
    LIVE_KEYS,
    TOP_EVENTS,
    TOP_SECONDS,
    RedisSink,
)
from engagement_dagster.lib.source_db import connect
from engagement_dagster.lib.windows import window_start, window_stats_key, window_top_key

BIN = Path(sys.executable).parent
EMPTY_HINT = "no engagement in the last 10 minutes — is the stream running?"


def engagement_top(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "engagement"), "top", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", **env},
    )


def board_rows(stdout: str) -> list[list[str]]:
    """The table's data rows, split on whitespace (rank first)."""
    return [
        line.split()
        for line in stdout.splitlines()
        if line.split()[:1] and line.split()[0].isdigit()
    ]


@pytest.fixture
def board_redis(clean_sinks: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(clean_sinks.redis_url)
    client.delete(*LIVE_KEYS)
    yield client
    client.delete(*LIVE_KEYS)
    client.close()


@pytest.fixture
def catalogue(source_dsn: str) -> Iterator[list[str]]:
    """Three content items in the test database, removed afterwards."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    items = [
        (ids[0], "The long interview", "podcast"),
        (ids[1], "Morning briefing", "newsletter"),
        (ids[2], "Cats, explained", "video"),
    ]
    with connect(source_dsn) as conn, conn.cursor() as cur:
        for content_id, title, content_type in items:
            cur.execute(
                "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) "
                "VALUES (%s, %s, %s, %s, 3600, now())",
                (content_id, f"top-test-{content_id}", title, content_type),
            )
    yield ids
    with connect(source_dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM content WHERE id = ANY(%s::uuid[])", (ids,))


def test_top_prints_the_board_in_order_with_titles(
    board_redis: redis.Redis, catalogue: list[str]
) -> None:
    podcast, newsletter, video = catalogue
    board_redis.zadd(TOP_SECONDS, {podcast: 3725.5, newsletter: 65.0, video: 12.0})
    board_redis.zadd(TOP_EVENTS, {podcast: 3, newsletter: 40, video: 2})
    for key in (TOP_SECONDS, TOP_EVENTS):
        board_redis.expire(key, 660)

    done = engagement_top()
    assert done.returncode == 0, done.stderr
    assert "last 10 minutes" in done.stdout and "ranked by engagement seconds" in done.stdout
    assert "total 1h 03m engaged · 45 events · 3 items · refreshed" in done.stdout
    rows = board_rows(done.stdout)
    assert [row[:2] for row in rows] == [
        ["1", podcast[:8]],
        ["2", newsletter[:8]],
        ["3", video[:8]],
    ]
    lines = [line for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert "The long interview" in lines[0] and "podcast" in lines[0]
    assert "1h 02m" in lines[0] and " 3 " in lines[0] and "98.0%" in lines[0]
    assert "Morning briefing" in lines[1] and "newsletter" in lines[1]
    assert "1m 05s" in lines[1] and " 40 " in lines[1] and "1.7%" in lines[1]
    assert "Cats, explained" in lines[2] and "12s" in lines[2] and "0.3%" in lines[2]

    by_events = engagement_top("--by", "events", "--limit", "2")
    assert by_events.returncode == 0, by_events.stderr
    rows = board_rows(by_events.stdout)
    assert [row[1] for row in rows] == [newsletter[:8], podcast[:8]]
    assert "88.9%" in by_events.stdout and "ranked by events" in by_events.stdout


def test_top_reads_the_board_the_redis_sink_writes(
    board_redis: redis.Redis, catalogue: list[str], clean_sinks: Settings
) -> None:
    podcast, newsletter, _ = catalogue
    now = datetime.now(UTC).replace(microsecond=0)
    seconds_used = [int((now - timedelta(seconds=s)).timestamp()) for s in (5, 3)]
    deltas = pl.DataFrame(
        {
            "content_id": [podcast, newsletter, newsletter, podcast],
            "event_ts": [now - timedelta(seconds=5)] * 2 + [now - timedelta(seconds=3)] * 2,
            "engagement_seconds": [90.0, 1.5, 2.5, 30.25],
            "engagement_pct": [None, None, None, None],
            "events": [1, 1, 1, 1],
            "source_lsn": [1, 1, 1, 1],
            "seq": [0, 1, 2, 3],
        },
        schema=DELTAS_SCHEMA,
    )
    saved_checkpoint = board_redis.get(CHECKPOINT_KEY)
    saved_ttl = board_redis.ttl(CHECKPOINT_KEY)
    sink = RedisSink(clean_sinks.redis_url)
    try:
        batch = SinkBatch(
            last_lsn=sink.checkpoint() + 1,
            rows=ENRICHED_ROWS_SCHEMA.to_frame(),
            deltas=deltas.with_columns(source_lsn=pl.lit(sink.checkpoint() + 1, pl.UInt64)),
            dead_letters=DEAD_LETTERS_SCHEMA.to_frame(),
        )
        assert sink.apply(batch)
        done = engagement_top("--by", "events")
        by_seconds = engagement_top()
    finally:
        sink.close()
        for second in seconds_used:
            board_redis.delete(BUCKET_MS.format(second=second), BUCKET_EVENTS.format(second=second))
        if saved_checkpoint is None:
            board_redis.delete(CHECKPOINT_KEY)
        else:
            board_redis.set(CHECKPOINT_KEY, saved_checkpoint, ex=max(saved_ttl, 1))

    assert done.returncode == 0, done.stderr
    assert "total 2m 04s engaged · 4 events · 2 items" in done.stdout
    rows = board_rows(done.stdout)
    # Two events each: the tie on events goes to more seconds.
    assert [row[1] for row in rows] == [podcast[:8], newsletter[:8]]
    assert "50.0%" in done.stdout
    assert by_seconds.returncode == 0, by_seconds.stderr
    lines = [line for line in by_seconds.stdout.splitlines() if line.split()[:1] == ["1"]]
    assert "The long interview" in lines[0] and "2m 00s" in lines[0] and "96.8%" in lines[0]


def test_an_empty_board_says_where_to_look(board_redis: redis.Redis) -> None:
    done = engagement_top()
    assert done.returncode == 0, done.stderr
    assert EMPTY_HINT in done.stdout and "`engagement services status`" in done.stdout
    assert board_rows(done.stdout) == []


def test_window_boards_before_and_after_the_rollups_write_them(
    board_redis: redis.Redis, catalogue: list[str]
) -> None:
    podcast, newsletter, _ = catalogue
    # Keep clear of an hour boundary, so the window written is the one read.
    while (datetime.now(UTC) + timedelta(seconds=10)).hour != datetime.now(UTC).hour:
        time.sleep(1)
    missing = engagement_top("--window", "1h")
    assert missing.returncode == 0, missing.stderr
    assert "no data for window 1h yet (written by the rollups)" in missing.stdout

    start = window_start("1h", datetime.now(UTC))
    top_key = window_top_key("1h", start)
    stats = {c: window_stats_key("1h", start, c) for c in (podcast, newsletter)}
    try:
        board_redis.zadd(top_key, {podcast: 7200.0, newsletter: 600.0})
        board_redis.hset(stats[podcast], mapping={"events": 12, "engagement_seconds": 7200.0})
        board_redis.hset(stats[newsletter], mapping={"events": 30, "engagement_seconds": 600.0})
        for key in (top_key, *stats.values()):
            board_redis.expire(key, 120)
        done = engagement_top("--window", "1h", "--by", "events")
    finally:
        board_redis.delete(top_key, *stats.values())
    assert done.returncode == 0, done.stderr
    assert f"window 1h from {start:%Y-%m-%d %H:%M} UTC" in done.stdout
    assert "total 2h 10m engaged · 42 events · 2 items (the window's top 100)" in done.stdout
    rows = board_rows(done.stdout)
    assert [row[1] for row in rows] == [newsletter[:8], podcast[:8]]
    assert "71.4%" in done.stdout and "2h 00m" in done.stdout


def deliverable_sigint() -> None:
    """In the child before exec: SIGINT as in a terminal. A session started in the background
    (`cmd &` in a script) has it ignored, and a thread's blocked signals are inherited too;
    either way the child's Ctrl-C would never arrive (two fresh-clone runs: top watched on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_watch_refreshes_until_ctrl_c_and_exits_0(
    board_redis: redis.Redis, catalogue: list[str]
) -> None:
    podcast = catalogue[0]
    board_redis.zadd(TOP_SECONDS, {podcast: 42.0})
    board_redis.zadd(TOP_EVENTS, {podcast: 1})
    process = subprocess.Popen(
        [str(BIN / "engagement"), "top", "--watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=deliverable_sigint,
    )
    # Ctrl-C once it follows the board, not while it starts: its start-up takes seconds on a
    # busy machine, and psycopg2's C module initialisation swallows a KeyboardInterrupt raised
    # in an import it makes (reproduced: SIGINT 0.47 s into the start). It names its Redis
    # connection; a second later it has refreshed.
    try:
        deadline = time.monotonic() + 60
        while not any(c.get("name") == TOP_CLIENT_NAME for c in board_redis.client_list()):
            assert process.poll() is None, "top --watch exited on its own"
            assert time.monotonic() < deadline, "top --watch did not read the board within 60 s"
            time.sleep(0.1)
        time.sleep(1.5)
        assert process.poll() is None, "top --watch exited on its own"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        process.kill()  # a no-op once it has exited
        process.communicate()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "The long interview" in stdout and "42s" in stdout
    assert "refreshing every second · Ctrl-C to quit" in stdout


def test_an_unreachable_redis_is_an_error_with_the_fix() -> None:
    done = engagement_top(ENGAGEMENT_REDIS_URL="redis://127.0.0.1:1/15")
    assert done.returncode == 1
    assert "cannot read the board from Redis at redis://127.0.0.1:1/15" in done.stdout
    assert "engagement services status" in done.stdout
