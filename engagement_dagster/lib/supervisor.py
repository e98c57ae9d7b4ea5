"""`engagement run`: the whole platform on one machine, from local services to the Dagster UI.

Starts what is missing, supervises its children and, on Ctrl-C, stops exactly what it started
(in reverse order); data under .local/ is kept, so the next run carries on where this one ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from engagement_dagster.lib.generator import seed_content
from engagement_dagster.lib.local_services import (
    LocalService,
    ServiceError,
    local_services,
    port_open,
)
from engagement_dagster.lib.secure import redact
from engagement_dagster.lib.settings import PROJECT_ROOT, Settings
from engagement_dagster.lib.source_db import connect, init_source

LOCATION_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""

INSERTS_SO_FAR = """
SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables WHERE relname = 'engagement_events'
"""


@dataclass(frozen=True)
class PlatformOptions:
    ui_host: str = "127.0.0.1"
    ui_port: int = 3000
    rate: float = 50.0
    content: int = 500
    report_every_s: float = 10.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Platform:
    """What one `engagement run` started, so that it stops exactly that."""

    settings: Settings
    options: PlatformOptions
    say: Callable[[str], None] = print
    services: list[LocalService] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    @property
    def dagster_home(self) -> Path:
        return Path(os.environ.get("DAGSTER_HOME") or self.settings.dagster_home)

    @property
    def logs(self) -> Path:
        return self.settings.local_dir / "logs"

    def start(self) -> None:
        for service in local_services(self.settings):
            result = service.start()
            self.say(f"  {result.name:<10} {result.detail}")
            if result.started:
                self.services.append(service)
        report = init_source(
            self.settings.pg_dsn, slot=self.settings.slot, publication=self.settings.publication
        )
        self.say(
            f"  {'db init':<10} schema, publication {self.settings.publication}, "
            f"slot {self.settings.slot} {'created' if report.slot_created else 'ready'}"
        )
        added = seed_content(self.settings.pg_dsn, self.options.content)
        self.say(f"  {'content':<10} {added} demo items added ({self.options.content} wanted)")
        self.prepare_dagster_home()
        self.logs.mkdir(parents=True, exist_ok=True)
        if port_open(self.options.ui_host, self.options.ui_port):
            raise ServiceError(
                f"port {self.options.ui_port} is taken (another `make run`?); stop it or pass "
                "--ui-port"
            )
        if port_open(self.settings.metrics_host, self.settings.metrics_port):
            raise ServiceError(
                f"port {self.settings.metrics_port} is taken (another `engagement metrics`?); "
                "stop it or set ENGAGEMENT_METRICS_PORT"
            )
        workspace = str(PROJECT_ROOT / "workspace.yaml")
        bin_dir = Path(sys.executable).parent
        self._spawn(
            "generator",
            [str(bin_dir / "engagement"), "generate", "--rate", str(self.options.rate)],
        )
        self._spawn("metrics", [str(bin_dir / "engagement"), "metrics"])
        self._spawn("daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", workspace])
        self._spawn(
            "webserver",
            [
                str(bin_dir / "dagster-webserver"),
                "-h",
                self.options.ui_host,
                "-p",
                str(self.options.ui_port),
                "-w",
                workspace,
            ],
        )
        self._wait_for_ui()

    def prepare_dagster_home(self) -> None:
        """dagster.yaml in DAGSTER_HOME, and its storage created here, once: the daemon and the
        webserver starting side by side on a new home both create its SQLite tables, and one
        failed with "table alembic_version already exists" (seen in `make bench`)."""
        import dagster as dg

        self.dagster_home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", self.dagster_home / "dagster.yaml")
        with dg.DagsterInstance.from_config(str(self.dagster_home)):
            pass  # opening it creates the run, event log and schedule databases

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = self.logs / f"{name}.log"
        env = {**os.environ, "DAGSTER_HOME": str(self.dagster_home)}
        with log.open("ab") as out:
            process = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=PROJECT_ROOT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        self.children.append(Child(name, process, log))

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.metrics_host}:{self.settings.metrics_port}/metrics"

    @property
    def ui_url(self) -> str:
        return f"http://{self.options.ui_host}:{self.options.ui_port}"

    def location_status(self) -> str:
        """LOADED once the code location is up; otherwise its load status or error."""
        request = urllib.request.Request(
            f"{self.ui_url}/graphql",
            data=json.dumps({"query": LOCATION_QUERY}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
        entries = body["data"]["workspaceOrError"]["locationEntries"]
        for entry in entries:
            error = entry.get("locationOrLoadError") or {}
            if error.get("__typename") == "PythonError":
                return f"ERROR: {error['message'].strip()}"
            if entry["loadStatus"] != "LOADED":
                return str(entry["loadStatus"])
        return "LOADED" if entries else "NO LOCATIONS"

    def _wait_for_ui(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        status = "not answering"
        while time.monotonic() < deadline:
            self.check_children()
            try:
                status = self.location_status()
            except OSError:
                status = "not answering"
            if status == "LOADED":
                return
            if status.startswith("ERROR"):
                raise ServiceError(f"code location failed to load: {status}")
            time.sleep(0.5)
        raise ServiceError(f"Dagster UI at {self.ui_url}: {status} after {timeout_s:.0f}s")

    def check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                tail = child.log.read_text(errors="replace").splitlines()[-20:]
                raise ServiceError(
                    f"{child.name} exited with {code}; last lines of {child.log}:\n  "
                    + "\n  ".join(tail)
                )

    def inserts_so_far(self) -> int:
        with connect(self.settings.pg_dsn) as conn, conn.cursor() as cur:
            cur.execute(INSERTS_SO_FAR)
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> None:
        """Stop the children, then the services this run started, each in reverse order.

        Each child leads its own process group, which holds what it spawned: the daemon's code
        server and the stream runs it launched. The whole group gets SIGTERM, so a stream run
        finishes its batch, checkpoints and frees the slot instead of outliving `make run`.
        """
        for child in reversed(self.children):
            _signal_group(child.process.pid, signal.SIGTERM)
        for child in reversed(self.children):
            if not _wait_group(child.process, timeout_s=60):
                _signal_group(child.process.pid, signal.SIGKILL)
                _wait_group(child.process, timeout_s=10)
            self.say(f"  stopped {child.name}")
        self.children.clear()
        for service in reversed(self.services):
            service.stop()
            self.say(f"  stopped {service.name}")
        self.services.clear()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _wait_group(process: subprocess.Popen[bytes], *, timeout_s: float) -> bool:
    """Wait until the leader and every process of its group have exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, or the group never empties
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted


