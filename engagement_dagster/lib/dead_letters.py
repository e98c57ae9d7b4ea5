"""Dead letters for people: listing `engagement.dead_letters`, replaying what today's rules accept.

Never writes Redis, never edits a dead letter in place (a new revision marks it replayed), and
never replays a change PostgreSQL has moved past: the stream owns the current state of every row.

Why a dead letter can become valid at all: validation (lib/enrich.py) depends only on the change
itself, its commit time and the rules; content never makes an event invalid. So a replay succeeds
only after the rules changed, e.g. an operator allowed a new event type. Fixing the source row is
not a replay: that UPDATE travels through the stream as a newer change, and the old dead letter is
then "superseded". The rules a replay applies are `EnrichRules` plus the event types named in
ENGAGEMENT_EXTRA_EVENT_TYPES (comma-separated), the same setting the stream validates with.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import polars as pl
import psycopg2
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import Error as ClickHouseError
from kafka.errors import KafkaError
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from engagement_dagster.lib.clickhouse import ClickHouseLockTimeout, clickhouse_client
from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    IMAGE_COLUMNS,
    OLD_IMAGE_COLUMNS,
    OPS,
    ContentVersion,
    EnrichRules,
    content_versions,
    enrich,
)
from engagement_dagster.lib.kafka_config import kafka_client_config
from engagement_dagster.lib.pgoutput import format_lsn
from engagement_dagster.lib.pipeline import enrich_rules
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.clickhouse import insertable
from engagement_dagster.lib.sinks.kafka import KafkaSink
from engagement_dagster.lib.sinks.kafka_contract import checkpoint_key, row_messages
from engagement_dagster.lib.source_db import connect

EXTRA_EVENT_TYPES_ENV = "ENGAGEMENT_EXTRA_EVENT_TYPES"
REPLAY_CHUNK = 1000  # dead letters per Kafka transaction (bounds the marker record's size)
REPLAY_HEADER = ("engagement-source", b"dlq-replay")  # a Kafka header, outside the JSON schema

REPLAYED: Final = "replayed"
STILL_INVALID: Final = "still invalid"
SUPERSEDED: Final = "superseded"
NOT_REPLAYABLE: Final = "not replayable"
OUTCOMES = (REPLAYED, STILL_INVALID, SUPERSEDED, NOT_REPLAYABLE)

# --- SQL ------------------------------------------------------------------------------------

TABLE_EXISTS = "EXISTS TABLE engagement.dead_letters"
_LETTER_COLUMNS = (
    "lsn, event_id, reason, op, raw_change, source_committed_at, first_seen_at, replayed_at, "
    "revision"
)
LIST_LETTERS = f"""
SELECT {_LETTER_COLUMNS}
FROM engagement.dead_letters FINAL
WHERE {{reason:Nullable(String)}} IS NULL OR reason = {{reason:Nullable(String)}}
ORDER BY lsn DESC, first_seen_at DESC
LIMIT {{limit:UInt64}}
"""
PENDING_LETTERS = f"""
SELECT {_LETTER_COLUMNS}
FROM engagement.dead_letters FINAL
WHERE replayed_at IS NULL
  AND ({{reason:Nullable(String)}} IS NULL OR reason = {{reason:Nullable(String)}})
ORDER BY lsn, reason, raw_change
"""
REASON_COUNTS = """
SELECT reason, count(), countIf(replayed_at IS NULL)
FROM engagement.dead_letters FINAL
GROUP BY reason
ORDER BY count() DESC, reason
"""
# Any version of the event at all, tombstones included: a later one means a later change.
NEWEST_VERSIONS = """
SELECT event_id, max(source_lsn)
FROM engagement.enriched_engagements
WHERE event_id IN {ids:Array(Int64)}
GROUP BY event_id
"""

# The text of each column exactly as pgoutput delivers it to the stream, whose replication
# session runs with these two settings (lib/change_cursor.py): `::text` is the same output
# function, so equal text means PostgreSQL still holds the image the dead letter carries.
SESSION_LIKE_THE_STREAM = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'"
CURRENT_EVENTS = """
SELECT id::text, content_id::text, user_id::text, event_type, event_ts::text,
       duration_ms::text, device, raw_payload::text
