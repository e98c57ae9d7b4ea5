"""What a fault cost: how long the sinks took to catch up, and what they lost or doubled.

Lost and doubled are counted, not only asserted, so every scenario reports them. The columns
compared are those of tests.support's assert_*_matches_postgres, each sink read once:
- ClickHouse (FINAL, live rows): events PostgreSQL holds that ClickHouse lacks or holds with
  other values (any column, engagement_seconds and engagement_pct included), and live events
  PostgreSQL no longer holds (a lost delete), are lost; an event live twice is doubled.
- Redis (`engagement:top:10m`): per content, events PostgreSQL counts over the last 10 minutes
  that the board lacks are lost, events it has beyond them are doubled (same count, other
  engagement seconds: one lost update).
- Kafka (read_committed): a version (event, commit LSN) delivered more than once is doubled; an
  event whose newest version is not PostgreSQL's row (missing, stale or not deleted) is lost.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from engagement_dagster.lib.clickhouse import ClickHouseLockTimeout, clickhouse_client
from engagement_dagster.lib.pgoutput import parse_lsn
from engagement_dagster.lib.reconcile import ReconcileTargets, read_kafka_checkpoint
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.redis import RedisSink
from engagement_dagster.lib.source_db import connect
from tests.conftest import TEST_DIR
from tests.faults.conftest import FaultReport
from tests.support import (
    clickhouse_rows,
    expected_pct,
    kafka_versions,
    live_boards,
    postgres_rows,
)

CLICKHOUSE_CHECKPOINT = "SELECT max(lsn) FROM engagement._checkpoints WHERE sink = 'clickhouse'"


def current_wal_lsn(dsn: str) -> int:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_current_wal_lsn()::text")
        row = cur.fetchone()
    assert row is not None
    return parse_lsn(row[0])


PROBE_EVENT = """
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,
                               raw_payload)
SELECT id, gen_random_uuid(), 'play', now(), 1000, 'web', '{"probe": true}' FROM content LIMIT 1
"""


def mark_fault_end(settings: Settings) -> int:
    """The WAL position at the end of a fault, then one committed event after it: a sink has
    caught up with everything committed before the fault ended once its checkpoint (a commit
    LSN) reaches the position, even when no other traffic follows."""
    lsn = current_wal_lsn(settings.pg_dsn)
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(PROBE_EVENT)
    return lsn


def redis_checkpoint(settings: Settings) -> int:
    sink = RedisSink(settings.redis_url)
    try:
        return sink.read_checkpoint()
    finally:
        sink.close()


def kafka_checkpoint(settings: Settings) -> int:
    """Read by a consumer only: never fences the stream's producer."""
    return read_kafka_checkpoint(ReconcileTargets.from_settings(settings), timeout_s=10)


def clickhouse_checkpoint(settings: Settings, *, lock_timeout_s: float = 60) -> int | None:
    """None when the stream held the embedded database for longer than lock_timeout_s."""
    try:
        with clickhouse_client(settings.clickhouse_dsn, lock_timeout_s=lock_timeout_s) as client:
            rows = client.query(CLICKHOUSE_CHECKPOINT).result_rows
    except ClickHouseLockTimeout:
        return None
    except Exception as exc:  # the table is not there yet
        if "UNKNOWN_TABLE" in str(exc) or "doesn't exist" in str(exc):
            return 0
        raise
    return int(rows[0][0] or 0) if rows else 0


def wait_caught_up(
    settings: Settings, target_lsn: int, *, timeout_s: float, since: float | None = None
) -> dict[str, float]:
    """Seconds from `since` (a time.monotonic(), default now) until each sink's checkpoint reached
    `target_lsn`: a WAL position taken at the end of a fault, so every commit before it has a
    lower LSN and every later one a higher."""
    started = time.monotonic() if since is None else since
    reached: dict[str, float] = {}
    readers = {
        "redis": lambda: redis_checkpoint(settings),
        "kafka": lambda: _or_none(kafka_checkpoint, settings),
        "clickhouse": lambda: clickhouse_checkpoint(settings, lock_timeout_s=1.0),
    }
    while len(reached) < len(readers):
        for name, read in readers.items():
            if name not in reached and (read() or 0) >= target_lsn:
                reached[name] = round(time.monotonic() - started, 1)
        elapsed = time.monotonic() - started
        assert elapsed < timeout_s, (
            f"sinks not caught up with {target_lsn} after {timeout_s:.0f} s: reached {reached}"
        )
        time.sleep(0.25)
    return reached


def _or_none(read: Any, settings: Settings) -> int | None:
    try:
        return int(read(settings))
    except Exception:
        return None  # the broker is not back yet


@dataclass(frozen=True)
class SinkDiff:
    lost: int
    doubled: int
    examples: tuple[str, ...] = ()  # a few of the differences, for the failure message


