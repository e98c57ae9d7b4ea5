"""Metric files of ended processes are folded into archives without losing or doubling a count."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.multiprocess import MultiProcessCollector

from engagement_dagster.lib.metrics import fold_dead_processes, metric_names

WRITER = """
import sys
from engagement_dagster.lib import metrics
n = int(sys.argv[1])
metrics.STREAM_RUNS.inc()
metrics.SINK_ROWS.labels("redis").inc(n)
metrics.SINK_LATENCY.labels("redis").observe(n / 10)
metrics.SINK_CHECKPOINT_LSN.labels("redis").set(n)
metrics.SINK_UP.labels("redis").set(1)
"""


def _run_writer(directory: Path, n: int) -> None:
    env = {**os.environ, "ENGAGEMENT_METRICS_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", WRITER, str(n)], env=env, check=True, timeout=120)


def _samples(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    files = glob.glob(str(directory / "*.db"))
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in MultiProcessCollector.merge(files, accumulate=True)
        for s in metric.samples
    }


def test_folding_keeps_counters_histograms_and_the_newest_gauge(tmp_path: Path) -> None:
    for n in (5, 7, 3):  # the last run wrote checkpoint 3: the most recent value wins
        _run_writer(tmp_path, n)
    before = _samples(tmp_path)
    assert before[("engagement_sink_up", (("sink", "redis"),))] == 1  # not yet marked dead

    assert fold_dead_processes(tmp_path) > 0
    after = _samples(tmp_path)
    redis = (("sink", "redis"),)
    assert after[("engagement_stream_runs_total", ())] == 3
    assert after[("engagement_sink_rows_applied_total", redis)] == 15
    assert after[("engagement_sink_latency_seconds_count", redis)] == 3
    le_half = (("le", "0.5"), *redis)
    assert after[("engagement_sink_latency_seconds_bucket", le_half)] == 2  # 0.3 and 0.5
    assert after[("engagement_sink_checkpoint_lsn", redis)] == 3
    assert ("engagement_sink_up", redis) not in after  # a live gauge of ended processes
    live_gauges = {"engagement_sink_up", "engagement_stream_running"}
    assert {key: v for key, v in before.items() if key[0] not in live_gauges} == after
    names = sorted(Path(p).name for p in glob.glob(str(tmp_path / "*.db")))
    assert all(name.endswith("_archive.db") for name in names), names

    _run_writer(tmp_path, 10)  # another run after the fold adds to the archive
    fold_dead_processes(tmp_path)
    again = _samples(tmp_path)
    assert again[("engagement_sink_rows_applied_total", redis)] == 25
    assert again[("engagement_stream_runs_total", ())] == 4
    assert again[("engagement_sink_checkpoint_lsn", redis)] == 10


def test_folding_leaves_live_processes_alone(tmp_path: Path) -> None:
    _run_writer(tmp_path, 1)
    (written,) = glob.glob(str(tmp_path / "counter_*.db"))
    live = tmp_path / f"counter_{os.getpid()}.db"
    os.rename(written, live)  # as if this (live) process had written it
    fold_dead_processes(tmp_path)
    assert live.exists()
    assert _samples(tmp_path)[("engagement_stream_runs_total", ())] == 1


def test_catalogue_names_as_promql_sees_them() -> None:
    names = metric_names()
    assert "engagement_sink_latency_seconds_bucket" in names
    assert "engagement_changes_read_total" in names
    assert "engagement_slot_lag_bytes" in names
    assert "engagement_sink_up" in names
    assert all(name.startswith("engagement_") for name in names)