FROM engagement_events WHERE id = ANY(%s::bigint[])
"""
CONTENT_NOW = "SELECT id::text, content_type, length_seconds FROM content"


class ReplayError(RuntimeError):
    """A system failed during a replay; the message says what is safe to do next."""


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One row of `engagement.dead_letters FINAL`; (lsn, reason, raw_change) is its key."""

    lsn: int
    event_id: int | None
    reason: str
    op: str
    raw_change: str
    source_committed_at: datetime
    first_seen_at: datetime
    replayed_at: datetime | None
    revision: int

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> DeadLetter:
        lsn, event_id, reason, op, raw, committed, first_seen, replayed, revision = row
        return cls(
            lsn=int(lsn),
            event_id=None if event_id is None else int(event_id),
            reason=reason,
            op=op,
            raw_change=raw,
            source_committed_at=_utc(committed),
            first_seen_at=_utc(first_seen),
            replayed_at=None if replayed is None else _utc(replayed),
            revision=int(revision),
        )

    @property
    def key(self) -> str:
        """A short stable name of this dead letter (its table key, hashed)."""
        digest = hashlib.sha256(self.raw_change.encode()).hexdigest()[:16]
        return f"{self.lsn}:{self.reason}:{digest}"


@dataclass(frozen=True)
class ReasonCount:
    reason: str
    total: int
    pending: int  # not replayed


@dataclass(frozen=True)
class DeadLetterList:
    letters: tuple[DeadLetter, ...]
    counts: tuple[ReasonCount, ...]
    table_exists: bool


@dataclass(frozen=True)
class ReplayOutcome:
    """What replay decided for one dead letter; `detail` says why (or the reason it still fails)."""

    letter: DeadLetter
    outcome: str  # one of OUTCOMES
    detail: str


@dataclass(frozen=True)
class ReplaySummaryRow:
    reason: str  # the dead letter's original reason
    counts: Mapping[str, int]  # per outcome, every outcome present
    still_failing: Mapping[str, int]  # current reason -> count, for the still invalid


@dataclass(frozen=True)
class ReplayReport:
    outcomes: tuple[ReplayOutcome, ...]
    dry_run: bool
    rows_written: int = 0  # enriched rows inserted into ClickHouse and sent to Kafka
    recovered: int = 0  # marked replayed after an interrupted replay had already delivered them
    table_exists: bool = True

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    def summary(self) -> tuple[ReplaySummaryRow, ...]:
        by_reason: dict[str, list[ReplayOutcome]] = {}
        for outcome in self.outcomes:
            by_reason.setdefault(outcome.letter.reason, []).append(outcome)
        return tuple(
            ReplaySummaryRow(
                reason=reason,
                counts={name: sum(1 for o in items if o.outcome == name) for name in OUTCOMES},
                still_failing=dict(
                    Counter(o.detail for o in items if o.outcome == STILL_INVALID).most_common()
                ),
            )
            for reason, items in sorted(by_reason.items())
        )


# --- rules ------------------------------------------------------------------------------------


def rules_from_env(environ: Mapping[str, str] | None = None) -> EnrichRules:
    """The current validation rules, exactly as the stream builds them (lib/pipeline.py)."""
    if environ is None:
        return enrich_rules(Settings())
    return enrich_rules(Settings(extra_event_types=environ.get(EXTRA_EVENT_TYPES_ENV, "")))


# --- listing ----------------------------------------------------------------------------------


