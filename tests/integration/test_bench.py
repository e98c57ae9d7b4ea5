"""`engagement bench` end to end on the real services, small: every figure of the JSON is
there with a sane type, the bench leaves no slot, database or Kafka topic behind, and the
test session's own data is untouched. A measurement: no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kafka.admin import KafkaAdminClient

from engagement_dagster.lib.kafka_config import kafka_client_config
from engagement_dagster.lib.settings import PROJECT_ROOT, Settings
from engagement_dagster.lib.source_db import connect
from tests.conftest import NAMESPACE, REDIS_DB

ENGAGEMENT = str(Path(sys.executable).parent / "engagement")
# Its own namespace per test session, so two sessions never share a bench database.
BENCH_NAMESPACE = f"bench_{NAMESPACE}_test" if NAMESPACE else "bench_test"
SINKS = ("redis", "clickhouse", "kafka")
PERCENTILES = ("p50", "p95", "p99")


def _run(*args: str, results: Path) -> dict[str, Any]:
    done = subprocess.run(
        [ENGAGEMENT, "bench", "--namespace", BENCH_NAMESPACE, "--redis-db", str(REDIS_DB),
         "--results-dir", str(results), *args],
        cwd=PROJECT_ROOT, env=os.environ, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(last)
    saved = list(results.glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == result
    assert "engagement bench" in done.stdout or "engagement load" in done.stdout  # the table
    return result


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _left_behind(settings: Settings, run_id: str) -> tuple[list[str], list[str], list[str]]:
    database = f"engagement_{BENCH_NAMESPACE}"
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (database,))
        slots = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT datname FROM pg_database WHERE datname = %s", (database,))
        databases = [r[0] for r in cur.fetchall()]
    admin = KafkaAdminClient(**kafka_client_config(settings))
    try:
        topics = [t for t in admin.list_topics() if t.startswith(f"{BENCH_NAMESPACE}.{run_id}.")]
    finally:
        admin.close()
    return slots, databases, topics


def test_bench_reports_every_figure_and_cleans_up(
    source_dsn: str, settings: Settings, tmp_path: Path
) -> None:
    with connect(source_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM engagement_events")
        row = cur.fetchone()
    events_before = row[0] if row else 0

    result = _run("--backlog", "3000", "--seconds", "4", "--rate", "300", "--workers", "2",
                  "--no-dagster", results=tmp_path)  # fmt: skip

    for key in ("catchup_eps", "raw_decode_eps", "efficiency", "rss_mb", "cpu_pct",
                "steady_eps", "offered_eps", "catchup_s", "raw_decode_s",
                "catchup_eps_after_first_batch"):  # fmt: skip
        assert _number(result[key]), (key, result[key])
    assert result["backlog_changes"] >= 3000
    assert result["catchup_changes"] == result["backlog_changes"]  # the same backlog, read twice
    assert result["rss_mb"] > 50  # a real process's peak, from the kernel
    assert 0 < result["rss_private_mb"] < result["rss_mb"]  # less the pages mapped from files
    assert 50 < result["rss_mb_stream_process"] < result["rss_mb"]  # without its sink process
    # Where the catch-up's CPU went: every process is local here, so each has its figure.
    cpu = result["catchup_cpu_s"]
    assert set(cpu) == {"stream", "clickhouse_process", "postgres_walsender", "redis",
                        "kafka_broker", "total"}, cpu  # fmt: skip
    assert all(_number(v) for v in cpu.values()), cpu
    assert cpu["stream"] > 0.3 and cpu["clickhouse_process"] > 0.3, cpu  # imports alone
    assert cpu["total"] == round(sum(v for k, v in cpu.items() if k != "total"), 2), cpu
    assert 0 < result["catchup_machine_busy_pct"] <= 100
    for sink in SINKS:
        figures = result["latency_ms"][sink]
        assert figures["missing"] == 0, (sink, figures)
        assert all(_number(figures[p]) for p in PERCENTILES), (sink, figures)
        assert figures["p50"] <= figures["p95"] <= figures["p99"] <= figures["max"]
    applied = result["latency_ms"]["clickhouse_applied"]
    assert applied["rows"] > 0 and all(_number(applied[p]) for p in PERCENTILES), applied
    assert "hold" in result["latency_note"]
    assert _number(result["backfill_rows_per_s"]) and result["backfill_rows"] > 0
    assert result["sensor_to_run_start_ms"] is None and result["handover_gap_ms"] is None
    assert "--no-dagster" in result["dagster_note"]
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0
    assert isinstance(machine["git_commit"], str) and machine["git_commit"]
    assert result["settings"]["redis_db"] == REDIS_DB

    assert _left_behind(settings, result["run_id"]) == ([], [], [])
    with connect(source_dsn) as conn, conn.cursor() as cur:  # the session's data is untouched
        cur.execute("SELECT count(*) FROM engagement_events")
        row = cur.fetchone()
    assert (row[0] if row else 0) == events_before


def test_load_reports_lag_and_memory_over_time(settings: Settings, tmp_path: Path) -> None:
    result = _run("--load", "--rate", "300", "--seconds", "6", "--workers", "1", results=tmp_path)

    assert result["changes"] > 0 and _number(result["applied_eps"])
    assert len(result["samples"]) >= 2
    for sample in result["samples"]:
        assert _number(sample["t_s"]) and _number(sample["lag_bytes"]) and _number(sample["rss_mb"])
    assert result["max_lag_bytes"] >= result["final_lag_bytes"] >= 0
    assert _number(result["drain_s"]) and _number(result["rss_mb"])
    assert _left_behind(settings, result["run_id"]) == ([], [], [])
