"""Schema evolution of the source tables without a server: which relation versions the stream
reads (lib/event_schema.py), and what the stream makes of a batch that spans an ALTER TABLE."""

from __future__ import annotations

import json
import logging
import uuid

import polars as pl
import pytest

from engagement_dagster.lib.enrich import (
    IMAGE_COLUMNS,
    REASON_SCHEMA_MISMATCH,
    ContentVersion,
    content_versions,
    enrich,
)
from engagement_dagster.lib.event_schema import (
    CONTENT_COLUMN_TYPES,
    DATE,
    EVENT_COLUMN_TYPES,
    INT8,
    JSON,
    NUMERIC,
    TEXT,
    TIMESTAMP,
    content_mismatch,
    event_shape,
)
from engagement_dagster.lib.pgoutput import UNCHANGED_TOAST, Transaction, TransactionAssembler
from engagement_dagster.lib.stream import Stream, _stream_letters
from tests.unit.test_pgoutput import (
    EVENT_COLUMNS,
    EVENT_NAMES,
    EVENT_TYPES,
    EVENTS_OID,
    FINAL_LSN,
    begin,
    commit,
    delete,
    insert,
    relation,
    truncate,
    update,
)

CONTENT = "6f1c2a9e-1b7d-4c55-9a0e-3d2b8f4e5a61"
USER = "3a9d7c15-e2b4-4f6a-8c1d-5e7f9a0b2c4d"


def row(event_id: int, duration: str | None = "30000") -> tuple[str | None, ...]:
    return (str(event_id), CONTENT, USER, "play", "2024-05-01 12:00:00+00", duration, "ios", "{}")