def list_dead_letters(dsn: str, *, reason: str | None = None, limit: int = 50) -> DeadLetterList:
    """The newest `limit` dead letters (by commit LSN), and counts per reason over all of them."""
    with clickhouse_client(dsn) as client:
        if not _table_exists(client):
            return DeadLetterList((), (), table_exists=False)
        rows = client.query(
            LIST_LETTERS, parameters={"reason": reason, "limit": max(limit, 0)}
        ).result_rows
        counts = client.query(REASON_COUNTS).result_rows
    return DeadLetterList(
        letters=tuple(DeadLetter.from_row(row) for row in rows),
        counts=tuple(ReasonCount(r, int(total), int(pending)) for r, total, pending in counts),
        table_exists=True,
    )


def letter_json(letter: DeadLetter) -> str:
    """One JSON line: the row, with raw_change as the JSON object it holds."""
    try:
        raw: Any = json.loads(letter.raw_change)
    except ValueError:
        raw = letter.raw_change
    return json.dumps(
        {
            "lsn": letter.lsn,
            "lsn_text": format_lsn(letter.lsn),
            "event_id": letter.event_id,
            "reason": letter.reason,
            "op": letter.op,
            "source_committed_at": letter.source_committed_at.isoformat(),
            "first_seen_at": letter.first_seen_at.isoformat(),
            "replayed_at": letter.replayed_at.isoformat() if letter.replayed_at else None,
            "revision": letter.revision,
            "raw_change": raw,
        },
        ensure_ascii=False,
    )


# What usually makes a dead letter comes first in its short form; the ids last.
SHORT_CHANGE_ORDER = ("id", "event_type", "event_ts", "duration_ms", "content_id", "raw_payload")


def short_change(raw_change: str, width: int = 80) -> str:
    """The changed row's non-NULL columns as `name=value`, uuids cut to their first block."""
    try:
        change = json.loads(raw_change)
    except ValueError:
        change = None
    if not isinstance(change, dict):
        return _clip(raw_change, width)
    shown = [n for n in change if n != "op" and not n.startswith("old_")]
    first = [n for n in SHORT_CHANGE_ORDER if n in shown]
    parts = [
        f"{name}={_short_value(change[name])}"
        for name in first + [n for n in shown if n not in first]
        if change[name] is not None
    ]
    return _clip(" ".join(parts), width)


def _short_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) == 36 and text.count("-") == 4:
        return text.split("-", 1)[0]
    return _clip(text, 32)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def dead_letters_view(listing: DeadLetterList, *, reason: str | None) -> RenderableType:
    if not listing.table_exists:
        return Text(
            "no dead letters: engagement.dead_letters does not exist yet "
            "(the stream creates it; `engagement stream --until-caught-up`)",
            style="yellow",
        )
    counts = Table(title="dead letters by reason", title_justify="left", box=None)
    counts.add_column("reason")
    counts.add_column("dead letters", justify="right")
    counts.add_column("not replayed", justify="right")
    for count in listing.counts:
        counts.add_row(count.reason, f"{count.total:,}", f"{count.pending:,}")
    counts.add_row(
        Text("total", style="bold"),
        f"{sum(c.total for c in listing.counts):,}",
        f"{sum(c.pending for c in listing.counts):,}",
    )
    if not listing.letters:
        scope = f" with reason {reason!r}" if reason else ""
        return Group(counts, Text(f"no dead letters{scope}", style="green"))
    letters = Table(
        title=f"newest {len(listing.letters)}" + (f" ({reason})" if reason else ""),
        title_justify="left",
        box=None,
        expand=True,
    )
    rows = [
        (
            format_lsn(letter.lsn),
            "" if letter.event_id is None else str(letter.event_id),
            letter.reason,
            letter.op,
            _when(letter.first_seen_at),
            _when(letter.replayed_at),
        )
        for letter in listing.letters
    ]
    names = ("lsn", "event id", "reason", "op", "first seen", "replayed")
    for i, name in enumerate(names):
        # The row's identity keeps its width; only the raw change gives way on a narrow terminal.
        width = max(len(name), *(len(row[i]) for row in rows))
        letters.add_column(name, no_wrap=True, min_width=width)
    letters.add_column("raw change", no_wrap=True, overflow="ellipsis", ratio=1)
    for row, letter in zip(rows, listing.letters, strict=True):
        letters.add_row(*row, Text(short_change(letter.raw_change, width=200)))
    return Group(counts, Text(""), letters)


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at else ""