def measure(settings: Settings) -> dict[str, SinkDiff]:
    """Lost and doubled changes per sink against PostgreSQL now (see the module docstring),
    compared on every column tests.support's assert_*_matches_postgres compare."""
    expected = {row[0]: row for row in postgres_rows(settings.pg_dsn)}
    return {
        "clickhouse": _clickhouse_diff(settings, expected),
        "redis": _redis_diff(settings),
        "kafka": _kafka_diff(settings, expected),
    }


def _clickhouse_row_differs(got: tuple[Any, ...], want: tuple[Any, ...]) -> bool:
    if got[:10] != want:
        return True
    seconds = None if want[6] is None else want[6] / 1000.0
    pct = expected_pct(want[6], want[8])
    if got[10] != seconds or (got[11] is None) != (pct is None):
        return True
    return pct is not None and abs(got[11] - pct) > 0.0100001  # float ties round either way


def _clickhouse_diff(settings: Settings, expected: dict[int, tuple[Any, ...]]) -> SinkDiff:
    rows = clickhouse_rows(settings.clickhouse_dsn)
    ids = Counter(row[0] for row in rows)
    held = {row[0]: row for row in rows}
    wrong = [eid for eid, want in expected.items()
             if eid not in held or _clickhouse_row_differs(held[eid], want)]  # fmt: skip
    wrong += [eid for eid in ids if eid not in expected]
    doubled = [eid for eid, n in ids.items() if n > 1]
    examples = tuple(f"event {eid}: PostgreSQL {expected.get(eid)}, ClickHouse {held.get(eid)}"
                     for eid in (wrong + doubled)[:3])  # fmt: skip
    return SinkDiff(len(wrong), sum(n - 1 for n in ids.values()), examples)


def _redis_diff(settings: Settings) -> SinkDiff:
    want, got = live_boards(settings)
    lost = doubled = 0
    examples = []
    for cid in set(want) | set(got):
        (w_seconds, w_events), (g_seconds, g_events) = (
            want.get(cid, (0.0, 0)),
            got.get(cid, (0.0, 0)),
        )
        lost += max(0, w_events - g_events)
        doubled += max(0, g_events - w_events)
        if w_events == g_events and abs(w_seconds - g_seconds) > 1e-6:
            lost += 1  # same count, other seconds: an update lost
        if (w_events, round(w_seconds, 6)) != (g_events, round(g_seconds, 6)):
            examples.append(f"{cid}: PostgreSQL {w_events} events {w_seconds} s, "
                            f"Redis {g_events} events {g_seconds} s")  # fmt: skip
    return SinkDiff(lost, doubled, tuple(examples[:3]))


def _kafka_diff(settings: Settings, expected: dict[int, tuple[Any, ...]]) -> SinkDiff:
    versions = kafka_versions(settings)
    keys = Counter(
        (v["event_id"], v["source_lsn"], (v["event_ts"] or "")[:7], v["is_deleted"])
        for v in versions
    )
    latest: dict[int, dict[str, Any]] = {}
    for v in versions:
        held = latest.get(v["event_id"])
        # Higher LSN wins; at one LSN (a month move) the live version beats the tombstone.
        if held is None or (v["source_lsn"], -v["is_deleted"]) > (
            held["source_lsn"], -held["is_deleted"]
        ):  # fmt: skip
            latest[v["event_id"]] = v
    live = {eid: v for eid, v in latest.items() if v["is_deleted"] == 0}
    wrong = [eid for eid in live if eid not in expected]
    for eid, row in expected.items():
        v = live.get(eid)
        if v is None or (
            v["content_id"], v["user_id"], v["event_type"], v["duration_ms"], v["raw_payload"]
        ) != (row[1], row[2], row[3], row[6], row[9]) or v["op"] not in {
            "insert", "update", "r"  # "r": replayed by a backfill or a restart
        } or v["schema_version"] != 1:  # fmt: skip
            wrong.append(eid)
    twice = [key for key, n in keys.items() if n > 1]
    examples = tuple(
        [f"event {eid}: PostgreSQL {expected.get(eid)}, Kafka {live.get(eid)}" for eid in wrong]
        + [f"version delivered twice: {key}" for key in twice]
    )[:3]
    return SinkDiff(len(wrong), sum(n - 1 for n in keys.values()), examples)


def check_exact(
    report: FaultReport, settings: Settings, *, recovery_s: float | None, detail: str = ""
) -> None:
    """Count lost and doubled changes per sink, record them with the recovery time, and require
    none (every column compared: `measure`)."""
    diffs = measure(settings)
    report.record(
        lost=sum(d.lost for d in diffs.values()),
        doubled=sum(d.doubled for d in diffs.values()),
        recovery_s=recovery_s,
        detail=detail,
        per_sink={name: {"lost": d.lost, "doubled": d.doubled} for name, d in diffs.items()},
    )
    assert all(d.lost == 0 and d.doubled == 0 for d in diffs.values()), diffs


def log_dir(name: str) -> Any:
    path = TEST_DIR / "faults" / name / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path
