"""What the stream needs of the source tables' columns, and what it does when a table changes.

Decided from a Relation message alone (column names and type oids): a column the contract does
not know is ignored; a needed column that is missing, or retyped to a type whose text the stream
cannot read exactly, makes every event change of that relation version a `schema_mismatch` dead
letter. It never guesses a value and never does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from engagement_dagster.lib.enrich import IMAGE_COLUMNS

# Built-in pg_type oids: fixed in PostgreSQL's catalog, the same on every server and version.
BOOL, INT8, INT2, INT4, TEXT, JSON = 16, 20, 21, 23, 25, 114
FLOAT4, FLOAT8, BPCHAR, VARCHAR, DATE, TIME = 700, 701, 1042, 1043, 1082, 1083
TIMESTAMP, TIMESTAMPTZ, NUMERIC, UUID, JSONB = 1114, 1184, 1700, 2950, 3802
TYPE_NAMES: Final[Mapping[int, str]] = {
    BOOL: "boolean",
    INT8: "bigint",
    INT2: "smallint",
    INT4: "integer",
    TEXT: "text",
    JSON: "json",
    FLOAT4: "real",
    FLOAT8: "double precision",
    BPCHAR: "character",
    VARCHAR: "character varying",
    DATE: "date",
    TIME: "time",
    TIMESTAMP: "timestamp without time zone",
    TIMESTAMPTZ: "timestamp with time zone",
    NUMERIC: "numeric",
    UUID: "uuid",
    JSONB: "jsonb",
}

# engagement_events: for each column the enrichment reads, the types whose text output it parses
# exactly (lib/enrich.py `_parse`), the one `engagement db init` creates first. Anything else is
# a schema mismatch, even where most values would still parse: a bigint id holds every integer
# type's values, but a date or a timestamp without time zone is not an instant, numeric and
# real are not whole milliseconds, text guarantees nothing. Values a wider accepted type can
# hold and the contract cannot (a bigint duration_ms past 2^31 - 1) are per-row dead letters
# (`undecodable_payload`), as they are for any other text that does not parse.
EVENT_COLUMN_TYPES: Final[Mapping[str, tuple[int, ...]]] = {
    "id": (INT8, INT4, INT2),
    "content_id": (UUID, TEXT, VARCHAR),  # text ids are checked per row against the uuid form
    "user_id": (UUID, TEXT, VARCHAR),
    "event_type": (TEXT, VARCHAR),
    "event_ts": (TIMESTAMPTZ,),
    "duration_ms": (INT4, INT2, INT8),
    "device": (TEXT, VARCHAR),
    "raw_payload": (JSONB, JSON),  # json text that is not an object is a per-row dead letter
}
# content, as the stream's content cache reads it (lib/enrich.py `content_versions_from_change`).
CONTENT_COLUMN_TYPES: Final[Mapping[str, tuple[int, ...]]] = {
    "id": (UUID, TEXT, VARCHAR),
    "content_type": (TEXT, VARCHAR),
    "length_seconds": (INT4, INT2),
}


def type_name(oid: int) -> str:
    return TYPE_NAMES.get(oid, f"type oid {oid}")


@dataclass(frozen=True)
class EventShape:
    """How the stream reads one version of engagement_events (one Relation message)."""

    positions: tuple[int, ...]  # where each IMAGE_COLUMNS column sits in the relation; -1: absent
    ignored: tuple[str, ...]  # columns the enriched contract does not carry, as "name (type)"
    mismatch: str | None  # why every change of this version is a dead letter; None: readable


def event_shape(
    columns: tuple[str, ...], column_types: tuple[int, ...], table: str = "engagement_events"
) -> EventShape:
    """Read `columns` (and their type oids; () when unknown: names only) against the contract."""
    index = {name: i for i, name in enumerate(columns)}
    positions = tuple(index.get(name, -1) for name in IMAGE_COLUMNS)
    ignored = tuple(
        f"{name} ({type_name(column_types[i])})" if column_types else name
        for i, name in enumerate(columns)
        if name not in EVENT_COLUMN_TYPES
    )
    problems = _problems(table, columns, column_types, EVENT_COLUMN_TYPES)
    return EventShape(positions, ignored, "; ".join(problems) or None)


def content_mismatch(columns: tuple[str, ...], column_types: tuple[int, ...]) -> str | None:
    """Why the content cache cannot read this version of `content` (its fields become NULL)."""
    return "; ".join(_problems("content", columns, column_types, CONTENT_COLUMN_TYPES)) or None


def _problems(
    table: str,
    columns: tuple[str, ...],
    column_types: tuple[int, ...],
    wanted: Mapping[str, tuple[int, ...]],
) -> list[str]:
    problems = []
    for name, accepted in wanted.items():
        if name not in columns:
            problems.append(
                f"{table} has no column {name} (dropped or renamed): restore it with "
                f"ALTER TABLE {table} ADD COLUMN {name} {type_name(accepted[0])}"
            )
        elif column_types and column_types[columns.index(name)] not in accepted:
            got = type_name(column_types[columns.index(name)])
            problems.append(
                f"{table}.{name} is {got}, which the stream cannot read exactly as "
                f"{type_name(accepted[0])} (accepted: "
                + ", ".join(type_name(oid) for oid in accepted)
                + f"): ALTER TABLE {table} ALTER COLUMN {name} TYPE {type_name(accepted[0])} "
                f"USING {name}::{type_name(accepted[0])}"
            )
    return problems