# --- replay: the decision (pure) ---------------------------------------------------------------


def parse_change(letter: DeadLetter) -> dict[str, str | None] | None:
    """The change a dead letter carries (op and text images), or None when it cannot be replayed.

    raw_change is what lib/enrich.py `_dead_letters` writes: a JSON object of `op` and every
    image column and old_* column as the text the decoder delivered. Truncates (written by the
    stream as {"op": "truncate", "table": ...}) and deletes (dead-lettered only when their id
    does not parse) name no row to replay.
    """
    try:
        change = json.loads(letter.raw_change)
    except ValueError:
        return None
    columns = ("op", *IMAGE_COLUMNS, *OLD_IMAGE_COLUMNS)
    if not isinstance(change, dict) or change.get("op") not in ("insert", "update"):
        return None
    if any(not (value is None or isinstance(value, str)) for value in change.values()):
        return None
    return {name: change.get(name) for name in columns}


def plan_replay(
    letters: Sequence[DeadLetter],
    current: Mapping[int, Mapping[str, str | None]],
    newest_versions: Mapping[int, int],
    content: pl.DataFrame,
    rules: EnrichRules,
) -> tuple[ReplayOutcome, ...]:
    """Decide for each pending dead letter, from data already fetched (no I/O, no clock).

    - not replayable: a truncate, a delete, a raw change that does not parse, no event id;
    - superseded: the event changed after the dead letter, so the stream carries its state:
      a later dead letter of the same event, PostgreSQL no longer holds the image (row `current`
      is missing or its text differs), or ClickHouse holds a later version of the event;
    - still invalid: `enrich` with today's rules and content still dead-letters it (`detail` is
      the reason now);
    - replayed: everything else.
    """
    decided: dict[int, ReplayOutcome] = {}
    changes: dict[int, dict[str, str | None]] = {}
    for i, letter in enumerate(letters):
        change = parse_change(letter)
        if change is None or letter.event_id is None or letter.op not in OPS:
            why = (
                "a truncate is not a row change"
                if letter.op == "truncate"
                else "a delete whose row id does not parse"
                if letter.op == "delete"
                else "its raw change names no row to replay"
            )
            decided[i] = ReplayOutcome(letter, NOT_REPLAYABLE, why)
        else:
            changes[i] = change

    latest: dict[int, int] = {}  # event_id -> index of its latest dead letter
    for i in sorted(changes, key=lambda i: -letters[i].lsn):
        event_id = letters[i].event_id
        assert event_id is not None
        if event_id in latest:
            later = format_lsn(letters[latest[event_id]].lsn)
            decided[i] = ReplayOutcome(
                letters[i],
                SUPERSEDED,
                f"a later change of event {event_id} (LSN {later}) is a dead letter too",
            )
        else:
            latest[event_id] = i

    candidates: list[int] = []
    for event_id, i in latest.items():
        letter, change = letters[i], changes[i]
        row = current.get(event_id)
        newest = newest_versions.get(event_id, 0)
        if row is None:
            decided[i] = ReplayOutcome(
                letter, SUPERSEDED, f"event {event_id} was deleted in PostgreSQL since"
            )
        elif differing := [c for c in IMAGE_COLUMNS if row.get(c) != change[c]]:
            decided[i] = ReplayOutcome(
                letter,
                SUPERSEDED,
                f"event {event_id} changed in PostgreSQL since ({', '.join(differing)})",
            )
        elif newest > letter.lsn:
            decided[i] = ReplayOutcome(
                letter,
                SUPERSEDED,
                f"ClickHouse holds a later version of event {event_id} (LSN {format_lsn(newest)})",
            )
        else:
            candidates.append(i)

    if candidates:
        enriched = enrich(
            changes_frame([(letters[i], changes[i]) for i in candidates]), content, rules
        )
        failing = dict(
            zip(
                enriched.dead_letters["event_id"].to_list(),
                enriched.dead_letters["reason"].to_list(),
                strict=True,
            )
        )
        for i in candidates:
            letter = letters[i]
            reason_now = failing.get(letter.event_id)
            if reason_now is None:
                decided[i] = ReplayOutcome(letter, REPLAYED, "valid under today's rules")
            else:
                decided[i] = ReplayOutcome(letter, STILL_INVALID, reason_now)
    return tuple(decided[i] for i in range(len(letters)))


