"""The Redis sink on the real Redis: the incremental live board and the window keys.

A driven clock lets a test slide the board through minutes of event time in a second; the
reference is recomputed from every contribution, so a drift of one millisecond or one event in
the incremental board fails.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
import redis

from engagement_dagster.lib.enrich import DEAD_LETTERS_SCHEMA, DELTAS_SCHEMA, ENRICHED_ROWS_SCHEMA
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.base import SinkBatch
from engagement_dagster.lib.sinks.redis import (
    BOARD_STATE,
    TOP_EVENTS,
    TOP_SECONDS,
    WINDOW_ROLLUP_SCHEMA,
    RedisSink,
    read_window,
    rewrite_window,
)
from engagement_dagster.lib.windows import (
    window_members_key,
    window_start,
    window_stats_key,
    window_top_key,
)

WINDOW_S = 60  # a short live window: the test slides through it several times
T0 = 1_800_000_000  # 2027-01-15T08:00:00Z, a fixed event-time origin


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(services: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(services.redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def deltas_frame(rows: list[tuple[str, int, float, float | None, int]], lsn: int) -> pl.DataFrame:
    """(content_id, epoch second, engagement seconds, engagement pct, sign) contributions."""
    return pl.DataFrame(
        {
            "content_id": [r[0] for r in rows],
            "event_ts": [datetime.fromtimestamp(r[1], UTC) for r in rows],
            "engagement_seconds": [r[4] * r[2] for r in rows],
            "engagement_pct": [None if r[3] is None else r[4] * r[3] for r in rows],
            "events": [r[4] for r in rows],
            "source_lsn": [lsn] * len(rows),
            "seq": list(range(len(rows))),
        },
        schema=DELTAS_SCHEMA,
    )


def batch(deltas: pl.DataFrame, lsn: int) -> SinkBatch:
    return SinkBatch(
        last_lsn=lsn,
        rows=ENRICHED_ROWS_SCHEMA.to_frame(),
        deltas=deltas,
        dead_letters=DEAD_LETTERS_SCHEMA.to_frame(),
    )


def board(client: redis.Redis) -> dict[str, tuple[float, int]]:
    seconds = {k.decode(): v for k, v in client.zrange(TOP_SECONDS, 0, -1, withscores=True)}
    events = {k.decode(): int(v) for k, v in client.zrange(TOP_EVENTS, 0, -1, withscores=True)}
    assert set(seconds) == set(events)
    return {cid: (seconds[cid], events[cid]) for cid in events}


def test_the_incremental_board_equals_a_recount_at_every_step(client: redis.Redis) -> None:
    """Random increments and retractions, early, late, future and out-of-window event times,
    idle gaps that force a rebuild: after each batch and tick the board is exactly the sum of
    what happened in the last WINDOW_S seconds up to now."""
    rng = random.Random(7)
    items = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(12)]
    clock = Clock(T0)
    sink = RedisSink(_url(client), window_s=WINDOW_S, clock=clock)
    applied: list[tuple[str, int, int, int]] = []  # content, second, ms, events (as applied)
    alive: list[tuple[str, int, float]] = []  # added and not yet retracted
    lsn = 0
    try:
        for step in range(240):
            clock.now += rng.choice([0.2, 0.5, 1, 1, 2, 3]) + (45 if step % 80 == 79 else 0)
            now = int(clock.now)
            rows = []
            for _ in range(rng.randint(0, 6)):
                if alive and rng.random() < 0.3:  # an update's or delete's old image
                    cid, second, seconds = alive.pop(rng.randrange(len(alive)))
                    rows.append((cid, second, seconds, None, -1))
                else:
                    second = now - rng.randint(-3, WINDOW_S + 5)  # a few future, a few too old
                    rows.append((rng.choice(items), second, rng.randint(0, 90_000) / 1000, None, 1))
            lsn += 1
            if rows:
                assert sink.apply(batch(deltas_frame(rows, lsn), lsn))
                for cid, second, seconds, _, sign in rows:
                    if second > now - WINDOW_S:  # the sink drops what is already out
                        applied.append((cid, second, sign * round(seconds * 1000), sign))
                        if sign == 1:
                            alive.append((cid, second, seconds))
            else:
                sink.tick()
            assert board(client) == reference(applied, now), f"step {step}"
        assert client.ttl(BOARD_STATE) > 0 and client.ttl(TOP_SECONDS) > 0
    finally:
        sink.close()


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw['db']}"


def reference(applied: list[tuple[str, int, int, int]], now: int) -> dict[str, tuple[float, int]]:
    """What the board must hold: per content, the contributions with second in (now - W, now]."""
    ms: dict[str, int] = defaultdict(int)
    events: dict[str, int] = defaultdict(int)
    for cid, second, m, e in applied:
        if now - WINDOW_S < second <= now:
            ms[cid] += m
            events[cid] += e
    return {cid: (ms[cid] * 0.001, n) for cid, n in events.items() if n > 0}


def test_a_replayed_batch_changes_nothing(client: redis.Redis) -> None:
    clock = Clock(T0)
    sink = RedisSink(_url(client), window_s=WINDOW_S, clock=clock)
    cid = str(uuid.uuid4())
    try:
        first = batch(deltas_frame([(cid, T0 - 5, 12.5, None, 1)], 10), 10)
        assert sink.apply(first)
        again = RedisSink(_url(client), window_s=WINDOW_S, clock=clock)
        assert not again.apply(first)  # the checkpoint in Redis says it is done
        again.close()
        assert board(client) == {cid: (12.5, 1)}
    finally:
        sink.close()


def test_the_stream_keeps_open_windows_and_leaves_closed_ones_to_the_rollups(
    client: redis.Redis,
) -> None:
    now = datetime(2027, 1, 15, 8, 14, 30, tzinfo=UTC)  # 10m window 08:10 open; 08:00 closed
    clock = Clock(now.timestamp())
    ttls = {"10m": 3600, "1h": 7200, "1d": 86_400, "1w": 864_000}
    sink = RedisSink(_url(client), window_ttls=ttls, lateness_s=120, clock=clock)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    open_s = int((now - timedelta(minutes=2)).timestamp())  # 08:12:30
    late_s = int((now - timedelta(minutes=5)).timestamp())  # 08:09:30: closed 4.5 min ago
    try:
        rows = [
            (a, open_s, 30.0, 50.0, 1),
            (a, open_s, 10.5, None, 1),
            (b, open_s, 4.25, 12.5, 1),
            (b, late_s, 100.0, 10.0, 1),
        ]
        assert sink.apply(batch(deltas_frame(rows, 1), 1))
        start_10m = window_start("10m", now)
        want = pl.DataFrame(
            [(a, 2, 40.5, 50.0, 1), (b, 1, 4.25, 12.5, 1)],
            schema=WINDOW_ROLLUP_SCHEMA,
            orient="row",
        )
        assert read_window(client, "10m", start_10m).equals(want.sort("content_id"))
        stats = client.hgetall(window_stats_key("10m", start_10m, a))
        assert stats[b"events"] == b"2" and float(stats[b"engagement_seconds"]) == 40.5
        assert float(stats[b"avg_engagement_pct"]) == 50.0
        assert 3590 < client.ttl(window_stats_key("10m", start_10m, a)) <= 3600
        # The closed 08:00 window is the rollups' alone; the hour, day and week are open.
        assert not client.exists(
            window_top_key("10m", window_start("10m", now) - timedelta(minutes=10))
        )
        hour = read_window(client, "1h", window_start("1h", now))
        assert dict(zip(hour["content_id"], hour["events"], strict=True)) == {a: 2, b: 2}
        assert 7190 < client.ttl(window_top_key("1h", window_start("1h", now))) <= 7200
        week = client.zrange(window_top_key("1w", window_start("1w", now)), 0, -1, withscores=True)
        assert dict(week) == {b.encode(): 104.25, a.encode(): 40.5}

        # Retracting both of a's events removes a's stats and its place on the boards.
        retract = [(a, open_s, 30.0, 50.0, -1), (a, open_s, 10.5, None, -1)]
        assert sink.apply(batch(deltas_frame(retract, 2), 2))
        assert not client.exists(window_stats_key("10m", start_10m, a))
        assert client.zscore(window_top_key("10m", start_10m), a) is None
        assert client.smembers(window_members_key("10m", start_10m)) == {b.encode()}
    finally:
        sink.close()


def test_rewrite_window_replaces_the_window_and_is_idempotent(client: redis.Redis) -> None:
    start = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)
    items = [str(uuid.UUID(int=i + 1)) for i in range(150)]
    first = pl.DataFrame(
        [(cid, i + 1, float(i) + 0.125, 10.0 * i, i) for i, cid in enumerate(items)],
        schema=WINDOW_ROLLUP_SCHEMA,
        orient="row",
    )
    rewrite_window(client, "1h", start, first, ttl_s=500)
    top = client.zrange(window_top_key("1h", start), 0, -1, desc=True, withscores=True)
    assert len(top) == 100 and top[0] == (items[-1].encode(), 149.125)
    assert read_window(client, "1h", start).equals(first.sort("content_id"))
    assert 490 < client.ttl(window_stats_key("1h", start, items[0])) <= 500
    assert client.hget(window_stats_key("1h", start, items[0]), "avg_engagement_pct") == b""

    # A late delete emptied items[0] and a late event added to items[1]: the rewrite says so.
    second = first.filter(pl.col("content_id") != items[0]).with_columns(
        events=pl.when(pl.col("content_id") == items[1]).then(9).otherwise(pl.col("events"))
    )
    for _ in range(2):
        rewrite_window(client, "1h", start, second, ttl_s=500)
        assert read_window(client, "1h", start).equals(second.sort("content_id"))
        assert not client.exists(window_stats_key("1h", start, items[0]))
        assert client.hget(window_stats_key("1h", start, items[1]), "events") == b"9"
