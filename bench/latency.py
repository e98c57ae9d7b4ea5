"""Commit-to-visible latency of the running stream, measured from outside the pipeline.

Offers steady traffic, commits a probe transaction every `--probe-every` seconds and records when
each sink shows it: Redis and Kafka by their checkpoints (written atomically with the data, so a
checkpoint at or past the probe's LSN means the probe's change is visible), ClickHouse by the
probe row itself. Also reports the longest stall of the Redis checkpoint while traffic flows,
which is the handover gap between two stream runs. Prints one JSON object. Never writes to a
sink; it only reads them.

    .venv/bin/python bench/latency.py --rate 2000 --seconds 120
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
from kafka import KafkaConsumer, TopicPartition

from engagement_dagster.lib.clickhouse import clickhouse_client
from engagement_dagster.lib.generator import TrafficOptions, run_traffic
from engagement_dagster.lib.kafka_config import kafka_client_config
from engagement_dagster.lib.pgoutput import parse_lsn
from engagement_dagster.lib.settings import Settings, get_settings
from engagement_dagster.lib.sinks.kafka import CHECKPOINT_TOPIC
from engagement_dagster.lib.sinks.redis import CHECKPOINT_KEY
from engagement_dagster.lib.source_db import connect

PROBE_SQL = """
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,
                               raw_payload)
SELECT id, %s, 'play', now(), 1000, 'probe', '{"probe": true}' FROM content LIMIT 1
RETURNING id
"""


@dataclass
class Probe:
    event_id: int
    lsn: int  # the WAL position right after the probe committed
    committed_at: float  # time.time() right after COMMIT returned
    seen: dict[str, float] = field(default_factory=dict)


def commit_probe(dsn: str, user: str) -> Probe:
    with connect(dsn, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SET synchronous_commit = on")
        cur.execute(PROBE_SQL, (user,))
        row = cur.fetchone()
        assert row is not None, "no content to probe with: run `engagement seed` first"
        conn.commit()
        committed_at = time.time()
        cur.execute("SELECT pg_current_wal_lsn()::text")
        lsn_row = cur.fetchone()
        assert lsn_row is not None
    return Probe(int(row[0]), parse_lsn(lsn_row[0]), committed_at)


class Watchers:
    """Polls each sink and stamps the probes it shows."""

    def __init__(self, settings: Settings, probes: list[Probe], lock: threading.Lock) -> None:
        self.settings = settings
        self.probes = probes
        self.lock = lock
        self.stop = threading.Event()
        self.redis_stalls: list[float] = []

    def _mark(self, sink: str, visible: dict[int, bool] | int) -> None:
        now = time.time()
        with self.lock:
            for probe in self.probes:
                if sink in probe.seen:
                    continue
                shown = (
                    visible >= probe.lsn
                    if isinstance(visible, int)
                    else visible.get(probe.event_id, False)
                )
                if shown:
                    probe.seen[sink] = now

    def redis(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url)
        last_value, last_change = 0, time.time()
        while not self.stop.is_set():
            value = int(client.get(CHECKPOINT_KEY) or 0)
            now = time.time()
            if value != last_value:
                self.redis_stalls.append(now - last_change)
                last_value, last_change = value, now
            self._mark("redis", value)
            time.sleep(0.005)
        client.close()

    def kafka(self) -> None:
        topic = self.settings.kafka_topic_prefix + CHECKPOINT_TOPIC
        consumer = KafkaConsumer(
            **kafka_client_config(self.settings),
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_end(partition)
        while not self.stop.is_set():
            for record in consumer.poll(timeout_ms=50).get(partition, []):
                if record.value:
                    self._mark("kafka", int(json.loads(record.value)["lsn"]))
        consumer.close()

    def clickhouse(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                wanted = [p.event_id for p in self.probes if "clickhouse" not in p.seen]
            if wanted:
                with clickhouse_client(self.settings.clickhouse_dsn) as client:
                    found = client.query(
                        "SELECT event_id FROM engagement.enriched_engagements "
                        "WHERE event_id IN {ids:Array(Int64)}",
                        parameters={"ids": wanted},
                    ).result_rows
                self._mark("clickhouse", {int(r[0]): True for r in found})
            time.sleep(0.02)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    cut = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else []

    def at(q: int) -> float:
        return round(cut[q - 1] if cut else ordered[0], 1)

    return {"p50": at(50), "p95": at(95), "p99": at(99), "max": round(ordered[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="offered changes/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to measure")
    parser.add_argument("--probe-every", type=float, default=0.2, help="seconds between probes")
    parser.add_argument("--workers", type=int, default=2, help="generator connections")
    args = parser.parse_args()

    settings = get_settings()
    probes: list[Probe] = []
    lock = threading.Lock()
    watchers = Watchers(settings, probes, lock)
    threads = [
        threading.Thread(target=w, daemon=True)
        for w in (watchers.redis, watchers.kafka, watchers.clickhouse)
    ]
    stop_traffic = threading.Event()
    traffic = threading.Thread(
        target=run_traffic,
        args=(settings.pg_dsn, TrafficOptions(rate=args.rate, workers=args.workers)),
        kwargs={"stop": stop_traffic},
        daemon=True,
    )
    for thread in [*threads, traffic]:
        thread.start()
    user = str(uuid.uuid4())
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        probe = commit_probe(settings.pg_dsn, user)
        with lock:
            probes.append(probe)
        time.sleep(args.probe_every)
    stop_traffic.set()
    time.sleep(15)  # let the last probes arrive
    watchers.stop.set()
    result: dict[str, object] = {"offered_rate": args.rate, "probes": len(probes)}
    for sink in ("redis", "clickhouse", "kafka"):
        latencies = [(p.seen[sink] - p.committed_at) * 1000 for p in probes if sink in p.seen]
        result[sink] = {**percentiles(latencies), "missing": len(probes) - len(latencies)}
    result["redis_longest_stall_ms"] = round(max(watchers.redis_stalls, default=0) * 1000, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