def changes_frame(letters: Iterable[tuple[DeadLetter, Mapping[str, str | None]]]) -> pl.DataFrame:
    """A CHANGES_SCHEMA frame of dead letters' changes, at their original commit LSN and time."""
    records = [
        {
            **change,
            "seq": seq,
            "source_lsn": letter.lsn,
            "source_committed_at": letter.source_committed_at,
        }
        for seq, (letter, change) in enumerate(letters)
    ]
    return pl.DataFrame(records, schema=CHANGES_SCHEMA)


def replay_rows(
    letters: Sequence[DeadLetter], content: pl.DataFrame, rules: EnrichRules
) -> pl.DataFrame:
    """The enriched_engagements rows of dead letters judged replayable, versioned by their LSN."""
    pairs = [(letter, change) for letter in letters if (change := parse_change(letter))]
    return enrich(changes_frame(pairs), content, rules).rows


# --- replay: reading and writing --------------------------------------------------------------


def replay_transactional_id(settings: Settings) -> str:
    """One replay producer per slot, distinct from the stream's (`engagement-stream-{slot}`)."""
    return f"engagement-dlq-replay-{settings.slot}"


def replay_dead_letters(
    settings: Settings,
    *,
    rules: EnrichRules | None = None,
    reason: str | None = None,
    dry_run: bool = False,
    chunk_size: int = REPLAY_CHUNK,
) -> ReplayReport:
    """Re-validate the dead letters not yet replayed with today's rules, and deliver the valid.

    What is written, per chunk of dead letters, in this order (so a crash anywhere repeats
    harmless work and never loses or duplicates a delivery):

    1. ClickHouse `engagement.enriched_engagements`: the enriched rows, versioned by the dead
       letter's own commit LSN (the ReplacingMergeTree version), so a re-insert collapses and a
       later change of the event always wins over the replayed one.
    2. Kafka `engagement.enriched.v1` (with the topic prefix), in one transaction of the producer
       `engagement-dlq-replay-{slot}` (it fences an older replay still running) together with a
       record in `engagement._checkpoints` naming the dead letters delivered. Messages are the
       stream's (same key and JSON), plus a header `engagement-source: dlq-replay`.
    3. `engagement.dead_letters`: a new revision of each row with replayed_at = now.

    A replay interrupted between 2 and 3 is completed by the next one from that record, without
    sending again. Redis is not touched: a dead letter is in practice older than the live
    10-minute window, and the closed windows are rewritten from ClickHouse by the rollups.
    Every event is checked against PostgreSQL and ClickHouse once, before anything is written; a
    change committed after that check is carried by the stream at a later LSN, which wins in
    ClickHouse, while Kafka consumers keep the highest source_lsn per event_id (as they must for
    the stream's own messages, which may interleave with a replay's on one partition).

    `dry_run` reads and judges, and writes nothing anywhere.
    """
    try:
        return _replay(settings, rules or rules_from_env(), reason, dry_run, chunk_size)
    except (KafkaError, ClickHouseError, ClickHouseLockTimeout, psycopg2.Error) as exc:
        raise ReplayError(
            f"dlq replay stopped: {type(exc).__name__}: {exc}. Every dead letter delivered so "
            "far is marked replayed, or will be by the next replay; nothing is delivered twice. "
            "Run it again once `engagement services status` is healthy."
        ) from exc


