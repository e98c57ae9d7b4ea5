"""A stopped sink makes its alert condition true within a minute, on real scraped values.

A real Prometheus (Debian's package) runs the shipped configuration (deploy/prometheus: its
scrape and evaluation intervals and its alert rules) against the real exporter, while a stream
run applies live traffic. Kafka is stopped: EngagementSinkDown{sink="kafka"} must become
pending (its condition true) within 60 s, for Kafka only, and clear once Kafka is back; after a
final drain every sink equals PostgreSQL (lost and doubled are reported).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engagement_dagster.lib.generator import TrafficOptions, run_traffic, seed_content
from engagement_dagster.lib.local_services import LocalKafka
from engagement_dagster.lib.metrics import serve
from engagement_dagster.lib.settings import PROJECT_ROOT, Settings
from engagement_dagster.lib.source_db import connect
from tests.faults.conftest import FaultReport
from tests.faults.exactness import check_exact, mark_fault_end, wait_caught_up
from tests.faults.test_crash import final_drain

BIN = Path(sys.executable).parent
DEPLOY = PROJECT_ROOT / "deploy" / "prometheus"
ALERT = "EngagementSinkDown"
WITHIN_S = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


class Prometheus:
    """A Prometheus server on loopback, with the shipped rules and intervals."""

    def __init__(self, workdir: Path, exporter_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: run `make install` (Debian package "
                        "prometheus)", pytrace=False)  # fmt: skip
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["rule_files"] = [str(DEPLOY / "rules" / "*.yml")]
        config["scrape_configs"] = [
            {
                **config["scrape_configs"][0],
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
            }
        ]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2):
                    return
            except OSError:
                assert self.process.poll() is None, (workdir / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "Prometheus not ready after 60 s"
                time.sleep(0.5)

    def query(self, promql: str) -> dict[str, float]:
        """An instant query: value by the `sink` label."""
        body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        return {r["metric"].get("sink", ""): float(r["value"][1]) for r in body["data"]["result"]}

    def alerts(self, name: str) -> dict[str, str]:
        """Pending or firing alerts of this name: state by the `sink` label."""
        body = _get(f"{self.url}/api/v1/alerts")
        return {
            a["labels"].get("sink", ""): a["state"]
            for a in body["data"]["alerts"]
            if a["labels"]["alertname"] == name
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def monitored(
    clean_sinks: Settings, tmp_path: Path
) -> Iterator[tuple[Prometheus, Callable[[], None]]]:
    """Exporter and Prometheus, a stream run and 300 changes/s of traffic, all on loopback; and
    what stops the traffic and the stream run (at the end, or earlier to check the sinks)."""
    with connect(clean_sinks.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE engagement_events, content")
    seed_content(clean_sinks.pg_dsn, 100, seed=5)
    # Metric files of this stream run only: streams run inside the test process by earlier
    # tests (some with stand-in sinks that fail) are alive and would be served too.
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    exporter_port = _free_port()
    stop_exporter = threading.Event()
    exporter = threading.Thread(
        target=serve,
        args=(
            clean_sinks.model_copy(
                update={"metrics_port": exporter_port, "metrics_dir_override": metrics_dir}
            ),
            stop_exporter,
        ),
        daemon=True,
    )
    exporter.start()
    prometheus = Prometheus(tmp_path, exporter_port)
    stop_traffic = threading.Event()
    traffic = threading.Thread(
        target=run_traffic,
        # No content updates: events keep the content of their commit, PostgreSQL only the newest
        # (the exactness check joins the newest).
        args=(clean_sinks.pg_dsn, TrafficOptions(rate=300, seed=9, content_update_ratio=0.0)),
        kwargs={"stop": stop_traffic},
    )
    stream = subprocess.Popen(
        [str(BIN / "engagement"), "stream", "--run-seconds", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "ENGAGEMENT_METRICS_DIR": str(metrics_dir)},
    )  # fmt: skip
    traffic.start()

    def stop_load() -> None:
        stop_traffic.set()
        traffic.join(timeout=30)
        if stream.poll() is None:
            stream.send_signal(signal.SIGTERM)
        assert stream.wait(timeout=120) == 0

    try:
        yield prometheus, stop_load
    finally:
        stop_load()
        prometheus.stop()
        stop_exporter.set()
        exporter.join(timeout=10)


def test_a_stopped_sink_makes_its_alert_condition_true_within_a_minute(
    monitored: tuple[Prometheus, Callable[[], None]],
    clean_sinks: Settings,
    fault_report: FaultReport,
) -> None:
    prometheus, stop_load = monitored
    kafka = LocalKafka(clean_sinks)
    deadline = time.monotonic() + 120
    while prometheus.query("engagement_sink_up") != {"clickhouse": 1, "redis": 1, "kafka": 1}:
        assert time.monotonic() < deadline, "the sinks were never all up in Prometheus"
        time.sleep(1)
    assert prometheus.alerts(ALERT) == {}

    assert kafka.stop(timeout_s=15), "the local Kafka was not running"
    stopped_at = time.monotonic()
    try:
        while "kafka" not in (active := prometheus.alerts(ALERT)):
            assert time.monotonic() - stopped_at < WITHIN_S, (
                f"{ALERT} not pending {WITHIN_S:.0f} s after Kafka stopped; "
                f"engagement_sink_up = {prometheus.query('engagement_sink_up')}"
            )
            time.sleep(0.5)
        condition_true_s = time.monotonic() - stopped_at
        assert set(active) == {"kafka"}, active  # the other sinks stayed up
        print(f"{ALERT}{{sink=kafka}} {active['kafka']} {condition_true_s:.1f} s after the stop")
    finally:
        kafka.start()
    back = time.monotonic()
    caught = wait_caught_up(clean_sinks, mark_fault_end(clean_sinks), timeout_s=180, since=back)
    # Back: the condition clears once the sink applies again.
    deadline = back + 180
    while prometheus.alerts(ALERT):
        assert time.monotonic() < deadline, f"{ALERT} still active 180 s after Kafka returned"
        time.sleep(1)
    cleared_s = time.monotonic() - back
    stop_load()
    final_drain()
    check_exact(
        fault_report, clean_sinks, recovery_s=max(caught.values()),
        detail=f"Kafka stopped: {ALERT}{{sink=kafka}} pending {condition_true_s:.0f} s after, "
        f"cleared {cleared_s:.0f} s after it was back; broker back -> caught up {caught}",
    )  # fmt: skip
