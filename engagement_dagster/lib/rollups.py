"""The 10-minute rollups, the 1h/1d/1w windows derived from them, and the daily and weekly
summaries: their ClickHouse tables, the SQL that replaces one window or period, and the checks.

Plain SQL and logic, no Dagster import. Every write replaces a whole window (or day, or week)
idempotently; nothing here ever adds to a previous result, so a replay or a backfill never
double counts. Every chDB use is one short `clickhouse_client` section.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import polars as pl
from clickhouse_connect.driver.client import Client

from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.sinks.clickhouse import (
    CREATE_CHECKPOINTS,
    CREATE_DATABASE,
    CREATE_ENRICHED,
    READ_CHECKPOINT,
)
from engagement_dagster.lib.sinks.clickhouse import SINK_NAME as CLICKHOUSE_SINK
from engagement_dagster.lib.sinks.redis import WINDOW_ROLLUP_SCHEMA
from engagement_dagster.lib.windows import WINDOW_SECONDS, Window, window_start

ROLLUP_S = WINDOW_SECONDS["10m"]
DERIVED_WINDOWS: tuple[Window, ...] = ("1h", "1d", "1w")
Period = Literal["day", "week"]
PERIOD_WINDOW: dict[Period, Window] = {"day": "1d", "week": "1w"}

# --- tables ----------------------------------------------------------------------------------

# One row per (10-minute window, content, content_type): content_type is in the key because the
# stream joins content as of each event, so a content item whose type changed inside a window
# has two rows and the summaries by type stay exact. Replaced window by window: a rewrite inserts
# the window's rows with a newer `computed_at` and a tombstone (is_deleted = 1) for every key
# that left the window, in one INSERT; read with FINAL ... WHERE is_deleted = 0.
# The *_ms_sum / *_x100_sum integers and the uniqExact state are what hourly, daily and weekly
# windows merge: integer sums never drift, unique users are merged, never summed.
CREATE_ROLLUP_10M = """
CREATE TABLE IF NOT EXISTS engagement.engagement_rollup_10m (
    window_start             DateTime('UTC'),
    content_id               UUID,
    content_type             LowCardinality(Nullable(String)),
    events                   UInt64,
    engagement_seconds_sum   Float64,
    engagement_pct_sum       Float64,
    engagement_pct_count     UInt64,
    unique_users             UInt64,
    engagement_seconds_count UInt64,
    engagement_ms_sum        Int64,
    engagement_pct_x100_sum  Int64,
    users_state              AggregateFunction(uniqExact, Nullable(UUID)),
    asof_lsn                 UInt64,
    computed_at              DateTime64(6, 'UTC'),
    is_deleted               UInt8
)
ENGINE = ReplacingMergeTree(computed_at, is_deleted)
PARTITION BY toYYYYMM(window_start)
ORDER BY (window_start, content_id, content_type)
SETTINGS allow_nullable_key = 1
"""

# One row per rolled-up window, also for windows without events: what late changes are compared
# with. asof_lsn is the ClickHouse sink checkpoint the rollup included; event_ids (a roaring
# bitmap, a few bytes per run of ids) the events it counted, so that an update moving an event
# out of the window is found even though ClickHouse keeps no row of it at the old time.
CREATE_ROLLUP_LOG = """
CREATE TABLE IF NOT EXISTS engagement._rollup_10m_windows (
    window_start DateTime('UTC'),
    asof_lsn     UInt64,
    rows         UInt64,
    events       UInt64,
    event_ids    AggregateFunction(groupBitmap, UInt64),
    computed_at  DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(computed_at)
ORDER BY window_start
"""

_SUMMARY_COLUMNS = """
    content_type             LowCardinality(Nullable(String)),
    events                   UInt64,
    engagement_seconds_sum   Float64,
    engagement_seconds_count UInt64,
    avg_engagement_seconds   Nullable(Float64),
    engagement_pct_sum       Float64,
    engagement_pct_count     UInt64,
    avg_engagement_pct       Nullable(Float64),
    unique_users             UInt64,
    contents                 UInt64,
    engagement_ms_sum        Int64,
    engagement_pct_x100_sum  Int64,
    computed_at              DateTime64(6, 'UTC'),
    is_deleted               UInt8
"""


def _create_summary(table: str, period_column: str, partition_by: str) -> str:
    """A summary table: one row per (period, content_type), replaced period by period."""
    return f"""
CREATE TABLE IF NOT EXISTS engagement.{table} (
    {period_column} Date,{_SUMMARY_COLUMNS})
ENGINE = ReplacingMergeTree(computed_at, is_deleted)
PARTITION BY {partition_by}
ORDER BY ({period_column}, content_type)
SETTINGS allow_nullable_key = 1
"""


CREATE_DAILY_SUMMARY = _create_summary("daily_engagement_summary", "day", "toYYYYMM(day)")
CREATE_WEEKLY_SUMMARY = _create_summary(
    "weekly_engagement_summary", "week_start", "toYear(week_start)"
)

ROLLUP_TABLES = (CREATE_ROLLUP_10M, CREATE_ROLLUP_LOG, CREATE_DAILY_SUMMARY, CREATE_WEEKLY_SUMMARY)


def ensure_tables(client: Client) -> None:
    """Create the rollup and summary tables (and what they read, if the stream never ran)."""
    for ddl in (CREATE_DATABASE, CREATE_ENRICHED, CREATE_CHECKPOINTS, *ROLLUP_TABLES):
        client.command(ddl)


# --- replacing one scope (a window, a day, a week) ----------------------------------------------

ROLLUP_COLUMNS = (
    "window_start", "content_id", "content_type", "events", "engagement_seconds_sum",
    "engagement_pct_sum", "engagement_pct_count", "unique_users", "engagement_seconds_count",
    "engagement_ms_sum", "engagement_pct_x100_sum", "users_state", "asof_lsn",
)  # fmt: skip

# The window from the warehouse table, exact: FINAL keeps each event's newest version (an event
# moved to another window or content counts only there), and deleted events are gone.
# ClickHouse's FINAL with skip indexes runs in exact mode (use_skip_indexes_if_final_exact_mode).
FRESH_ROLLUP = """
SELECT
    toDateTime({start:UInt32}, 'UTC') AS window_start,
    assumeNotNull(content_id) AS content_id,
    content_type,
    count() AS events,
    sum(coalesce(duration_ms, 0)) AS engagement_ms_sum,
    engagement_ms_sum / 1000 AS engagement_seconds_sum,
    sum(coalesce(toInt64(round(engagement_pct * 100)), 0)) AS engagement_pct_x100_sum,
    engagement_pct_x100_sum / 100 AS engagement_pct_sum,
    count(engagement_pct) AS engagement_pct_count,
    uniqExact(user_id) AS unique_users,
    count(duration_ms) AS engagement_seconds_count,
    uniqExactState(user_id) AS users_state,
    toUInt64({asof:UInt64}) AS asof_lsn
FROM engagement.enriched_engagements FINAL
WHERE event_ts >= toDateTime64({start:UInt32}, 6, 'UTC')
  AND event_ts < toDateTime64({end:UInt32}, 6, 'UTC')
  AND is_deleted = 0 AND content_id IS NOT NULL
GROUP BY content_id, content_type
"""

# Day or week from the 10-minute rollups: sums of exact integers, unique users merged.
FRESH_SUMMARY = """
SELECT
    toDate(toDateTime({start:UInt32}, 'UTC')) AS {period_column},
    content_type,
    n AS events,
    ms AS engagement_ms_sum,
    ms / 1000 AS engagement_seconds_sum,
    measured AS engagement_seconds_count,
    if(measured > 0, ms / 1000 / measured, NULL) AS avg_engagement_seconds,
    x100 AS engagement_pct_x100_sum,
    x100 / 100 AS engagement_pct_sum,
    with_pct AS engagement_pct_count,
    if(with_pct > 0, x100 / 100 / with_pct, NULL) AS avg_engagement_pct,
    users AS unique_users,
    items AS contents
FROM (
    SELECT content_type, sum(events) AS n, sum(engagement_ms_sum) AS ms,
           sum(engagement_seconds_count) AS measured, sum(engagement_pct_x100_sum) AS x100,
           sum(engagement_pct_count) AS with_pct, uniqExactMerge(users_state) AS users,
           uniqExact(content_id) AS items
      FROM engagement.engagement_rollup_10m FINAL
     WHERE window_start >= toDateTime({start:UInt32}, 'UTC')
       AND window_start < toDateTime({end:UInt32}, 'UTC')
       AND is_deleted = 0
     GROUP BY content_type
)
"""

SUMMARY_COLUMNS = (
    "content_type", "events", "engagement_seconds_sum", "engagement_seconds_count",
    "avg_engagement_seconds", "engagement_pct_sum", "engagement_pct_count",
    "avg_engagement_pct", "unique_users", "contents", "engagement_ms_sum",
    "engagement_pct_x100_sum",
)  # fmt: skip


def replace_sql(
    table: str, columns: Sequence[str], key: Sequence[str], scope: str, fresh: str
) -> str:
    """One INSERT that replaces the rows of `scope` in a ReplacingMergeTree(computed_at,
    is_deleted) table by the rows of `fresh`, plus a tombstone of each key `fresh` no longer has.

    One INSERT is one part: readers see the old scope or the new one, never a mix. Re-running it
    inserts the same values again, which FINAL collapses; nothing is ever added up twice.
    """
    names = ", ".join(columns)
    keys = ", ".join(key)
    return f"""
INSERT INTO {table} ({names}, computed_at, is_deleted)
WITH fresh AS ({fresh}), version AS (SELECT now64(6) AS at)
SELECT {names}, (SELECT at FROM version), 0 FROM fresh
UNION ALL
SELECT {names}, (SELECT at FROM version), 1 FROM {table} FINAL
 WHERE {scope} AND is_deleted = 0 AND ({keys}) NOT IN (SELECT {keys} FROM fresh)
SETTINGS transform_null_in = 1
"""


REPLACE_ROLLUP = replace_sql(
    "engagement.engagement_rollup_10m",
    ROLLUP_COLUMNS,
    ("content_id", "content_type"),
    "window_start = toDateTime({start:UInt32}, 'UTC')",
    FRESH_ROLLUP,
)
LOG_ROLLUP = """
INSERT INTO engagement._rollup_10m_windows
    (window_start, asof_lsn, rows, events, event_ids, computed_at)
SELECT toDateTime({start:UInt32}, 'UTC'), {asof:UInt64}, rolled.rows, rolled.events, counted.ids,
       now64(6)
  FROM (SELECT count() AS rows, sum(events) AS events FROM engagement.engagement_rollup_10m FINAL
         WHERE window_start = toDateTime({start:UInt32}, 'UTC') AND is_deleted = 0) AS rolled
 CROSS JOIN (
       SELECT groupBitmapState(toUInt64(event_id)) AS ids
         FROM engagement.enriched_engagements FINAL
        WHERE event_ts >= toDateTime64({start:UInt32}, 6, 'UTC')
          AND event_ts < toDateTime64({end:UInt32}, 6, 'UTC')
          AND is_deleted = 0 AND content_id IS NOT NULL) AS counted
"""
SUMMARY_TABLE: dict[Period, tuple[str, str]] = {
    "day": ("engagement.daily_engagement_summary", "day"),
    "week": ("engagement.weekly_engagement_summary", "week_start"),
}


def _replace_summary_sql(period: Period) -> str:
    table, column = SUMMARY_TABLE[period]
    return replace_sql(
        table,
        (column, *SUMMARY_COLUMNS),
        ("content_type",),
        f"{column} = toDate(toDateTime({{start:UInt32}}, 'UTC'))",
        FRESH_SUMMARY.replace("{period_column}", column),
    )


# --- windows and their closing --------------------------------------------------------------


def _epoch(at: datetime) -> int:
    return int(at.timestamp())


def window_end(window: Window, start: datetime) -> datetime:
    return start + timedelta(seconds=WINDOW_SECONDS[window])


def closes_at(window: Window, start: datetime, lateness_s: int) -> datetime:
    """When the stream stops adding to the window's Redis keys and the rollups take over."""
    return window_end(window, start) + timedelta(seconds=lateness_s)


def newest_closed_window(now: datetime, lateness_s: int) -> datetime:
    """The newest 10-minute window whose end plus the lateness allowance has passed."""
    return window_start("10m", now - timedelta(seconds=lateness_s + ROLLUP_S))


def windows_to_request(
    now: datetime, *, lateness_s: int, after: datetime | None, first: datetime, limit: int
) -> list[datetime]:
    """Closed 10-minute windows not yet requested, oldest first, at most `limit`.

    `after` is the newest window requested before (None: none yet, so only the newest closed
    window: history is the UI's backfill). Requesting oldest first and moving the cursor only
    over what was requested means a daemon that was down catches up without skipping a window.
    """
    newest = newest_closed_window(now, lateness_s)
    if after is None:
        return [newest] if newest >= first else []
    step = timedelta(seconds=ROLLUP_S)
    start = max(after + step, first)
    windows: list[datetime] = []
    while start <= newest and len(windows) < limit:
        windows.append(start)
        start += step
    return windows


def derived_windows_to_rewrite(
    start: datetime, now: datetime, lateness_s: int
) -> list[tuple[Window, datetime]]:
    """The hourly, daily and weekly windows holding this 10-minute window that are closed.

    For the newest 10-minute window that is the ones it ends (it is the last 10 minutes of its
    hour, day or ISO week). For a window re-rolled after a late change, every closed window that
    contains it, so that the change reaches them too; an open one is still the stream's.
    """
    return [
        (window, outer)
        for window in DERIVED_WINDOWS
        for outer in [window_start(window, start)]
        if closes_at(window, outer, lateness_s) <= now
    ]


# --- the rollup of one window ---------------------------------------------------------------


class CheckpointWaitTimeout(TimeoutError):
    """The ClickHouse sink did not reach what the Redis sink had applied in time."""


@dataclass(frozen=True)
class RollupResult:
    window_start: datetime
    asof_lsn: int
    redis_lsn: int
    rows: int
    events: int
    tombstones: int
    waited_s: float
    took_s: float


def read_clickhouse_checkpoint(client: Client) -> int:
    rows = client.query(READ_CHECKPOINT, parameters={"sink": CLICKHOUSE_SINK}).result_rows
    return int(rows[0][0] or 0) if rows else 0


def rollup_window(
    dsn: str,
    start: datetime,
    *,
    redis_lsn: int,
    wait_s: float = 120.0,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> RollupResult:
    """Replace the rollup of the 10-minute window at `start` from enriched_engagements.

    `redis_lsn` is the Redis sink checkpoint read after the window closed: everything the stream
    applied to the window's Redis keys is at or below it. The rollup waits (up to `wait_s`) until
    the ClickHouse sink has applied that much too, so that the rewrite of the Redis keys from the
    rollup loses nothing, then computes it in the same chDB section (no write in between) and
    records asof_lsn = the ClickHouse checkpoint it included.
    """
    began = clock()
    deadline = began + wait_s
    params = {"start": _epoch(start), "end": _epoch(start) + ROLLUP_S}
    while True:
        with clickhouse_client(dsn) as client:
            ensure_tables(client)
            asof = read_clickhouse_checkpoint(client)
            if asof >= redis_lsn:
                waited = clock() - began
                before = _scope_rows(client, start)
                client.command(REPLACE_ROLLUP, parameters={**params, "asof": asof})
                client.command(LOG_ROLLUP, parameters={**params, "asof": asof})
                rows, events = _logged(client, start)
                return RollupResult(
                    window_start=start,
                    asof_lsn=asof,
                    redis_lsn=redis_lsn,
                    rows=rows,
                    events=events,
                    tombstones=len(before - _scope_rows(client, start)),
                    waited_s=waited,
                    took_s=clock() - began,
                )
        if clock() >= deadline:
            raise CheckpointWaitTimeout(
                f"rollup of {start:%Y-%m-%d %H:%M} UTC: the ClickHouse sink checkpoint is at "
                f"{asof}, behind what Redis applied ({redis_lsn}), after {wait_s:.0f}s; a "
                "rollup now would drop changes the Redis window holds. Is the stream's "
                "ClickHouse sink failing? See `engagement services status` and the cdc_stream "
                "run's logs, then re-run this partition."
            )
        time.sleep(poll_s)


def _scope_rows(client: Client, start: datetime) -> set[tuple[str, str | None]]:
    rows = client.query(
        "SELECT toString(content_id), content_type FROM engagement.engagement_rollup_10m FINAL "
        "WHERE window_start = toDateTime({start:UInt32}, 'UTC') AND is_deleted = 0",
        parameters={"start": _epoch(start)},
    ).result_rows
    return {(r[0], r[1]) for r in rows}


def _logged(client: Client, start: datetime) -> tuple[int, int]:
    rows = client.query(
        "SELECT rows, events FROM engagement._rollup_10m_windows FINAL "
        "WHERE window_start = toDateTime({start:UInt32}, 'UTC')",
        parameters={"start": _epoch(start)},
    ).result_rows
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


def rolled_up(client: Client, start: datetime) -> int | None:
    """The asof_lsn of the window's rollup, None when it was never rolled up."""
    rows = client.query(
        "SELECT asof_lsn FROM engagement._rollup_10m_windows FINAL "
        "WHERE window_start = toDateTime({start:UInt32}, 'UTC')",
        parameters={"start": _epoch(start)},
    ).result_rows
    return int(rows[0][0]) if rows else None


# --- windows for Redis ------------------------------------------------------------------------

WINDOW_ROWS = """
SELECT toString(id) AS content_id, toInt64(n) AS events, ms / 1000 AS engagement_seconds_sum,
       x100 / 100 AS engagement_pct_sum, toInt64(with_pct) AS engagement_pct_count
  FROM (
    SELECT content_id AS id, sum(events) AS n, sum(engagement_ms_sum) AS ms,
           sum(engagement_pct_x100_sum) AS x100, sum(engagement_pct_count) AS with_pct
      FROM engagement.engagement_rollup_10m FINAL
     WHERE window_start >= toDateTime({start:UInt32}, 'UTC')
       AND window_start < toDateTime({end:UInt32}, 'UTC')
       AND is_deleted = 0
     GROUP BY content_id
  )
 ORDER BY content_id
"""

MISSING_ROLLUPS = """
SELECT count() FROM engagement._rollup_10m_windows FINAL
 WHERE window_start >= toDateTime({start:UInt32}, 'UTC')
   AND window_start < toDateTime({end:UInt32}, 'UTC')
"""


def window_rows(client: Client, window: Window, start: datetime) -> pl.DataFrame:
    """A window's rows per content_id from the 10-minute rollups, as rewrite_window takes them."""
    frame = pl.from_arrow(
        client.query_arrow(
            WINDOW_ROWS,
            parameters={"start": _epoch(start), "end": _epoch(window_end(window, start))},
        )
    )
    assert isinstance(frame, pl.DataFrame)
    return frame.select(pl.col(n).cast(t) for n, t in WINDOW_ROLLUP_SCHEMA.items())


def missing_rollups(client: Client, window: Window, start: datetime, first: datetime) -> int:
    """How many 10-minute windows of `window` (from `first`, the first partition) were never
    rolled up: a derived window built without them lacks their events."""
    begin = max(start, first)
    end = window_end(window, start)
    if begin >= end:
        return 0
    rows = client.query(
        MISSING_ROLLUPS, parameters={"start": _epoch(begin), "end": _epoch(end)}
    ).result_rows
    return (_epoch(end) - _epoch(begin)) // ROLLUP_S - int(rows[0][0])


# --- summaries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryResult:
    period: Period
    start: datetime
    content_types: int
    events: int
    missing_windows: int


def period_start(period: Period, at: datetime) -> datetime:
    return window_start(PERIOD_WINDOW[period], at)


def summarize(dsn: str, period: Period, start: datetime, *, first: datetime) -> SummaryResult:
    """Replace the day's or week's summary by content_type from the 10-minute rollups."""
    window = PERIOD_WINDOW[period]
    if window_start(window, start) != start:
        raise ValueError(f"{start!r} is not the UTC start of a {period}")
    params = {"start": _epoch(start), "end": _epoch(window_end(window, start))}
    table, column = SUMMARY_TABLE[period]
    with clickhouse_client(dsn) as client:
        ensure_tables(client)
        client.command(_replace_summary_sql(period), parameters=params)
        rows = client.query(
            f"SELECT count(), sum(events) FROM {table} FINAL "
            f"WHERE {column} = toDate(toDateTime({{start:UInt32}}, 'UTC')) AND is_deleted = 0",
            parameters=params,
        ).result_rows
        missing = missing_rollups(client, window, start, first)
    return SummaryResult(period, start, int(rows[0][0]), int(rows[0][1] or 0), missing)


# --- checks -----------------------------------------------------------------------------------

# What a rollup row must equal: compared as exact integers.
CHECKED = ("events", "engagement_ms_sum", "engagement_pct_x100_sum", "engagement_pct_count",
           "unique_users")  # fmt: skip
_CHECKED_SELECT = """
SELECT toString(content_id) AS id, toString(content_type) AS type, events, engagement_ms_sum,
       engagement_pct_x100_sum, engagement_pct_count, unique_users
"""
STORED_ROLLUP = f"""{_CHECKED_SELECT}
  FROM engagement.engagement_rollup_10m FINAL
 WHERE window_start = toDateTime({{start:UInt32}}, 'UTC') AND is_deleted = 0
"""
EXPECTED_ROLLUP = f"{_CHECKED_SELECT} FROM ({FRESH_ROLLUP})"


@dataclass(frozen=True)
class Comparison:
    """Rows that differ between what is stored and what it should be, by key."""

    compared: int
    differences: tuple[str, ...]
    newest_change_lsn: int | None = None  # enriched rows of the window changed after asof
    asof_lsn: int | None = None

    @property
    def equal(self) -> bool:
        return not self.differences

    @property
    def stale(self) -> bool:
        """Differs because the window changed after its rollup (a re-roll is due)."""
        return (
            self.newest_change_lsn is not None
            and self.asof_lsn is not None
            and self.newest_change_lsn > self.asof_lsn
        )


def compare_frames(
    stored: pl.DataFrame, expected: pl.DataFrame, key: Sequence[str], values: Sequence[str]
) -> tuple[int, tuple[str, ...]]:
    """Differences between two frames on `values`, by `key`; a key missing on a side is one."""
    joined = stored.select(*key, *values).join(
        expected.select(*key, *values), on=list(key), how="full", coalesce=True,
        nulls_equal=True, suffix="_expected",
    )  # fmt: skip
    differs = pl.any_horizontal(pl.col(v).ne_missing(pl.col(f"{v}_expected")) for v in values)
    bad = joined.filter(differs).sort(key, nulls_last=True)
    lines = tuple(
        ", ".join(f"{k}={row[k]}" for k in key)
        + ": "
        + ", ".join(f"{v} {row[v]} != {row[f'{v}_expected']}" for v in values
                    if row[v] != row[f"{v}_expected"])
        for row in bad.head(20).iter_rows(named=True)
    )  # fmt: skip
    return joined.height, lines + ((f"... {bad.height - 20} more",) if bad.height > 20 else ())


def check_rollup(dsn: str, start: datetime) -> Comparison:
    """The stored rollup of a window equals the window recomputed from enriched_engagements."""
    params = {"start": _epoch(start), "end": _epoch(start) + ROLLUP_S, "asof": 0}
    with clickhouse_client(dsn) as client:
        ensure_tables(client)
        stored = _frame(client, STORED_ROLLUP, params)
        expected = _frame(client, EXPECTED_ROLLUP, params)
        asof = rolled_up(client, start)
        newest = client.query(
            "SELECT max(source_lsn) FROM engagement.enriched_engagements "
            "WHERE event_ts >= toDateTime64({start:UInt32}, 6, 'UTC') "
            "AND event_ts < toDateTime64({end:UInt32}, 6, 'UTC')",
            parameters=params,
        ).result_rows
    compared, differences = compare_frames(
        _exact(stored), _exact(expected), ("content_id", "content_type"), CHECKED
    )
    if asof is None:
        differences = ("the window was never rolled up", *differences)
    return Comparison(compared, differences, int(newest[0][0] or 0) or None, asof)


def _exact(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(
        pl.col("id").alias("content_id"),
        pl.col("type").cast(pl.String).alias("content_type"),
        *(pl.col(c).cast(pl.Int64) for c in CHECKED),
    )


def _frame(client: Client, query: str, params: dict[str, int]) -> pl.DataFrame:
    frame = pl.from_arrow(client.query_arrow(query, parameters=params))
    assert isinstance(frame, pl.DataFrame)
    return frame


def compare_window(stored: pl.DataFrame, expected: pl.DataFrame) -> tuple[int, tuple[str, ...]]:
    """A Redis window (read_window) against its rollup rows (window_rows), in exact units:
    events, engagement milliseconds, pct x100 and pct count per content_id."""

    def exact(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.select(
            "content_id",
            "events",
            "engagement_pct_count",
            ms=(pl.col("engagement_seconds_sum") * 1000).round(0).cast(pl.Int64),
            pct_x100=(pl.col("engagement_pct_sum") * 100).round(0).cast(pl.Int64),
        )

    return compare_frames(
        exact(stored),
        exact(expected.filter(pl.col("events") > 0)),
        ("content_id",),
        ("events", "ms", "pct_x100", "engagement_pct_count"),
    )


# --- late changes -------------------------------------------------------------------------------

# Windows holding a version or a tombstone applied after `after` (new events, updates in place,
# deletes and month moves leave one at the window's time) ...
CHANGED_WINDOWS = """
SELECT toUnixTimestamp(toStartOfInterval(event_ts, INTERVAL 10 MINUTE)) AS window_start,
       max(source_lsn) AS newest_lsn
  FROM engagement.enriched_engagements
 PREWHERE source_lsn > {after:UInt64}
 WHERE event_ts >= toDateTime64({first:UInt32}, 6, 'UTC')
 GROUP BY window_start
"""
# ... and rolled-up windows that counted an event changed after `after` (an update moving it to
# another window leaves no row at its old time).
LEFT_WINDOWS = """
SELECT toUnixTimestamp(window_start), {newest:UInt64}
  FROM engagement._rollup_10m_windows FINAL
 WHERE asof_lsn < {newest:UInt64}
   AND bitmapHasAny(event_ids, (SELECT groupBitmapState(toUInt64(event_id))
                                  FROM engagement.enriched_engagements
                                 WHERE source_lsn > {after:UInt64}))
"""
ROLLED_UP_WINDOWS = """
SELECT toUnixTimestamp(window_start), asof_lsn FROM engagement._rollup_10m_windows FINAL
 WHERE window_start IN (SELECT toDateTime(arrayJoin({starts:Array(UInt32)}), 'UTC'))
"""


@dataclass(frozen=True)
class LateChanges:
    """Windows rolled up before a change reached them, and the LSN scanned up to."""

    windows: tuple[tuple[datetime, int], ...]  # (window_start, newest change LSN)
    scanned_to: int


def late_changes(dsn: str, *, after_lsn: int | None, first: datetime) -> LateChanges | None:
    """Windows whose rollup misses a change: those holding enriched rows (versions and tombstones)
    with source_lsn above both `after_lsn` and the window's rollup asof_lsn, and those whose
    rollup counted an event changed since (it may have moved out). Only rows above `after_lsn`
    are read, so a caller that passes the previous `scanned_to` reads only what arrived since.
    `after_lsn` None: from the oldest rollup. None when nothing was rolled up yet.
    """
    with clickhouse_client(dsn) as client:
        ensure_tables(client)
        checkpoint = read_clickhouse_checkpoint(client)  # before the scan: rows below it exist
        if after_lsn is None:
            oldest = client.query(
                "SELECT count(), min(asof_lsn) FROM engagement._rollup_10m_windows FINAL"
            ).result_rows
            if not oldest or int(oldest[0][0]) == 0:
                return None
            after_lsn = int(oldest[0][1])
        changed = client.query(
            CHANGED_WINDOWS, parameters={"after": after_lsn, "first": _epoch(first)}
        ).result_rows
        newest = max((int(lsn) for _, lsn in changed), default=0)
        left = (
            client.query(
                LEFT_WINDOWS, parameters={"after": after_lsn, "newest": newest}
            ).result_rows
            if newest
            else []
        )
        rolled_rows = (
            client.query(
                ROLLED_UP_WINDOWS, parameters={"starts": [int(w) for w, _ in changed]}
            ).result_rows
            if changed
            else []
        )
    rolled = {int(w): int(asof) for w, asof in rolled_rows}
    stale = {
        int(w): int(lsn) for w, lsn in changed if int(w) in rolled and int(lsn) > rolled[int(w)]
    }
    for w, lsn in left:
        stale[int(w)] = max(stale.get(int(w), 0), int(lsn))
    windows = tuple((datetime.fromtimestamp(w, UTC), lsn) for w, lsn in sorted(stale.items()))
    return LateChanges(windows, max(checkpoint, after_lsn))