def retyped(name: str, type_oid: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    types = tuple(
        type_oid if n == name else t for n, t in zip(EVENT_NAMES, EVENT_TYPES, strict=True)
    )
    return EVENT_NAMES, types


def test_the_policy_covers_exactly_the_columns_enrichment_reads() -> None:
    assert tuple(EVENT_COLUMN_TYPES) == IMAGE_COLUMNS
    assert tuple(t[0] for t in EVENT_COLUMN_TYPES.values()) == EVENT_TYPES  # db init's first
    assert set(CONTENT_COLUMN_TYPES) == {"id", "content_type", "length_seconds"}


def test_the_table_db_init_creates_is_read_as_is() -> None:
    shape = event_shape(EVENT_NAMES, EVENT_TYPES)
    assert shape == event_shape(EVENT_NAMES, ())  # types unknown: by name only
    assert (shape.positions, shape.ignored, shape.mismatch) == (tuple(range(8)), (), None)


def test_added_columns_are_ignored_wherever_they_sit() -> None:
    columns = ("country", *reversed(EVENT_NAMES), "score")
    shape = event_shape(columns, (TEXT, *reversed(EVENT_TYPES), NUMERIC))
    assert shape.mismatch is None
    assert shape.ignored == ("country (text)", "score (numeric)")
    assert [columns[p] for p in shape.positions] == list(EVENT_NAMES)


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_a_dropped_column_the_rows_need_is_a_mismatch_that_names_the_fix(name: str) -> None:
    kept = [(n, t) for n, t in zip(EVENT_NAMES, EVENT_TYPES, strict=True) if n != name]
    shape = event_shape(tuple(n for n, _ in kept), tuple(t for _, t in kept))
    declared = {
        "id": "bigint",
        "content_id": "uuid",
        "user_id": "uuid",
        "event_ts": "timestamp with time zone",
        "duration_ms": "integer",
        "raw_payload": "jsonb",
    }
    assert shape.mismatch == (
        f"engagement_events has no column {name} (dropped or renamed): restore it with "
        f"ALTER TABLE engagement_events ADD COLUMN {name} {declared.get(name, 'text')}"
    )


@pytest.mark.parametrize(
    ("name", "type_oid"),
    [
        ("duration_ms", INT8),  # every integer it holds still parses; past 2^31-1: per row
        ("duration_ms", 21),
        ("id", 23),
        ("content_id", TEXT),  # checked per row against the uuid form
        ("user_id", 1043),
        ("event_type", 1043),
        ("raw_payload", JSON),
    ],
)
def test_a_type_whose_text_still_parses_exactly_is_handled(name: str, type_oid: int) -> None:
    assert event_shape(*retyped(name, type_oid)).mismatch is None


@pytest.mark.parametrize(
    ("name", "type_oid", "named"),
    [
        ("duration_ms", TEXT, "text"),
        ("duration_ms", NUMERIC, "numeric"),
        ("duration_ms", 701, "double precision"),
        ("event_ts", DATE, "date"),
        ("event_ts", TIMESTAMP, "timestamp without time zone"),
        ("event_ts", TEXT, "text"),
        ("raw_payload", TEXT, "text"),
        ("content_id", 1042, "character"),
        ("event_type", 16_384, "type oid 16384"),  # an enum or a domain
    ],
)
def test_a_type_the_stream_cannot_read_exactly_is_a_mismatch(
    name: str, type_oid: int, named: str
) -> None:
    mismatch = event_shape(*retyped(name, type_oid)).mismatch
    assert mismatch is not None
    assert mismatch.startswith(f"engagement_events.{name} is {named}, which the stream cannot")
    assert f"ALTER TABLE engagement_events ALTER COLUMN {name} TYPE" in mismatch


def test_every_problem_of_a_version_is_named() -> None:
    names, types = retyped("event_ts", DATE)
    kept = [(n, t) for n, t in zip(names, types, strict=True) if n != "device"]
    shape = event_shape(tuple(n for n, _ in kept), tuple(t for _, t in kept))
    assert shape.mismatch is not None
    assert "event_ts is date" in shape.mismatch and "no column device" in shape.mismatch


def test_content_columns_are_checked_too() -> None:
    assert content_mismatch(("id", "slug", "content_type", "length_seconds"), ()) is None
    assert content_mismatch(("id", "content_type"), ()) == (
        "content has no column length_seconds (dropped or renamed): restore it with "
        "ALTER TABLE content ADD COLUMN length_seconds integer"
    )
    assert "content.length_seconds is numeric" in str(
        content_mismatch(("id", "content_type", "length_seconds"), (2950, TEXT, NUMERIC))
    )


# --- the stream on a batch that spans ALTER TABLE ------------------------------------------------


def assembled(*payloads: bytes) -> list[Transaction]:
    assembler = TransactionAssembler()
    return [t for p in payloads if (t := assembler.feed(p)) is not None]


def frames(transactions: list[Transaction]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The stream's own decoding of a batch, then enrichment, as `Stream._process` does."""
    stream = Stream(dsn="postgresql://unused", slot="unused", publication="unused", sinks=[])
    changes, _, letters = stream._frames(transactions)
    batch = enrich(changes, content_versions([ContentVersion(CONTENT, "podcast", 600)]))
    return batch.rows, pl.concat([batch.dead_letters, _stream_letters(letters)])


def test_one_batch_across_add_column_drop_and_restore(caplog: pytest.LogCaptureFixture) -> None:
    """Old images of both shapes in one batch: an ADD COLUMN inside a transaction, updates and
    deletes of rows written before it; then a DROP of duration_ms (every change a dead letter
    that keeps its columns), and the column restored (read again)."""
    added = f"col_{uuid.uuid4().hex[:8]}"  # a version this process has not logged yet
    wider = [*EVENT_COLUMNS, (1, added, TEXT)]
    dropped = [c for c in wider if c[1] != "duration_ms"]
    restored = [*dropped, (1, "duration_ms", 23)]

    def tail(values: tuple[str | None, ...], extra: str | None) -> tuple[str | None, ...]:
        return (*values, extra)

    lsn = [FINAL_LSN + i * 0x100 for i in range(4)]
    without_duration = (*row(3)[:5], "ios", "{}", "DE")  # row 3 after the DROP
    caplog.set_level(logging.WARNING, logger="engagement.stream")
    transactions = assembled(
        begin(lsn[0]),
        relation(EVENTS_OID, "engagement_events", EVENT_COLUMNS),
        insert(EVENTS_OID, *row(1)),
        insert(EVENTS_OID, *row(2)),
        relation(EVENTS_OID, "engagement_events", wider),  # ALTER TABLE in this transaction
        update(EVENTS_OID, tail(row(1, "31000"), "FR"), tail(row(1), None), b"O"),
        commit(lsn[0], lsn[0] + 0x30),
        begin(lsn[1]),
        delete(EVENTS_OID, tail(row(2), None)),
        insert(EVENTS_OID, *tail(row(3), "DE")),
        commit(lsn[1], lsn[1] + 0x30),
        begin(lsn[2]),
        relation(EVENTS_OID, "engagement_events", dropped),
        insert(EVENTS_OID, *row(4)[:5], "ios", "{}", "IT"),
        update(EVENTS_OID, without_duration, without_duration, b"O"),
        delete(EVENTS_OID, (*row(1)[:5], "ios", "{}", "FR")),
        truncate((EVENTS_OID,)),
        commit(lsn[2], lsn[2] + 0x30),
        begin(lsn[3]),
        relation(EVENTS_OID, "engagement_events", restored),
        insert(EVENTS_OID, *(*row(5)[:5], "ios", "{}", None, "7000")),
        commit(lsn[3], lsn[3] + 0x30),
    )  # fmt: skip
    rows, letters = frames(transactions)

    # The insert of event 1 and its update share an LSN: only the last is a row.
    live = rows.filter(pl.col("is_deleted") == 0)
    assert live.select("event_id", "duration_ms", "source_lsn").rows() == [
        (2, 30000, lsn[0]),
        (1, 31000, lsn[0]),
        (3, 30000, lsn[1]),
        (5, 7000, lsn[3]),
    ]
    tombstones = rows.filter(pl.col("is_deleted") == 1)
    assert tombstones.select("event_id", "op", "source_lsn").rows() == [(2, "delete", lsn[1])]
    assert set(rows.columns).isdisjoint({added, "country"})

    assert letters.select("source_lsn", "event_id", "reason", "op").rows() == [
        (lsn[2], 4, REASON_SCHEMA_MISMATCH, "insert"),
        (lsn[2], 3, REASON_SCHEMA_MISMATCH, "update"),
        (lsn[2], 1, REASON_SCHEMA_MISMATCH, "delete"),
        (lsn[2], None, "truncate", "truncate"),
    ]
    update_raw = json.loads(letters["raw_change"][1])
    assert list(update_raw) == ["op", *(c[1] for c in dropped), *(f"old_{c[1]}" for c in dropped)]
    assert update_raw["op"] == "update" and update_raw[added] == "DE"
    assert update_raw["id"] == update_raw["old_id"] == "3" and "duration_ms" not in update_raw
    insert_raw = json.loads(letters["raw_change"][0])
    assert insert_raw["id"] == "4" and insert_raw["old_id"] is None
    delete_raw = json.loads(letters["raw_change"][2])
    assert delete_raw["id"] == delete_raw["old_id"] == "1"

    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == ["WARNING", "ERROR", "WARNING"]
    assert said[0][1].startswith(
        f"engagement_events has columns the enriched contract does not carry: {added} (text)."
    )
    assert said[1][1].startswith(
        "schema mismatch: engagement_events has no column duration_ms (dropped or renamed): "
        "restore it with ALTER TABLE engagement_events ADD COLUMN duration_ms integer. Until it "
        "is fixed every change of engagement_events is a dead letter (reason schema_mismatch)"
    )
    caplog.clear()
    frames(transactions)  # the same versions again (a replay, a reconnect): said once only
    assert caplog.records == []


def test_an_unresolved_toast_marker_stops_the_batch_with_the_fix() -> None:
    """An update whose unchanged TOASTed value the old row cannot give (a key-only old row:
    REPLICA IDENTITY DEFAULT) cannot be enriched: the batch fails naming the fix."""
    toasted = (*row(1)[:7], UNCHANGED_TOAST)  # raw_payload not resent
    stream = Stream(dsn="postgresql://unused", slot="unused", publication="unused", sinks=[])
    transactions = assembled(
        begin(),
        relation(EVENTS_OID, "engagement_events", EVENT_COLUMNS),
        insert(EVENTS_OID, *row(2)),
        update(EVENTS_OID, toasted, (row(1)[0], *[None] * 7), b"K"),
        commit(),
    )
    with pytest.raises(ValueError, match="needs REPLICA IDENTITY FULL"):
        stream._frames(transactions)


def test_content_that_lost_a_column_leaves_its_fields_null(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Content is reference data: its events stay valid with NULL content fields (as for unknown
    content), a content change without an id is skipped, and the error is said once."""
    content_oid, renamed = 16_390, f"kind_{uuid.uuid4().hex[:8]}"
    columns = [(1, "id", 2950), (0, renamed, TEXT), (0, "length_seconds", 23)]
    no_id = [(1, "ref", 2950), (0, "content_type", TEXT), (0, "length_seconds", 23)]
    caplog.set_level(logging.WARNING, logger="engagement.stream")
    transactions = assembled(
        begin(),
        relation(content_oid, "content", columns, b"d"),
        insert(content_oid, CONTENT, "video", "300"),
        relation(EVENTS_OID, "engagement_events", EVENT_COLUMNS),
        insert(EVENTS_OID, *row(1)),
        relation(content_oid, "content", no_id, b"d"),
        insert(content_oid, "0b9f0b1e-0000-4000-8000-000000000002", "video", "10"),
        commit(),
    )
    stream = Stream(dsn="postgresql://unused", slot="unused", publication="unused", sinks=[])
    changes, versions, letters = stream._frames(transactions)
    assert [(v.content_id, v.content_type, v.length_seconds) for v in versions] == [
        (CONTENT, None, 300)
    ]
    assert changes.height == 1 and letters == []
    batch = enrich(changes, content_versions([], versions))
    assert batch.rows.select("content_type", "length_seconds", "engagement_pct").rows() == [
        (None, 300, 10.0)
    ]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert said[0].startswith("schema mismatch: content has no column content_type")
    assert said[1].startswith("schema mismatch: content has no column id")