def _replay(
    settings: Settings, rules: EnrichRules, reason: str | None, dry_run: bool, chunk_size: int
) -> ReplayReport:
    dsn = settings.clickhouse_dsn
    with clickhouse_client(dsn) as client:
        if not _table_exists(client):
            return ReplayReport((), dry_run, table_exists=False)
    kafka = None
    if not dry_run:
        kafka = KafkaSink(
            kafka_client_config(settings),
            transactional_id=replay_transactional_id(settings),
            topic_prefix=settings.kafka_topic_prefix,
        )
    try:
        recovered = 0
        if kafka is not None:
            kafka.setup()
            recovered = _complete_interrupted(dsn, kafka)
        letters = _pending(dsn, reason)
        ids = sorted({letter.event_id for letter in letters if letter.event_id is not None})
        content = _content_now(settings.pg_dsn)
        outcomes = plan_replay(
            letters,
            _current_events(settings.pg_dsn, ids),
            _newest_versions(dsn, ids),
            content,
            rules,
        )
        rows_written = 0
        if kafka is not None:
            todo = [o.letter for o in outcomes if o.outcome == REPLAYED]
            for chunk in _chunks(todo, chunk_size):
                rows = replay_rows(chunk, content, rules)
                _deliver(dsn, kafka, chunk, rows)
                rows_written += rows.height
        return ReplayReport(outcomes, dry_run, rows_written=rows_written, recovered=recovered)
    finally:
        if kafka is not None:
            kafka.close()


def _pending(dsn: str, reason: str | None) -> list[DeadLetter]:
    with clickhouse_client(dsn) as client:
        rows = client.query(PENDING_LETTERS, parameters={"reason": reason}).result_rows
    return [DeadLetter.from_row(row) for row in rows]


def _current_events(pg_dsn: str, ids: Sequence[int]) -> dict[int, dict[str, str | None]]:
    if not ids:
        return {}
    with connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(SESSION_LIKE_THE_STREAM)
        cur.execute(CURRENT_EVENTS, (list(ids),))
        rows = cur.fetchall()
    return {int(row[0]): dict(zip(IMAGE_COLUMNS, row, strict=True)) for row in rows}


def _newest_versions(dsn: str, ids: Sequence[int]) -> dict[int, int]:
    if not ids:
        return {}
    with clickhouse_client(dsn) as client:
        rows = client.query(NEWEST_VERSIONS, parameters={"ids": list(ids)}).result_rows
    return {int(event_id): int(lsn) for event_id, lsn in rows}


def _content_now(pg_dsn: str) -> pl.DataFrame:
    """Content as it is now, valid since before any dead letter (valid_from_lsn 0)."""
    with connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(CONTENT_NOW)
        rows = cur.fetchall()
    return content_versions([ContentVersion(str(i), t, n, 0) for i, t, n in rows])


def _chunks(items: Sequence[DeadLetter], size: int) -> Iterator[Sequence[DeadLetter]]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + max(size, 1)]


def _deliver(dsn: str, kafka: KafkaSink, letters: Sequence[DeadLetter], rows: pl.DataFrame) -> None:
    """Steps 1-3 of `replay_dead_letters` for one chunk."""
    if rows.height:
        with clickhouse_client(dsn) as client:
            client.insert_arrow("engagement.enriched_engagements", insertable(rows).to_arrow())
    producer = kafka.producer
    producer.begin_transaction()
    try:
        keys, values = row_messages(rows)
        for key, value in zip(keys, values, strict=True):
            producer.send(kafka.topics.enriched, key=key, value=value, headers=[REPLAY_HEADER])
        producer.send(
            kafka.topics.checkpoint,
            key=checkpoint_key(kafka.transactional_id),
            value=json.dumps({"replayed": [letter.key for letter in letters]}).encode(),
        )
        producer.commit_transaction()
    except Exception:
        try:
            producer.abort_transaction()
        finally:
            kafka.close()  # a producer that failed mid-transaction is not reused
        raise
    _mark_replayed(dsn, letters)


