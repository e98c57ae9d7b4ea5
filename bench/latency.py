"""Commit-to-visible latency of the running stream, measured from outside the pipeline.

Runs against whatever the environment points at (by default the platform of `make run`): once
the stream has caught up, offers steady traffic, commits a probe every `--probe-every` seconds
and records when each sink shows it (engagement_dagster/lib/bench.py holds the probe code;
`make bench` runs the same in its own namespace). Also reports the longest stall of the Redis
checkpoint, which is the handover gap between two stream runs. Prints one JSON object. Never
writes to a sink; it only reads them.

    .venv/bin/python bench/latency.py --rate 2000 --seconds 120 [--series probes.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from engagement_dagster.lib.bench import commit_probe, measure_latency
from engagement_dagster.lib.secure import redis_client
from engagement_dagster.lib.settings import Settings, get_settings
from engagement_dagster.lib.sinks.redis import read_checkpoint


def wait_until_caught_up(settings: Settings, timeout_s: float) -> float:
    """Seconds until the stream applied a probe committed now to Redis: a stream that starts
    behind (a slot that must first read through WAL others wrote meanwhile) is not measured
    while it catches up."""
    started = time.monotonic()
    target = commit_probe(settings.pg_dsn, str(uuid.uuid4())).lsn
    client = redis_client(settings.redis_url, settings=settings)
    try:
        while read_checkpoint(client) < target:
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"the stream did not catch up within {timeout_s:.0f} s")
            time.sleep(0.1)
    finally:
        client.close()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="offered changes/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to measure")
    parser.add_argument("--probe-every", type=float, default=0.2, help="seconds between probes")
    parser.add_argument("--workers", type=int, default=2, help="generator connections")
    parser.add_argument(
        "--sinks",
        help="comma-separated sinks to watch live (default: all, but not an embedded chDB: "
        "reading it from here makes the stream hand it over; its figure then comes from "
        "ClickHouse's own ingested_at stamps)",
    )
    parser.add_argument(
        "--series",
        type=Path,
        help="also write each probe's commit time and latency per sink here (JSON lines)",
    )
    parser.add_argument(
        "--catch-up-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the stream to catch up before measuring",
    )
    args = parser.parse_args()
    settings = get_settings()
    caught_up_s = wait_until_caught_up(settings, args.catch_up_timeout)
    print(f"stream caught up in {caught_up_s:.1f} s; measuring", file=sys.stderr)
    run = measure_latency(
        settings,
        rate=args.rate,
        seconds=args.seconds,
        probe_every=args.probe_every,
        workers=args.workers,
        sinks=tuple(args.sinks.split(",")) if args.sinks else None,
    )
    result: dict[str, object] = {
        "offered_rate": run.offered_rate,
        "offered_eps": round(run.traffic.events_per_s),
        "probes": run.probes,
        "caught_up_s": round(caught_up_s, 1),
        **run.latency_ms,
        "redis_longest_stall_ms": run.redis_longest_stall_ms,
    }
    if args.series:
        args.series.write_text("".join(json.dumps(row) + "\n" for row in run.series))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
