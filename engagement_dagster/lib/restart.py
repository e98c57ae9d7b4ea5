"""Restart from a point: a new slot at a snapshot, the days since a timestamp backfilled from that
snapshot, and every sink's checkpoint set to it, so the next stream run continues exactly there.

It refuses while a stream consumes the slot, and never moves a sink's checkpoint backwards; it
never imports Dagster (the CLI and the `restart_from_point` job call `restart_from`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg2.errors

from engagement_dagster.lib.backfill import (
    DEFAULT_CHUNK_ROWS,
    BackfillReport,
    SourceSnapshot,
    backfill_in_snapshot,
    source_snapshot,
)
from engagement_dagster.lib.enrich import DEAD_LETTERS_SCHEMA, DELTAS_SCHEMA, ENRICHED_ROWS_SCHEMA
from engagement_dagster.lib.pipeline import default_sinks
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.base import SinkBatch
from engagement_dagster.lib.sinks.redis import RedisSink
from engagement_dagster.lib.source_db import connect, slot_info

DROP_SLOT = "SELECT pg_drop_replication_slot(%s)"


class RestartRefused(RuntimeError):
    """The restart would race a live stream or move a checkpoint backwards; nothing was done
    past the point the message names."""


@dataclass(frozen=True)
class RestartReport:
    slot: str
    consistent_lsn: int  # the new slot's consistent point: the stream continues from here
    checkpoint: int  # every sink's checkpoint now (consistent point - 1)
    previous_checkpoints: dict[str, int]
    backfill: BackfillReport


def restart_from(
    settings: Settings,
    start: datetime,
    *,
    to_kafka: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> RestartReport:
    """Rebuild from `start`'s UTC day to today and continue the stream from a fresh slot.

    Order: drop the old slot, create the new one with its snapshot, set the sinks' checkpoints
    to the snapshot's version, then backfill inside that snapshot. A crash after the checkpoints
    leaves a consistent stream and incomplete days: run the restart (or `engagement backfill`
    over those days) again.
    """
    if start.tzinfo is None:
        raise RestartRefused(f"--from {start.isoformat()} has no time zone; add one (Z, +00:00)")
    first_day = start.astimezone(UTC).date()
    last_day = datetime.now(UTC).date()
    if first_day > last_day:
        raise RestartRefused(f"--from {start.isoformat()} is in the future")
    _drop_idle_slot(settings)
    with source_snapshot(settings.pg_dsn, slot=settings.slot) as snapshot:
        _refuse_if_consumed(settings, "after the new slot was created; run the restart again")
        previous = set_checkpoints(settings, snapshot.version)
        _rebuild_redis(settings, snapshot)
        backfill = backfill_in_snapshot(
            snapshot, settings, first_day, last_day, to_kafka=to_kafka, chunk_rows=chunk_rows
        )
    return RestartReport(
        settings.slot, snapshot.consistent_lsn, snapshot.version, previous, backfill
    )


def _refuse_if_consumed(settings: Settings, when: str) -> None:
    with connect(settings.pg_dsn) as conn:
        info = slot_info(conn, settings.slot)
    if info is not None and info.active:
        raise RestartRefused(
            f"replication slot {settings.slot!r} is consumed by pid {info.active_pid} ({when}): "
            "a cdc_stream run or `engagement stream`. Stop the sensor change_cursor_sensor, "
            "terminate the run (or the command), then restart."
        )


def _drop_idle_slot(settings: Settings) -> None:
    _refuse_if_consumed(settings, "nothing was changed")
    with connect(settings.pg_dsn) as conn, conn.cursor() as cur:
        if slot_info(conn, settings.slot) is None:
            return
        try:
            cur.execute(DROP_SLOT, (settings.slot,))
        except psycopg2.errors.ObjectInUse as exc:
            raise RestartRefused(
                f"replication slot {settings.slot!r} was taken by a stream while dropping it "
                f"(nothing was changed): {exc}".strip()
            ) from exc


def _rebuild_redis(settings: Settings, snapshot: SourceSnapshot) -> None:
    """The keys the stream owns in Redis (live board, open windows) as of the snapshot, so they
    hold the changes made while no stream ran, as the backfilled days do (RedisSink.rebuild)."""
    for sink in default_sinks(settings):
        try:
            if isinstance(sink, RedisSink):
                sink.rebuild(snapshot)
        finally:
            sink.close()


def set_checkpoints(settings: Settings, lsn: int) -> dict[str, int]:
    """Move every sink's checkpoint to `lsn` through the sink's own write (an empty batch), so
    each stores it as the stream does: ClickHouse's _checkpoints row, Redis's checkpoint key,
    Kafka's checkpoint record in a transaction of the stream's transactional.id (which also
    fences any producer left from the old stream). Returns the checkpoints before."""
    empty = SinkBatch(
        last_lsn=lsn,
        rows=ENRICHED_ROWS_SCHEMA.to_frame(),
        deltas=DELTAS_SCHEMA.to_frame(),
        dead_letters=DEAD_LETTERS_SCHEMA.to_frame(),
    )
    previous: dict[str, int] = {}
    for sink in default_sinks(settings):
        try:
            sink.setup()
            checkpoint = sink.read_checkpoint()
            if checkpoint > lsn:
                raise RestartRefused(
                    f"sink {sink.name} is at {checkpoint}, past the new slot's {lsn}: its data "
                    "belongs to another source database; point the sink elsewhere"
                )
            previous[sink.name] = checkpoint
            if checkpoint < lsn:
                sink.write(empty, checkpoint)
        finally:
            sink.close()
    return previous
