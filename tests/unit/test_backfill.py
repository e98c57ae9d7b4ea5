"""The backfill's pure parts: what a chunk writes against what ClickHouse holds, how stale rows
resolve, and the insert-only path of the enrichment it shares with the stream."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from engagement_dagster.lib import enrich as enrich_module
from engagement_dagster.lib.backfill import (
    BackfillError,
    day_bounds,
    days_between,
    plan_chunk,
    resolve_stale,
)
from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    ENRICHED_ROWS_SCHEMA,
    IMAGE_COLUMNS,
    ContentVersion,
    content_versions,
    enrich,
    fold_content_versions,
)

V = 1_000  # the snapshot's version
DAY = date(2026, 11, 20)
START, END = day_bounds(DAY)
IN_DAY = START + timedelta(hours=3)
OTHER_DAY_SAME_MONTH = START - timedelta(days=5)
OTHER_MONTH = START - timedelta(days=40)


def row(event_id: int, ts: datetime, *, lsn: int = V, duration: int = 1000, **extra: Any) -> dict:
    base = {name: None for name in ENRICHED_ROWS_SCHEMA}
    return {
        **base,
        "event_id": event_id,
        "content_id": "0b6f4a6e-9a57-4f43-9f0e-000000000001",
        "event_type": "play",
        "event_ts": ts,
        "duration_ms": duration,
        "engagement_seconds": None if duration is None else duration / 1000,
        "op": "r",
        "source_lsn": lsn,
        "source_committed_at": ts,
        "is_deleted": 0,
        **extra,
    }


def frame(*rows: dict) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=ENRICHED_ROWS_SCHEMA)


def ids(df: pl.DataFrame) -> list[int]:
    return sorted(df["event_id"].to_list())


def test_a_chunk_writes_only_what_clickhouse_lacks_or_holds_differently() -> None:
    snapshot = frame(
        row(1, IN_DAY),  # ClickHouse has it, identical (its own older version): skipped
        row(2, IN_DAY, duration=2000),  # ClickHouse holds another duration: written
        row(3, IN_DAY),  # ClickHouse lacks it: written
        row(4, IN_DAY),  # ClickHouse has a newer version (the stream is ahead): skipped
        row(6, IN_DAY),  # ClickHouse still holds it in another month: written + moved out
    )
    held = frame(
        row(1, IN_DAY, lsn=500, op="insert"),
        row(2, IN_DAY, lsn=500),
        row(4, IN_DAY, lsn=V + 10, duration=9),
        row(5, IN_DAY, lsn=500),  # the snapshot's day lacks it: stale
        row(6, OTHER_MONTH, lsn=500),
        row(7, OTHER_DAY_SAME_MONTH, lsn=500),  # another day, not the chunk's: ignored
        row(8, IN_DAY, lsn=V + 5),  # newer than the snapshot (inserted after it): left alone
    )
    plan = plan_chunk(snapshot, held, V, START, END)
    assert ids(plan.to_write) == [2, 3, 6]
    assert ids(plan.moved_out) == [6]
    assert plan.moved_out["event_ts"].to_list() == [OTHER_MONTH]
    assert ids(plan.stale) == [5]


def test_a_rerun_over_an_identical_day_writes_nothing() -> None:
    snapshot = frame(row(1, IN_DAY), row(2, IN_DAY, duration=None))
    held = frame(row(1, IN_DAY, lsn=V - 50), row(2, IN_DAY, lsn=V - 50, duration=None))
    plan = plan_chunk(snapshot, held, V, START, END)
    assert (plan.to_write.height, plan.moved_out.height, plan.stale.height) == (0, 0, 0)


def test_stale_rows_resolve_to_where_the_event_is_now_or_to_a_tombstone() -> None:
    stale = frame(row(5, IN_DAY, lsn=500), row(6, IN_DAY, lsn=500), row(7, IN_DAY, lsn=500))
    current = frame(row(6, OTHER_DAY_SAME_MONTH), row(7, OTHER_MONTH))  # 5 is gone or invalid
    plan = resolve_stale(stale, current)
    assert ids(plan.to_write) == [6, 7]
    assert ids(plan.gone) == [5]
    assert ids(plan.moved_out) == [7]  # 6 stays in its month: the new version supersedes it


def test_days_between_is_inclusive_and_ordered() -> None:
    assert days_between(DAY, DAY + timedelta(days=2)) == [
        DAY, DAY + timedelta(days=1), DAY + timedelta(days=2),
    ]  # fmt: skip
    with pytest.raises(BackfillError, match="before"):
        days_between(DAY, DAY - timedelta(days=1))


def _inserts() -> pl.DataFrame:
    texts = [
        ("1", "0b6f4a6e-9a57-4f43-9f0e-000000000001", "2026-11-20 10:00:00.5+00", "30000"),
        ("2", "0b6f4a6e-9a57-4f43-9f0e-000000000002", "2026-11-20 10:00:01+00", None),
        ("3", "0b6f4a6e-9a57-4f43-9f0e-00000000000f", "2026-11-20 10:00:02+00", "-5"),
        ("4", None, "2026-11-20 10:00:03+00", "10"),
        ("5", "0B6F4A6E-9A57-4F43-9F0E-000000000001", "2030-01-01 00:00:00+00", "10"),
        ("x", "0b6f4a6e-9a57-4f43-9f0e-000000000001", "2026-11-20 10:00:04+00", "10"),
    ]
    n = len(texts)
    data: dict[str, list[Any]] = {name: [None] * n for name in CHANGES_SCHEMA}
    data.update(
        seq=list(range(n)),
        op=["insert"] * n,
        source_lsn=[V] * n,
        source_committed_at=[datetime(2026, 11, 21, tzinfo=UTC)] * n,
        id=[t[0] for t in texts],
        content_id=[t[1] for t in texts],
        user_id=["0b6f4a6e-9a57-4f43-9f0e-0000000000aa"] * n,
        event_type=["play", "pause", "finish", "click", "play", "play"],
        event_ts=[t[2] for t in texts],
        duration_ms=[t[3] for t in texts],
        raw_payload=['{"a": 1}'] * n,
    )
    assert set(IMAGE_COLUMNS) <= set(data)
    return pl.DataFrame(data, schema=CHANGES_SCHEMA)


def test_insert_only_batches_skip_the_pairing_join_with_identical_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    content = fold_content_versions(
        content_versions(
            [
                ContentVersion("0b6f4a6e-9a57-4f43-9f0e-000000000001", "podcast", 600, 0),
                ContentVersion("0b6f4a6e-9a57-4f43-9f0e-000000000002", "video", 0, 0),
            ]
        )
    )
    fast = enrich(_inserts(), content)
    monkeypatch.setattr(enrich_module, "_has_old_images", lambda changes: True)
    paired = enrich(_inserts(), content)
    assert fast.rows.equals(paired.rows)
    assert fast.deltas.equals(paired.deltas)
    assert fast.dead_letters.equals(paired.dead_letters)
    assert fast.rows["event_id"].to_list() == [1, 2]
    assert fast.dead_letters.height == 4
