"""Throughput, per-batch latency and CPU of the Kafka sink's two producer backends.

Pushes synthetic enriched batches (lib/enrich.py's ENRICHED_ROWS_SCHEMA, serialized by the sink's
own row_messages) through each backend's `write()` against the local broker, one transaction per
batch as in the stream, under a unique topic prefix that is deleted afterwards. Runs every
configuration `--runs` times, interleaved, and prints one JSON object with each run and the
medians. Never touches the contract topics.

    .venv/bin/python bench/kafka_sink.py --rows 200000 --batch-rows 20000 400 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
from confluent_kafka.admin import AdminClient

from engagement_dagster.lib.enrich import ENRICHED_ROWS_SCHEMA
from engagement_dagster.lib.kafka_config import kafka_client_config, librdkafka_config
from engagement_dagster.lib.settings import Settings, get_settings
from engagement_dagster.lib.sinks.base import Sink, SinkBatch
from engagement_dagster.lib.sinks.kafka import KafkaSink, row_messages
from engagement_dagster.lib.sinks.kafka_confluent import ConfluentKafkaSink


def confluent(compression: str) -> Callable[[Settings, str, str], Sink]:
    def build(settings: Settings, transactional_id: str, prefix: str) -> Sink:
        return ConfluentKafkaSink(
            librdkafka_config(settings),
            transactional_id=transactional_id,
            topic_prefix=prefix,
            producer_config={"compression.type": compression},
        )

    return build


def kafka_python(settings: Settings, transactional_id: str, prefix: str) -> Sink:
    return KafkaSink(
        kafka_client_config(settings), transactional_id=transactional_id, topic_prefix=prefix
    )


BACKENDS: dict[str, Callable[[Settings, str, str], Sink]] = {
    "kafka-python": kafka_python,
    "confluent-lz4": confluent("lz4"),
    "confluent-zstd": confluent("zstd"),
    "confluent-none": confluent("none"),
}


@dataclass(frozen=True)
class Run:
    backend: str
    batch_rows: int
    rows: int
    seconds: float
    rows_per_s: float
    batch_ms_p50: float
    batch_ms_p99: float
    cpu_s_per_100k_rows: float


def enriched_rows(n: int, first_lsn: int) -> pl.DataFrame:
    """n rows shaped like the stream's: 200 contents, a short JSON payload, one LSN each."""
    contents = [str(uuid.UUID(int=i + 1)) for i in range(200)]
    now = datetime.now(UTC)
    return pl.DataFrame(
        {
            "event_id": range(1, n + 1),
            "content_id": [contents[i * 7919 % 200] for i in range(n)],
            "user_id": [str(uuid.UUID(int=(i * 104_729) % 50_000 + 1)) for i in range(n)],
            "event_type": [("play", "pause", "finish", "click")[i % 4] for i in range(n)],
            "event_ts": [now - timedelta(milliseconds=i) for i in range(n)],
            "device": [("ios", "android", "web")[i % 3] for i in range(n)],
            "duration_ms": [(i * 37) % 600_000 for i in range(n)],
            "content_type": [("podcast", "newsletter", "video")[i % 3] for i in range(n)],
            "length_seconds": [1800] * n,
            "engagement_seconds": [((i * 37) % 600_000) / 1000.0 for i in range(n)],
            "engagement_pct": [
                round(100 * ((i * 37) % 600_000) / 1000.0 / 1800, 2) for i in range(n)
            ],
            "raw_payload": [f'{{"app": "1.2", "session": {i}}}' for i in range(n)],
            "op": ["insert"] * n,
            "source_lsn": range(first_lsn, first_lsn + n),
            "source_committed_at": [now] * n,
            "is_deleted": [0] * n,
        },
        schema=ENRICHED_ROWS_SCHEMA,
    )


def batches(rows: pl.DataFrame, batch_rows: int) -> list[SinkBatch]:
    empty = pl.DataFrame()
    return [
        SinkBatch(
            last_lsn=int(chunk["source_lsn"].max()),  # type: ignore[arg-type]
            rows=chunk,
            deltas=empty,
            dead_letters=empty,
        )
        for chunk in rows.iter_slices(batch_rows)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_once(settings: Settings, backend: str, work: list[SinkBatch], prefix: str) -> Run:
    sink = BACKENDS[backend](settings, f"bench-{uuid.uuid4().hex[:8]}", prefix)
    sink.setup()
    sink.checkpoint()  # producer created and initialised outside the measurement
    latencies = []
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in work:
        started = time.perf_counter()
        sink.write(batch, 0)
        latencies.append((time.perf_counter() - started) * 1000)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    sink.close()
    rows = sum(b.rows.height for b in work)
    return Run(
        backend=backend,
        batch_rows=work[0].rows.height,
        rows=rows,
        seconds=round(wall, 3),
        rows_per_s=round(rows / wall),
        batch_ms_p50=round(percentile(latencies, 0.5), 1),
        batch_ms_p99=round(percentile(latencies, 0.99), 1),
        cpu_s_per_100k_rows=round(cpu / rows * 100_000, 3),
    )


def serialization_cpu(work: list[SinkBatch]) -> float:
    """CPU seconds per 100k rows of row_messages alone: the part both backends share."""
    cpu = time.process_time()
    for batch in work:
        row_messages(batch.rows)
    return round((time.process_time() - cpu) / sum(b.rows.height for b in work) * 100_000, 3)


def medians(runs: list[Run]) -> dict[str, Any]:
    fields = ("rows_per_s", "batch_ms_p50", "batch_ms_p99", "cpu_s_per_100k_rows")
    return {f: statistics.median(getattr(r, f) for r in runs) for f in fields}


def delete_topics(settings: Settings, prefix: str) -> None:
    admin = AdminClient(librdkafka_config(settings))
    ours = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    for future in admin.delete_topics(ours, operation_timeout=30).values():
        future.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-rows", type=int, nargs="+", default=[20_000, 400])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = parser.parse_args()
    settings = get_settings()
    load_at_start = os.getloadavg()
    prefix = f"bench.{uuid.uuid4().hex[:8]}."
    rows = enriched_rows(args.rows, first_lsn=1_000)
    work = {size: batches(rows, size) for size in args.batch_rows}
    runs: list[Run] = []
    try:
        for _ in range(args.runs):  # interleaved, so drift of a shared machine hits all alike
            for size in args.batch_rows:
                runs.extend(run_once(settings, b, work[size], prefix) for b in args.backends)
    finally:
        delete_topics(settings, prefix)
    summary = {
        f"{b}/{size}": medians([r for r in runs if r.backend == b and r.batch_rows == size])
        for size in args.batch_rows
        for b in args.backends
    }
    print(
        json.dumps(
            {
                "rows": args.rows,
                "runs": args.runs,
                "load_average_at_start": load_at_start,
                "row_messages_cpu_s_per_100k_rows": serialization_cpu(work[args.batch_rows[0]]),
                "median": summary,
                "each_run": [asdict(r) for r in runs],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
