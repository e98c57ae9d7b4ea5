"""`engagement run` (what `make run` starts): UI with the code location, traffic, clean Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engagement_dagster.lib.local_services import local_services, port_open
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.source_db import connect, slot_info
from engagement_dagster.lib.supervisor import Platform, PlatformOptions
from tests.support import Samples, scrape

BIN = Path(sys.executable).parent
UI_PORT = 3311  # not 3000, so a developer's `make run` can stay up while tests run
METRICS_PORT = 9311  # not 9108, for the same reason
RATE = 40.0


def _max_event_id(dsn: str) -> int:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT coalesce(max(id), 0) FROM engagement_events")
        row = cur.fetchone()
    return int(row[0]) if row else 0


def test_run_brings_up_the_ui_with_traffic_and_stops_cleanly(
    source_dsn: str, settings: Settings
) -> None:
    process = subprocess.Popen(
        [
            str(BIN / "engagement"),
            "run",
            "--ui-port",
            str(UI_PORT),
            "--rate",
            str(RATE),
            "--content",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
            "ENGAGEMENT_METRICS_PORT": str(METRICS_PORT),
        },
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")))
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("Dagster UI:") for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "no UI after 240 s:\n" + "".join(lines)
            time.sleep(0.5)

        platform = Platform(settings, PlatformOptions(ui_port=UI_PORT))
        assert platform.location_status() == "LOADED"

        status = subprocess.run(
            [str(BIN / "engagement"), "services", "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("healthy") == 4

        first, started = _max_event_id(source_dsn), time.monotonic()
        time.sleep(6)
        rate = (_max_event_id(source_dsn) - first) / (time.monotonic() - started)
        # ids count inserts (valid and invalid); updates and deletes are ~7% of the offered rate
        assert 0.6 * RATE <= rate <= 1.2 * RATE, f"{rate:.1f} inserts/s for {RATE} offered"

        # The exporter serves live values once the daemon's stream run applies the traffic
        # (compared with a first scrape: earlier test modules' runs are in the same files).
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        baseline = scrape(url)

        def applied(samples: Samples) -> dict[str, float]:
            return {
                sink: samples.get(("engagement_sink_rows_applied_total", (("sink", sink),)), 0)
                - baseline.get(("engagement_sink_rows_applied_total", (("sink", sink),)), 0)
                for sink in ("clickhouse", "redis", "kafka")
            }

        deadline = time.monotonic() + 180
        while True:
            samples = scrape(url)
            if all(applied(samples).values()) and samples[("engagement_stream_running", ())]:
                break
            assert time.monotonic() < deadline, f"no rows applied in 180 s: {applied(samples)}"
            time.sleep(2)
        assert samples[("engagement_slot_exists", (("slot", settings.slot),))] == 1
        assert (
            samples[
                (
                    "engagement_changes_read_total",
                    (("op", "insert"), ("table", "engagement_events")),
                )
            ]
            > 0
        )
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=90)
        reader.join(timeout=10)
    output = "".join(lines)
    assert code == 0, output
    for child in ("generator", "metrics", "daemon", "webserver"):
        assert f"stopped {child}" in output
    assert not port_open("127.0.0.1", UI_PORT), "the webserver outlived Ctrl-C"
    assert not port_open("127.0.0.1", METRICS_PORT), "the metrics exporter outlived Ctrl-C"
    leftovers = subprocess.run(
        ["pgrep", "-f", f"dagster-webserver -h 127.0.0.1 -p {UI_PORT}"], capture_output=True
    )
    assert leftovers.returncode == 1, leftovers.stdout
    # The stream runs the daemon launched were stopped with it: none holds the slot.
    with connect(source_dsn) as conn:
        slot = slot_info(conn, settings.slot)
    assert slot is not None and not slot.active, f"a stream run outlived Ctrl-C: {slot}"
    # It did not start the services (the fixtures did), so it must leave them running.
    assert all(service.is_running() for service in local_services(settings))


def test_a_new_dagster_home_has_its_storage_before_the_daemon_and_webserver_start(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon and the webserver, started side by side on a new home, both created its SQLite
    tables, and the webserver lost that race once ("table alembic_version already exists"), so
    `make bench`'s platform did not start. The home's storage is now made before either."""
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    Platform(settings, PlatformOptions()).prepare_dagster_home()
    assert (home / "dagster.yaml").is_file()
    for database in ("history/runs.db", "history/runs/index.db", "schedules/schedules.db"):
        assert (home / database).stat().st_size > 0, database
