"""Backfill throughput of one day partition: seed N events into one UTC day of a scratch
database, backfill the day into a scratch embedded ClickHouse, print JSON.

Two cases, each run `--runs` times (medians reported): `empty` backfills a day ClickHouse does
not hold (the table is dropped first), `unchanged` re-runs it over a day ClickHouse already holds
(compares every row, writes nothing). Never touches the platform's or the tests' data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from datetime import date

from engagement_dagster.lib.backfill import BackfillReport, backfill_days, day_bounds
from engagement_dagster.lib.clickhouse import chdb_path, clickhouse_client
from engagement_dagster.lib.settings import Settings, get_settings
from engagement_dagster.lib.source_db import (
    CREATE_CONTENT,
    CREATE_ENGAGEMENT_EVENTS,
    CREATE_EVENT_TS_INDEX,
    connect,
    ensure_database,
)

DAY = date(2026, 11, 20)
DATABASE = "engagement_bench_backfill"

SEED_CONTENT = """
INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)
SELECT gen_random_uuid(), 'bench-' || i, 'Bench item ' || i,
       (ARRAY['podcast', 'newsletter', 'video'])[1 + i % 3],
       CASE WHEN i % 10 = 0 THEN NULL ELSE 60 + (i * 37) % 3600 END, now()
  FROM generate_series(1, 500) AS i
"""
# Realistic rows: ~5% NULL durations, ~1% invalid (negative duration), JSON payloads.
SEED_EVENTS = """
WITH ids AS (SELECT array_agg(id ORDER BY slug) AS a FROM content)
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,
                               raw_payload)
SELECT ids.a[1 + (i * 7919) %% array_length(ids.a, 1)], gen_random_uuid(),
       (ARRAY['play', 'pause', 'finish', 'click'])[1 + i %% 4],
       %(start)s::timestamptz + (i %% 86400000) * interval '1 millisecond' * 0.999,
       CASE WHEN i %% 20 = 0 THEN NULL WHEN i %% 100 = 1 THEN -1 ELSE (i * 131) %% 1800000 END,
       (ARRAY['ios', 'android', 'web', 'tv'])[1 + i %% 4],
       jsonb_build_object('app', '1.' || (i %% 9), 'session', i, 'ref', 'bench')
  FROM ids, generate_series(1::bigint, %(rows)s) AS i
"""


def bench_settings(base: Settings) -> Settings:
    dsn = base.pg_dsn.rsplit("/", 1)[0] + f"/{DATABASE}"
    return base.model_copy(
        update={
            "pg_dsn": dsn,
            # Not under .local/bench: `engagement bench` resets that directory.
            "clickhouse_url": f"chdb://{base.local_dir / 'bench_backfill' / 'clickhouse'}",
        }
    )


def seed(settings: Settings, rows: int) -> int:
    """The day holds `rows` events (seeded once; reused while the count matches)."""
    ensure_database(settings.pg_dsn)
    start, end = day_bounds(DAY)
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        for ddl in (CREATE_CONTENT, CREATE_ENGAGEMENT_EVENTS, CREATE_EVENT_TS_INDEX):
            cur.execute(ddl)
        cur.execute(
            "SELECT count(*) FROM engagement_events WHERE event_ts >= %s AND event_ts < %s",
            (start, end),
        )
        held = cur.fetchone()
        if held and held[0] == rows:
            return rows
        cur.execute("TRUNCATE engagement_events, content")
        cur.execute(SEED_CONTENT)
        cur.execute(
            SEED_EVENTS.replace("%(start)s::", "%(start)s::"), {"start": start, "rows": rows}
        )
        cur.execute("VACUUM ANALYZE engagement_events")
    return rows


def drop_clickhouse(settings: Settings) -> None:
    path = chdb_path(settings.clickhouse_dsn)
    assert path is not None and path.parent.name == "bench_backfill", f"refusing to remove {path}"
    shutil.rmtree(path, ignore_errors=True)


def run(settings: Settings, chunk_rows: int) -> BackfillReport:
    return backfill_days(settings, DAY, DAY, chunk_rows=chunk_rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    args = parser.parse_args()
    settings = bench_settings(get_settings())
    seed_started = time.monotonic()
    seed(settings, args.rows)
    seed_s = time.monotonic() - seed_started
    results: dict[str, list[dict[str, float | int]]] = {"empty": [], "unchanged": []}
    for _ in range(args.runs):
        drop_clickhouse(settings)
        for case in ("empty", "unchanged"):
            report = run(settings, args.chunk_rows)
            results[case].append(
                {
                    "seconds": round(report.seconds, 3),
                    "rows_per_s": round(report.rows_per_s),
                    "rows_written": report.rows_written,
                }
            )
    with clickhouse_client(settings.clickhouse_dsn) as client:
        held = client.query(
            "SELECT count() FROM engagement.enriched_engagements FINAL WHERE is_deleted = 0"
        ).result_rows[0][0]
    out = {
        "benchmark": "backfill_day_partition",
        "rows": args.rows,
        "chunk_rows": args.chunk_rows,
        "seed_seconds": round(seed_s, 1),
        "clickhouse_rows_after": held,
        **{
            f"backfill_rows_per_s_{case}": statistics.median(r["rows_per_s"] for r in runs)
            for case, runs in results.items()
        },
        "runs": results,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