def run_platform(settings: Settings, options: PlatformOptions) -> int:
    """Start everything, report until Ctrl-C or SIGTERM, then stop what was started."""
    platform = Platform(settings, options)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    exit_code = 0
    try:
        print("Starting the engagement platform:")
        platform.start()
        print(
            f"\nDagster UI:     {platform.ui_url}  (code location loaded)\n"
            f"Metrics:        {platform.metrics_url}  (Prometheus)\n"
            f"Health:         .venv/bin/engagement services status; engagement status\n"
            f"Logs:           {platform.logs}/{{generator,metrics,daemon,webserver}}.log\n"
            f"Traffic:        {options.rate:g} events/s into {redact(settings.pg_dsn, settings)}\n"
            "Stop:           Ctrl-C (data under .local/ is kept)\n"
        )
        last_count, last_at = platform.inserts_so_far(), time.monotonic()
        while True:
            time.sleep(options.report_every_s)
            platform.check_children()
            count, now = platform.inserts_so_far(), time.monotonic()
            rate = (count - last_count) / (now - last_at)
            print(f"{time.strftime('%H:%M:%S')}  events inserted: {count:,} ({rate:,.0f}/s)")
            last_count, last_at = count, now
    except _Interrupted:
        print("\nStopping (Ctrl-C):")
    except ServiceError as exc:
        print(f"\nerror: {exc}\nStopping:", file=sys.stderr)
        exit_code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        platform.stop()
    return exit_code