def _mark_replayed(dsn: str, letters: Sequence[DeadLetter]) -> None:
    """A new revision of each row, replayed now; the table keeps the highest revision."""
    if not letters:
        return
    now = datetime.now(UTC)
    frame = pl.DataFrame(
        {
            "lsn": [letter.lsn for letter in letters],
            "event_id": [letter.event_id for letter in letters],
            "reason": [letter.reason for letter in letters],
            "op": [letter.op for letter in letters],
            "raw_change": [letter.raw_change for letter in letters],
            "source_committed_at": [letter.source_committed_at for letter in letters],
            "first_seen_at": [letter.first_seen_at for letter in letters],
            "replayed_at": [now for _ in letters],
            "revision": [letter.revision + 1 for letter in letters],
        },
        schema={
            "lsn": pl.UInt64,
            "event_id": pl.Int64,
            "reason": pl.String,
            "op": pl.String,
            "raw_change": pl.String,
            "source_committed_at": pl.Datetime("us", "UTC"),
            "first_seen_at": pl.Datetime("ms", "UTC"),
            "replayed_at": pl.Datetime("ms", "UTC"),
            "revision": pl.UInt32,
        },
    )
    with clickhouse_client(dsn) as client:
        client.insert_arrow("engagement.dead_letters", frame.to_arrow())


def _complete_interrupted(dsn: str, kafka: KafkaSink) -> int:
    """Mark replayed what the last committed replay transaction delivered but did not mark."""
    delivered = _last_delivered(kafka)
    if not delivered:
        return 0
    unmarked = [letter for letter in _pending(dsn, None) if letter.key in delivered]
    _mark_replayed(dsn, unmarked)
    return len(unmarked)


def _last_delivered(kafka: KafkaSink) -> set[str]:
    """The dead letters named by this producer's last committed record in the checkpoint topic."""
    record = kafka.last_checkpoint_record()
    return set(json.loads(record).get("replayed", [])) if record else set()


# --- how a replay reads -----------------------------------------------------------------------


def replay_view(report: ReplayReport) -> RenderableType:
    if not report.table_exists:
        return Text("nothing to replay: engagement.dead_letters does not exist yet", style="yellow")
    title = "dlq replay" + (" (dry run: nothing written)" if report.dry_run else "")
    table = Table(title=title, title_justify="left", box=None)
    table.add_column("reason")
    for name in OUTCOMES:
        table.add_column(name, justify="right")
    table.add_column("still failing as", overflow="fold")
    for row in report.summary():
        table.add_row(
            row.reason,
            *(f"{row.counts[name]:,}" for name in OUTCOMES),
            ", ".join(f"{reason} {n:,}" for reason, n in row.still_failing.items()),
        )
    table.add_row(
        Text("total", style="bold"), *(f"{report.count(name):,}" for name in OUTCOMES), ""
    )
    lines: list[RenderableType] = [table]
    superseded = [o for o in report.outcomes if o.outcome == SUPERSEDED]
    for outcome in superseded[:10]:
        lines.append(
            Text(f"superseded LSN {format_lsn(outcome.letter.lsn)}: {outcome.detail}", style="dim")
        )
    if len(superseded) > 10:
        lines.append(Text(f"... and {len(superseded) - 10:,} more superseded", style="dim"))
    if not report.outcomes:
        lines.append(Text("no dead letters waiting for a replay", style="green"))
    elif report.dry_run:
        lines.append(Text(f"would replay {report.count(REPLAYED):,} dead letters"))
    else:
        lines.append(
            Text(
                f"replayed {report.count(REPLAYED):,} dead letters: {report.rows_written:,} rows "
                "into ClickHouse and Kafka"
            )
        )
    if report.recovered:
        lines.append(
            Text(
                f"completed an interrupted replay: {report.recovered:,} dead letters already "
                "delivered are now marked replayed",
                style="yellow",
            )
        )
    return Group(*lines)


def _table_exists(client: Client) -> bool:
    rows = client.query(TABLE_EXISTS).result_rows
    return bool(rows and rows[0][0])


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
