"""The `engagement` command: local services, source database, demo traffic and the platform.

Thin: every command parses its options and calls lib/; no logic lives here that a Dagster asset
or a test would need too.
"""

from __future__ import annotations

import sys
import threading
from datetime import datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from engagement_dagster.lib.settings import get_settings

console = Console()
DAY = click.DateTime(["%Y-%m-%d"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Engagement events from PostgreSQL to ClickHouse, Redis and Kafka, exactly once."""


@main.group()
def services() -> None:
    """The private local services: PostgreSQL, Redis, Kafka (and embedded ClickHouse)."""


@services.command("up")
def services_up() -> None:
    """Start the local services that are not running yet (idempotent)."""
    from engagement_dagster.lib.local_services import ServiceError, local_services

    for service in local_services(get_settings()):
        try:
            result = service.start()
        except ServiceError as exc:
            console.print(f"[red]{service.name}: {exc}[/red]")
            sys.exit(1)
        console.print(f"{result.name:<10} {result.detail}")


@services.command("down")
def services_down() -> None:
    """Stop the local services (their data stays under .local/)."""
    from engagement_dagster.lib.local_services import services_down as stop_all

    stopped = stop_all(get_settings())
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@services.command("status")
def services_status() -> None:
    """Each of the four systems: healthy, or why not. Exit 1 when any is unhealthy."""
    from engagement_dagster.lib.health import all_health

    results = all_health(get_settings())
    table = Table(title="engagement services")
    table.add_column("system")
    table.add_column("state")
    table.add_column("detail", overflow="fold")
    for health in results:
        state = "[green]healthy[/green]" if health.healthy else "[red]unhealthy[/red]"
        # Text, not markup: a detail quotes server messages such as "[FATAL: ...]".
        table.add_row(health.system, state, Text(health.detail))
    console.print(table)
    sys.exit(0 if all(h.healthy for h in results) else 1)


@main.group()
def db() -> None:
    """The source database."""


@db.command("init")
@click.option(
    "--create-role",
    "role",
    metavar="NAME",
    help="Also create (or reset) NAME, the least-privilege role for stream runs: LOGIN "
    "REPLICATION, CONNECT, SELECT on the source tables. Password: $ENGAGEMENT_PG_ROLE_PASSWORD, "
    "else prompted.",
)
def db_init(role: str | None) -> None:
    """Create the schema, REPLICA IDENTITY FULL, publication and slot (idempotent)."""
    import psycopg2

    from engagement_dagster.lib.settings import validate_identifier
    from engagement_dagster.lib.source_db import (
        SourceDatabaseError,
        create_stream_role,
        init_source,
    )

    settings = get_settings()
    role_password = None
    if role is not None:
        try:
            validate_identifier(role)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--create-role") from None
        secret = settings.pg_role_password
        role_password = (
            secret.get_secret_value()
            if secret is not None
            else click.prompt(
                f"password for role {role}", hide_input=True, confirmation_prompt=True
            )
        )
    try:
        report = init_source(settings.pg_dsn, slot=settings.slot, publication=settings.publication)
        role_report = (
            create_stream_role(settings.pg_dsn, role, role_password)
            if role is not None and role_password is not None
            else None
        )
    except (SourceDatabaseError, psycopg2.Error) as exc:
        # Connection errors come explained (lib/secure.py) and never carry a password.
        console.print(str(exc), style="red", markup=False)
        sys.exit(1)
    added = ", ".join(report.publication_tables_added)
    console.print(
        f"database   {'created' if report.database_created else 'exists'}\n"
        f"tables     content, engagement_events (engagement_events REPLICA IDENTITY FULL)\n"
        f"publication {settings.publication} "
        f"{'created' if report.publication_created else 'exists'}"
        f"{f' (added {added})' if added else ''}\n"
        f"slot       {settings.slot} {'created' if report.slot_created else 'exists'} (pgoutput)"
    )
    if role_report is not None:
        console.print(
            f"role       {role_report.name} {'created' if role_report.created else 'reset'}: "
            f"LOGIN REPLICATION, CONNECT on {role_report.database}, "
            f"SELECT on {', '.join(role_report.tables)}; stream runs connect as it with "
            "ENGAGEMENT_PG_DSN naming the user and ENGAGEMENT_PG_PASSWORD",
            markup=False,
        )


@main.command()
@click.option("--content", "count", default=500, show_default=True, help="Content rows wanted.")
@click.option("--seed", type=int, default=None, help="Random seed, for repeatable data.")
def seed(count: int, seed: int | None) -> None:
    """Insert demo content until the catalogue holds --content items."""
    from engagement_dagster.lib.generator import seed_content

    added = seed_content(get_settings().pg_dsn, count, seed=seed)
    console.print(f"content: {added} items added")


@main.command()
@click.option("--rate", default=50.0, show_default=True, help="Changes per second offered.")
@click.option(
    "--duration", type=float, default=None, help="Seconds to run (default: until Ctrl-C)."
)
@click.option("--update-ratio", default=0.05, show_default=True, help="Share of UPDATEs.")
@click.option("--delete-ratio", default=0.02, show_default=True, help="Share of DELETEs.")
@click.option("--invalid-ratio", default=0.0, show_default=True, help="Share of invalid rows.")
@click.option(
    "--content-update-ratio", default=0.001, show_default=True, help="Share of content UPDATEs."
)
@click.option(
    "--max-events-per-txn",
    default=5,
    show_default=True,
    help="Largest transaction (most are 1-3 changes).",
)
@click.option("--workers", default=1, show_default=True, help="Connections committing at once.")
@click.option("--seed", type=int, default=None, help="Random seed, for repeatable traffic.")
def generate(
    rate: float,
    duration: float | None,
    update_ratio: float,
    delete_ratio: float,
    invalid_ratio: float,
    content_update_ratio: float,
    max_events_per_txn: int,
    workers: int,
    seed: int | None,
) -> None:
    """Realistic engagement traffic: Zipf-like popularity, many small transactions."""
    import signal

    from engagement_dagster.lib.generator import TrafficOptions, TrafficReport, run_traffic

    options = TrafficOptions(
        rate=rate,
        duration_s=duration,
        update_ratio=update_ratio,
        delete_ratio=delete_ratio,
        invalid_ratio=invalid_ratio,
        content_update_ratio=content_update_ratio,
        max_events_per_txn=max_events_per_txn,
        workers=workers,
        seed=seed,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def progress(report: TrafficReport) -> None:
        console.print(
            f"{report.elapsed_s:7.1f}s  inserted {report.inserted:,}  updated {report.updated:,}"
            f"  deleted {report.deleted:,}  invalid {report.invalid:,}"
            f"  ({report.events_per_s:,.0f} changes/s)",
            highlight=False,
        )

    report = run_traffic(get_settings().pg_dsn, options, stop=stop, on_progress=progress)
    console.print(f"done: {report}")


@main.command()
@click.option("--until-caught-up", is_flag=True, help="Exit once the backlog is applied.")
@click.option(
    "--run-seconds",
    type=float,
    default=None,
    help="Exit after this long (default: $ENGAGEMENT_STREAM_RUN_SECONDS).",
)
@click.option("--batch-max-ms", default=200, show_default=True, help="Cut a batch this often.")
@click.option("--batch-max-rows", default=20_000, show_default=True, help="or at this many rows.")
@click.option(
    "--max-pending-rows",
    default=500_000,
    show_default=True,
    help="A failing sink buffers this much, then replays from the slot.",
)
def stream(
    until_caught_up: bool,
    run_seconds: float | None,
    batch_max_ms: int,
    batch_max_rows: int,
    max_pending_rows: int,
) -> None:
    """The change stream outside the daemon: the same code as the Dagster job `cdc_stream`."""
    import logging

    from engagement_dagster.lib.change_cursor import SlotBusy, SlotLost
    from engagement_dagster.lib.pipeline import build_stream
    from engagement_dagster.lib.stream import StreamOptions, StreamReport

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = get_settings()
    options = StreamOptions(
        batch_max_ms=batch_max_ms,
        batch_max_rows=batch_max_rows,
        run_seconds=run_seconds if run_seconds is not None else settings.stream_run_seconds,
        linger_seconds=0 if until_caught_up else None,
        report_every_s=5,
        max_pending_rows=max_pending_rows,
    )

    def progress(report: StreamReport) -> None:
        console.print(
            f"batches {report.batches:,}  changes {report.changes:,}  rows {report.rows:,}  "
            f"dead letters {report.dead_letters:,}  acknowledged {report.acknowledged_lsn:,}"
            + "".join(f"  {name}: {error}" for name, error in report.sink_errors.items() if error),
            highlight=False,
        )

    runner = build_stream(settings, options, on_report=progress)
    runner.install_signal_handlers()
    try:
        report = runner.run()
    except SlotBusy as exc:  # another run streams: nothing was read or written, exit 3
        console.print(
            f"not started: {exc}; only one stream may consume it", soft_wrap=True, highlight=False
        )
        sys.exit(3)
    except SlotLost as exc:  # exit 4: the runbook, not a retry, is the way on
        console.print(f"stopped: {exc}", soft_wrap=True, highlight=False)
        sys.exit(4)
    console.print(f"done: caught up={report.caught_up}, {report.changes:,} changes")


@main.command()
@click.option(
    "--window",
    type=click.Choice(["10m", "1h", "1d", "1w"]),
    default="10m",
    show_default=True,
    help="The sliding 10 minutes, or the open hour, day or week.",
)
@click.option(
    "--by",
    type=click.Choice(["seconds", "events"]),
    default="seconds",
    show_default=True,
    help="Rank by engagement seconds or by events.",
)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1), help="Rows shown.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
def top(window: str, by: str, limit: int, watch: bool) -> None:
    """The live leaderboard from Redis, with titles from PostgreSQL."""
    from typing import cast

    from engagement_dagster.lib.board import Metric, Window, show_top

    settings = get_settings()
    sys.exit(
        show_top(
            console,
            redis_url=settings.redis_url,
            pg_dsn=settings.pg_dsn,
            window=cast(Window, window),  # click.Choice checked both
            by=cast(Metric, by),
            limit=limit,
            watch=watch,
        )
    )


@main.group()
def dlq() -> None:
    """Dead letters in ClickHouse: list them, replay the ones today's rules accept."""


@dlq.command("list")
@click.option("--reason", default=None, help="Only this reason (e.g. unknown_event_type).")
@click.option("--limit", default=50, show_default=True, help="Newest dead letters shown.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per dead letter.")
def dlq_list(reason: str | None, limit: int, as_json: bool) -> None:
    """The newest dead letters, with counts per reason."""
    from engagement_dagster.lib.dead_letters import (
        dead_letters_view,
        letter_json,
        list_dead_letters,
    )

    listing = list_dead_letters(get_settings().clickhouse_dsn, reason=reason, limit=limit)
    if as_json:
        for letter in listing.letters:
            click.echo(letter_json(letter))
        return
    console.print(dead_letters_view(listing, reason=reason))


@dlq.command("replay")
@click.option("--reason", default=None, help="Only dead letters with this reason.")
@click.option("--dry-run", is_flag=True, help="Judge and report; write nothing.")
def dlq_replay(reason: str | None, dry_run: bool) -> None:
    """Re-validate unreplayed dead letters with today's rules; deliver the valid ones.

    Rules: the defaults plus $ENGAGEMENT_EXTRA_EVENT_TYPES (comma-separated event types).
    """
    from engagement_dagster.lib.dead_letters import ReplayError, replay_dead_letters, replay_view

    try:
        report = replay_dead_letters(get_settings(), reason=reason, dry_run=dry_run)
    except ReplayError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        sys.exit(1)
    console.print(replay_view(report))


@main.command()
@click.option("--from", "first", type=DAY, required=True, help="First UTC day.")
@click.option("--to", "last", type=DAY, default=None, help="Last UTC day (default: --from).")
@click.option("--kafka", is_flag=True, help="Also replay the days to Kafka (op r).")
def backfill(first: datetime, last: datetime | None, kafka: bool) -> None:
    """Rebuild UTC days of ClickHouse from a PostgreSQL snapshot; safe while the stream runs."""
    from engagement_dagster.lib.backfill import backfill_days

    report = backfill_days(get_settings(), first.date(), (last or first).date(), to_kafka=kafka)
    for day in report.days:
        console.print(
            f"{day.day}  read {day.rows_read:,}  written {day.rows_written:,}  "
            f"tombstones {day.tombstones:,}  invalid {day.dead_letters:,}  {day.seconds:.1f}s",
            highlight=False,
        )
    console.print(
        f"done: {report.rows_read:,} events in {report.seconds:.1f}s "
        f"({report.rows_per_s:,.0f}/s), snapshot version {report.version}"
    )


@main.command()
@click.option(
    "--from", "start", required=True, help="ISO timestamp with a zone, e.g. 2026-11-20T00:00Z."
)
@click.option(
    "--kafka/--no-kafka", default=True, show_default=True, help="Replay the rebuilt days to Kafka."
)
def restart(start: str, kafka: bool) -> None:
    """Restart from a point: fresh slot, days since --from rebuilt, every sink's checkpoint set.

    Refuses while a stream consumes the slot: stop change_cursor_sensor and its run first.
    """
    from engagement_dagster.lib.pgoutput import format_lsn
    from engagement_dagster.lib.restart import RestartRefused, restart_from

    try:
        report = restart_from(get_settings(), datetime.fromisoformat(start), to_kafka=kafka)
    except (RestartRefused, ValueError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        sys.exit(1)
    console.print(
        f"slot {report.slot} recreated at {format_lsn(report.consistent_lsn)}; checkpoints "
        f"{report.previous_checkpoints} -> {report.checkpoint}; rebuilt "
        f"{len(report.backfill.days)} days ({report.backfill.rows_read:,} events); "
        "the next stream run continues from there",
        highlight=False,
    )


@main.command()
@click.option("--backlog", default=500_000, show_default=True, help="Changes for catch-up.")
@click.option("--rate", type=float, default=None, help="Offered changes/s [5000; --load 10000].")
@click.option("--seconds", type=float, default=None, help="Steady window [60; --load 600].")
@click.option("--workers", default=4, show_default=True, help="Generator connections.")
@click.option("--no-dagster", is_flag=True, help="Skip the Dagster path (reported as null).")
@click.option("--load", is_flag=True, help="The load test (make load) instead of the bench.")
@click.option("--namespace", default="bench", show_default=True, help="Database engagement_<ns>.")
@click.option("--redis-db", default=9, show_default=True, help="Redis database of the bench.")
@click.option("--results-dir", type=click.Path(path_type=Path), default=None, help="JSON here.")
@click.option("--keep-data", is_flag=True, help="Keep the bench database (the slot is dropped).")
def bench(
    backlog: int,
    rate: float | None,
    seconds: float | None,
    workers: int,
    no_dagster: bool,
    load: bool,
    namespace: str,
    redis_db: int,
    results_dir: Path | None,
    keep_data: bool,
) -> None:
    """Throughput, latency and memory on the local services, in a namespace of its own.

    Prints a table, saves the JSON under bench/results/ and prints it as the last line.
    """
    import json

    from engagement_dagster.lib import bench as b

    err = Console(stderr=True)

    def say(message: str) -> None:
        err.print(message, markup=False, highlight=False)

    space = b.BenchNamespace(namespace, redis_db)
    if load:
        options = b.LoadOptions(rate=rate or 10_000, seconds=seconds or 600, workers=workers,
                                keep_data=keep_data)  # fmt: skip
        result = b.run_load(space, options, say)
        table = b.load_table(result)
    else:
        bench_options = b.BenchOptions(backlog=backlog, rate=rate or 5_000, seconds=seconds or 60,
                                       workers=workers, dagster=not no_dagster,
                                       keep_data=keep_data)  # fmt: skip
        result = b.run_bench(space, bench_options, say)
        table = b.bench_table(result)
    saved = b.save_result(result, results_dir or b.RESULTS_DIR)
    console.print(table)
    console.print(f"saved {saved}", highlight=False)
    print(json.dumps(result))


@main.command()
def status() -> None:
    """Slot, each sink's checkpoint and lag, last batch latency, dead letters, and what to do.
    Exit 1 when something needs doing."""
    from engagement_dagster.lib.status import gather, status_view

    report = gather(get_settings())
    console.print(status_view(report))
    sys.exit(1 if report.problems else 0)


@main.command()
def metrics() -> None:
    """Serve the Prometheus metrics of every stream process on 127.0.0.1:9108 until Ctrl-C."""
    import signal

    from engagement_dagster.lib.metrics import serve

    settings = get_settings()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    console.print(
        f"metrics on http://{settings.metrics_host}:{settings.metrics_port}/metrics "
        f"(from {settings.metrics_dir}); Ctrl-C stops"
    )
    serve(settings, stop)


@main.command()
@click.option("--ui-port", default=3000, show_default=True, help="Dagster UI port on 127.0.0.1.")
@click.option("--rate", default=50.0, show_default=True, help="Demo traffic, changes per second.")
@click.option("--content", default=500, show_default=True, help="Demo content items.")
def run(ui_port: int, rate: float, content: int) -> None:
    """The platform: local services, db init, demo traffic, Dagster webserver and daemon."""
    from engagement_dagster.lib.supervisor import PlatformOptions, run_platform

    options = PlatformOptions(ui_port=ui_port, rate=rate, content=content)
    sys.exit(run_platform(get_settings(), options))


if __name__ == "__main__":
    main()
