"""Enrichment and validation of a batch (DESIGN §5), checked on in-memory frames, no services."""

from __future__ import annotations

import io
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    CONTENT_VERSIONS_SCHEMA,
    DEAD_LETTER_REASONS,
    DEAD_LETTERS_SCHEMA,
    DELTAS_SCHEMA,
    ENRICHED_ROWS_SCHEMA,
    IMAGE_COLUMNS,
    OLD_IMAGE_COLUMNS,
    REASON_FUTURE_EVENT_TS,
    REASON_NEGATIVE_DURATION,
    REASON_NULL_CONTENT_ID,
    REASON_NULL_EVENT_TS,
    REASON_UNDECODABLE_PAYLOAD,
    REASON_UNKNOWN_EVENT_TYPE,
    ContentVersion,
    EnrichedBatch,
    EnrichInputError,
    EnrichRules,
    content_versions,
    content_versions_from_change,
    empty_changes,
    enrich,
    fold_content_versions,
    with_engagement,
)

COMMITTED = datetime(2026, 11, 24, 21, 0, 5, 123456, tzinfo=UTC)
PODCAST = "0b9f0b1e-0000-4000-8000-000000000001"
VIDEO = "0b9f0b1e-0000-4000-8000-000000000002"
UNKNOWN = "0b9f0b1e-0000-4000-8000-0000000000ff"
USER = "5a5a5a5a-0000-4000-8000-000000000001"

Image = dict[str, str | None]


def image(**fields: str | None) -> Image:
    """A valid NEW image as pgoutput's text, with fields overridden."""
    base: Image = {
        "id": "1",
        "content_id": PODCAST,
        "user_id": USER,
        "event_type": "play",
        "event_ts": "2026-11-24 21:00:00.5+00",
        "duration_ms": "30000",
        "device": "ios",
        "raw_payload": '{"source": "app"}',
    }
    return base | fields


def change(
    seq: int,
    op: str,
    new: Image | None = None,
    old: Image | None = None,
    lsn: int = 100,
    committed: datetime = COMMITTED,
) -> dict[str, object]:
    """One change row as the decoder hands it over (a delete's image is its OLD image)."""
    shown = old if op == "delete" else new
    assert shown is not None
    row: dict[str, object] = {
        "seq": seq,
        "op": op,
        "source_lsn": lsn,
        "source_committed_at": committed,
    }
    row |= {name: shown.get(name) for name in IMAGE_COLUMNS}
    row |= {f"old_{name}": (old or {}).get(name) for name in IMAGE_COLUMNS}
    return row


def batch(*changes: dict[str, object]) -> pl.DataFrame:
    return pl.DataFrame(list(changes), schema=CHANGES_SCHEMA, orient="row")


CATALOG = content_versions(
    [ContentVersion(PODCAST, "podcast", 600), ContentVersion(VIDEO, "video", 300)]
)


def run(
    changes: pl.DataFrame, content: pl.DataFrame = CATALOG, rules: EnrichRules | None = None
) -> EnrichedBatch:
    result = enrich(changes, content, rules)
    assert result.rows.schema == ENRICHED_ROWS_SCHEMA
    assert result.deltas.schema == DELTAS_SCHEMA
    assert result.dead_letters.schema == DEAD_LETTERS_SCHEMA
    return result


# --- the formula ------------------------------------------------------------------------------

# (case, duration_ms, length_seconds, engagement_pct). The pct values of the rounding cases are
# what ClickHouse 26.9 (chDB) returns for round(100 * (duration_ms / 1000.0) / length_seconds, 2).
FormulaCase = tuple[str, int | None, int | None, float | None]
FORMULA_TABLE: list[FormulaCase] = [
    ("null-duration", None, 600, None),
    ("null-length", 30_000, None, None),
    ("zero-length", 30_000, 0, None),
    ("negative-length", 30_000, -5, None),
    ("zero-duration", 0, 600, 0.0),
    ("over-100-not-clamped", 600_000, 300, 200.0),
    ("repeating", 2_000, 3, 66.67),
    ("tiny", 1, 3, 0.03),
    ("tie-0.125-to-even-down", 1_250, 1_000, 0.12),
    ("tie-0.375-to-even-up", 3_750, 1_000, 0.38),
    ("tie-1.125-to-even-down", 1_125, 100, 1.12),
    ("tie-512.875-to-even-up", 1_025_750, 200, 512.88),
    ("12.345-is-below-the-tie-in-binary", 12_345, 100, 12.34),
    ("2.675-ties-to-even-after-scaling", 2_675, 100, 2.68),
    ("4519.415-not-decimal-rounding", 4_519_415, 100, 4519.42),
    ("exact-division-not-reciprocal", 163_170, 600, 27.19),
    ("exact-division-not-reciprocal-2", 2_245_595, 100, 2245.59),
]
FORMULA_CASES = [pytest.param(*case[1:], id=case[0]) for case in FORMULA_TABLE]


@pytest.mark.parametrize(("duration_ms", "length_seconds", "pct"), FORMULA_CASES)
def test_formula_single_row(
    duration_ms: int | None, length_seconds: int | None, pct: float | None
) -> None:
    frame = pl.DataFrame(
        {"duration_ms": [duration_ms], "length_seconds": [length_seconds]},
        schema={"duration_ms": pl.Int32, "length_seconds": pl.Int32},
    )
    out = with_engagement(frame).row(0, named=True)
    assert out["engagement_seconds"] == (None if duration_ms is None else duration_ms / 1000)
    assert out["engagement_pct"] == pct


def test_formula_table_through_enrich_in_one_batch() -> None:
    """The same cases as one batch: results must not depend on the batch's size."""
    cases = [case[1:] for case in FORMULA_TABLE]
    contents = [str(uuid.UUID(int=i + 1)) for i in range(len(cases))]
    catalog = content_versions(
        ContentVersion(cid, "video", length)
        for cid, (_, length, _) in zip(contents, cases, strict=True)
    )
    changes = batch(
        *(
            change(
                i,
                "insert",
                image(
                    id=str(i + 1),
                    content_id=cid,
                    duration_ms=None if duration is None else str(duration),
                ),
            )
            for i, (cid, (duration, _, _)) in enumerate(zip(contents, cases, strict=True))
        )
    )
    rows = run(changes, catalog).rows
    assert rows["engagement_pct"].to_list() == [pct for _, _, pct in cases]
    assert rows["engagement_seconds"].to_list() == [
        None if duration is None else duration / 1000 for duration, _, _ in cases
    ]
    assert rows["length_seconds"].to_list() == [length for _, length, _ in cases]


def test_formula_matches_ieee_division_and_clickhouse_rounding_on_many_values() -> None:
    """seconds = IEEE duration/1000; pct = rint(x * 100) / 100 ties to even, as ClickHouse.

    Python's float division is IEEE; round(float) ties to even on the binary value, so
    round(x * 100) / 100 models ClickHouse's round(x, 2) on Float64 exactly.
    """
    rng = random.Random(20261124)
    durations = [rng.randint(-10_000_000, 10_000_000) for _ in range(100_000)]
    durations += list(range(-5_000, 5_000))  # every residue mod 1000, both signs
    lengths = [
        rng.choice([1, 3, 7, 60, 100, 300, 600, 1800, rng.randint(1, 50_000)]) for _ in durations
    ]
    frame = with_engagement(
        pl.DataFrame(
            {"duration_ms": durations, "length_seconds": lengths},
            schema={"duration_ms": pl.Int32, "length_seconds": pl.Int32},
        )
    )
    seconds = [d / 1000 for d in durations]
    assert frame["engagement_seconds"].to_list() == seconds
    expected_pct = [
        round(100 * s / length * 100) / 100 for s, length in zip(seconds, lengths, strict=True)
    ]
    assert frame["engagement_pct"].to_list() == expected_pct


# --- validation and dead letters -------------------------------------------------------------

DEAD_LETTER_CASES = [
    pytest.param({"event_ts": None}, REASON_NULL_EVENT_TS, id="null-event-ts"),
    pytest.param(
        {"event_ts": "2026-11-25 21:00:05.123457+00"}, REASON_FUTURE_EVENT_TS, id="future-1us"
    ),
    pytest.param({"event_ts": "2036-11-24 21:00:00+00"}, REASON_FUTURE_EVENT_TS, id="future-10y"),
    pytest.param({"duration_ms": "-1"}, REASON_NEGATIVE_DURATION, id="negative-duration"),
    pytest.param({"content_id": None}, REASON_NULL_CONTENT_ID, id="null-content-id"),
    pytest.param({"event_type": "share"}, REASON_UNKNOWN_EVENT_TYPE, id="unknown-event-type"),
    pytest.param({"event_type": "Play"}, REASON_UNKNOWN_EVENT_TYPE, id="event-type-case"),
    pytest.param({"event_type": None}, REASON_UNKNOWN_EVENT_TYPE, id="null-event-type"),
    pytest.param({"raw_payload": "[1, 2, 3]"}, REASON_UNDECODABLE_PAYLOAD, id="payload-array"),
    pytest.param({"raw_payload": '"truncated"'}, REASON_UNDECODABLE_PAYLOAD, id="payload-string"),
    pytest.param({"raw_payload": "42"}, REASON_UNDECODABLE_PAYLOAD, id="payload-number"),
    pytest.param({"raw_payload": "null"}, REASON_UNDECODABLE_PAYLOAD, id="payload-json-null"),
    pytest.param({"id": "12a"}, REASON_UNDECODABLE_PAYLOAD, id="id-not-integer"),
    pytest.param({"id": None}, REASON_UNDECODABLE_PAYLOAD, id="id-null"),
    pytest.param({"duration_ms": "1.5"}, REASON_UNDECODABLE_PAYLOAD, id="duration-not-integer"),
    pytest.param({"duration_ms": "2147483648"}, REASON_UNDECODABLE_PAYLOAD, id="duration-int32"),
    pytest.param({"content_id": "podcast-1"}, REASON_UNDECODABLE_PAYLOAD, id="content-not-uuid"),
    pytest.param({"user_id": "alice"}, REASON_UNDECODABLE_PAYLOAD, id="user-not-uuid"),
    pytest.param({"event_ts": "yesterday"}, REASON_UNDECODABLE_PAYLOAD, id="ts-garbage"),
    pytest.param({"event_ts": "infinity"}, REASON_UNDECODABLE_PAYLOAD, id="ts-infinity"),
    pytest.param(
        {"event_ts": "2026-02-30 00:00:00+00"}, REASON_UNDECODABLE_PAYLOAD, id="ts-feb-30"
    ),
    pytest.param(
        {"event_ts": "2026-11-24 21:00:00"}, REASON_UNDECODABLE_PAYLOAD, id="ts-no-offset"
    ),
    pytest.param({"event_ts": "0044-03-15 12:00:00+00 BC"}, REASON_UNDECODABLE_PAYLOAD, id="ts-bc"),
]


@pytest.mark.parametrize(("fields", "reason"), DEAD_LETTER_CASES)
def test_every_reason_becomes_a_dead_letter_with_the_raw_change(
    fields: dict[str, str | None], reason: str
) -> None:
    bad = image(id="7", **fields) if "id" not in fields else image(**fields)
    changes = batch(change(0, "insert", bad, lsn=4242))
    result = run(changes)
    assert result.rows.is_empty()
    assert result.deltas.is_empty()
    letter = result.dead_letters.row(0, named=True)
    assert result.dead_letters.height == 1
    assert letter["reason"] == reason
    assert letter["op"] == "insert"
    assert letter["source_lsn"] == 4242
    assert letter["source_committed_at"] == COMMITTED
    assert letter["event_id"] == (7 if "id" not in fields else None)
    raw = json.loads(letter["raw_change"])
    assert raw == {"op": "insert", **bad, **dict.fromkeys(OLD_IMAGE_COLUMNS)}
    assert list(raw) == ["op", *IMAGE_COLUMNS, *OLD_IMAGE_COLUMNS]  # stable for replays


def test_reason_codes_are_the_documented_ones() -> None:
    assert DEAD_LETTER_REASONS == (
        "undecodable_payload",
        "null_content_id",
        "null_event_ts",
        "future_event_ts",
        "negative_duration",
        "unknown_event_type",
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"raw_payload": "[]", "event_ts": None}, REASON_UNDECODABLE_PAYLOAD),
        ({"event_ts": "garbage", "content_id": None}, REASON_UNDECODABLE_PAYLOAD),
        ({"content_id": None, "event_ts": None, "event_type": "x"}, REASON_NULL_CONTENT_ID),
        ({"event_ts": None, "duration_ms": "-5"}, REASON_NULL_EVENT_TS),
        ({"event_ts": "2030-01-01 00:00:00+00", "duration_ms": "-5"}, REASON_FUTURE_EVENT_TS),
        ({"duration_ms": "-5", "event_type": "x"}, REASON_NEGATIVE_DURATION),
    ],
)
def test_one_reason_per_dead_letter_the_first_in_order(
    fields: dict[str, str | None], reason: str
) -> None:
    letters = run(batch(change(0, "insert", image(**fields)))).dead_letters
    assert letters["reason"].to_list() == [reason]


def test_future_boundary_and_configurable_rules() -> None:
    exactly_one_day = image(id="1", event_ts="2026-11-25 21:00:05.123456+00")
    share = image(id="2", event_type="share")
    two_hours = image(id="3", event_ts="2026-11-24 23:00:05.123456+00")
    changes = batch(
        change(0, "insert", exactly_one_day),
        change(1, "insert", share),
        change(2, "insert", two_hours),
    )
    assert run(changes).rows["event_id"].to_list() == [1, 3]
    assert run(changes).dead_letters["reason"].to_list() == [REASON_UNKNOWN_EVENT_TYPE]

    rules = EnrichRules(
        future_tolerance=timedelta(hours=1), event_types=frozenset({"play", "share"})
    )
    strict = run(changes, rules=rules)
    assert strict.rows["event_id"].to_list() == [2]
    assert strict.dead_letters["reason"].to_list() == [REASON_FUTURE_EVENT_TS] * 2


def test_rules_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="future_tolerance"):
        EnrichRules(future_tolerance=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="event_types"):
        EnrichRules(event_types=frozenset())


def test_nullable_fields_are_valid() -> None:
    loose = image(user_id=None, device=None, raw_payload=None, duration_ms=None)
    result = run(batch(change(0, "insert", loose)))
    assert result.dead_letters.is_empty()
    row = result.rows.row(0, named=True)
    assert (row["user_id"], row["device"], row["raw_payload"], row["duration_ms"]) == (None,) * 4
    assert (row["engagement_seconds"], row["engagement_pct"]) == (None, None)
    delta = result.deltas.row(0, named=True)
    assert (delta["engagement_seconds"], delta["engagement_pct"], delta["events"]) == (0.0, None, 1)


def test_timestamps_with_other_offsets_are_converted_to_utc() -> None:
    changes = batch(
        change(0, "insert", image(id="1", event_ts="2026-11-24 23:30:00.25+05:30")),
        change(1, "insert", image(id="2", event_ts="2026-11-24 15:00:00-03")),
        change(2, "insert", image(id="3", event_ts="2026-11-24 18:00:00+00")),
    )
    assert run(changes).rows["event_ts"].to_list() == [
        datetime(2026, 11, 24, 18, 0, 0, 250000, tzinfo=UTC),
        datetime(2026, 11, 24, 18, 0, tzinfo=UTC),
        datetime(2026, 11, 24, 18, 0, tzinfo=UTC),
    ]


def test_uppercase_uuids_are_accepted_and_normalised() -> None:
    changes = batch(change(0, "insert", image(content_id=PODCAST.upper(), user_id=USER.upper())))
    row = run(changes).rows.row(0, named=True)
    assert (row["content_id"], row["user_id"], row["content_type"]) == (PODCAST, USER, "podcast")


# --- content: unknown ids and the as-of join --------------------------------------------------


def test_unknown_content_is_valid_with_null_content_fields_and_counted() -> None:
    changes = batch(
        change(0, "insert", image(id="1", content_id=UNKNOWN)),
        change(1, "insert", image(id="2")),
        change(2, "insert", image(id="3", content_id=UNKNOWN)),
    )
    result = run(changes)
    assert result.dead_letters.is_empty()
    assert result.unknown_content == 2
    unknown = result.rows.filter(pl.col("content_id") == UNKNOWN)
    assert unknown["content_type"].to_list() == [None, None]
    assert unknown["length_seconds"].to_list() == [None, None]
    assert unknown["engagement_pct"].to_list() == [None, None]
    assert unknown["engagement_seconds"].to_list() == [30.0, 30.0]
    assert result.deltas["events"].sum() == 3


def test_as_of_join_picks_the_version_current_at_each_commit() -> None:
    """Content length changes between two events of one batch, then the content is deleted."""
    cache = content_versions([ContentVersion(PODCAST, "podcast", 100)])
    versions = content_versions(
        cache,
        [
            *content_versions_from_change(
                "update",
                {"id": PODCAST, "content_type": "podcast", "length_seconds": "200"},
                {"id": PODCAST},
                200,
            ),
            *content_versions_from_change("delete", {"id": PODCAST}, {"id": PODCAST}, 400),
        ],
    )
    changes = batch(
        change(0, "insert", image(id="1"), lsn=150),
        change(1, "insert", image(id="2"), lsn=200),  # same transaction as the content update
        change(2, "insert", image(id="3"), lsn=300),
        change(3, "insert", image(id="4"), lsn=500),
    )
    result = run(changes, versions)
    assert result.rows["length_seconds"].to_list() == [100, 200, 200, None]
    assert result.rows["engagement_pct"].to_list() == [30.0, 15.0, 15.0, None]
    assert result.rows["content_type"].to_list() == ["podcast", "podcast", "podcast", None]
    assert result.unknown_content == 1


def test_content_helpers_build_and_fold_versions() -> None:
    current = {
        PODCAST: ContentVersion(PODCAST, "podcast", 100),
        VIDEO: ContentVersion(VIDEO, "video", 60),
    }
    other = "0b9f0b1e-0000-4000-8000-000000000003"
    changes = [
        *content_versions_from_change(
            "insert", {"id": other, "content_type": "newsletter", "length_seconds": None}, None, 10
        ),
        *content_versions_from_change(
            "update",
            {"id": PODCAST, "content_type": "podcast", "length_seconds": "120"},
            {"id": PODCAST},
            20,
        ),
        *content_versions_from_change(
            "update",
            {"id": PODCAST, "content_type": "podcast", "length_seconds": "x"},
            {"id": PODCAST},
            30,
        ),
        *content_versions_from_change("delete", {"id": VIDEO}, {"id": VIDEO}, 40),
    ]
    versions = content_versions(current, changes)
    assert versions.schema == CONTENT_VERSIONS_SCHEMA
    assert versions.height == 6
    cache = fold_content_versions(versions)
    assert cache.rows() == [
        (PODCAST, "podcast", None, 30, False),
        (other, "newsletter", None, 10, False),
    ]
    # The folded cache feeds the next batch unchanged.
    assert content_versions(cache).equals(cache)


def test_content_update_that_changes_the_id_ends_the_old_id() -> None:
    moved = content_versions_from_change(
        "update", {"id": VIDEO, "content_type": "video", "length_seconds": "90"}, {"id": PODCAST}, 7
    )
    assert moved == (
        ContentVersion(PODCAST, None, None, 7, is_deleted=True),
        ContentVersion(VIDEO, "video", 90, 7),
    )


# --- updates, deletes, tombstones and deltas --------------------------------------------------


def test_delete_gives_a_tombstone_from_the_old_image_and_a_retraction() -> None:
    old = image(id="9", duration_ms="60000")
    result = run(batch(change(0, "delete", old=old, lsn=300)))
    assert result.dead_letters.is_empty()
    row = result.rows.row(0, named=True)
    assert (row["event_id"], row["is_deleted"], row["op"], row["source_lsn"]) == (
        9,
        1,
        "delete",
        300,
    )
    assert (row["duration_ms"], row["engagement_pct"]) == (60000, 10.0)
    assert result.deltas.select(
        "content_id", "engagement_seconds", "engagement_pct", "events"
    ).rows() == [(PODCAST, -60.0, -10.0, -1)]


def test_delete_of_an_invalid_row_is_a_harmless_tombstone_without_retraction() -> None:
    result = run(batch(change(0, "delete", old=image(id="9", duration_ms="-5"))))
    assert result.rows.select("event_id", "is_deleted").rows() == [(9, 1)]
    assert result.deltas.is_empty()
    assert result.dead_letters.is_empty()


def test_delete_whose_id_does_not_parse_is_a_dead_letter() -> None:
    result = run(batch(change(0, "delete", old=image(id="nine"))))
    assert result.rows.is_empty()
    assert result.deltas.is_empty()
    assert result.dead_letters.select("reason", "op", "event_id").rows() == [
        (REASON_UNDECODABLE_PAYLOAD, "delete", None)
    ]


def test_update_moving_an_event_to_other_content_retracts_and_adds() -> None:
    old = image(id="5", content_id=PODCAST, duration_ms="60000")
    new = image(id="5", content_id=VIDEO, duration_ms="90000")
    result = run(batch(change(0, "update", new, old, lsn=210)))
    assert result.rows.select("event_id", "content_id", "is_deleted", "engagement_pct").rows() == [
        (5, VIDEO, 0, 30.0)
    ]
    assert result.deltas.select(
        "content_id", "engagement_seconds", "engagement_pct", "events"
    ).rows() == [
        (PODCAST, -60.0, -10.0, -1),
        (VIDEO, 90.0, 30.0, 1),
    ]
    assert result.deltas["source_lsn"].to_list() == [210, 210]


def test_update_to_invalid_dead_letters_tombstones_and_retracts() -> None:
    old = image(id="5", event_ts="2026-10-31 23:59:59+00", duration_ms="60000")
    new = image(id="5", event_ts=None, duration_ms="60000")
    result = run(batch(change(0, "update", new, old, lsn=220)))
    letter = result.dead_letters.row(0, named=True)
    assert (letter["reason"], letter["event_id"], letter["op"]) == (
        REASON_NULL_EVENT_TS,
        5,
        "update",
    )
    assert json.loads(letter["raw_change"])["old_event_ts"] == "2026-10-31 23:59:59+00"
    # The tombstone is the version ClickHouse holds (same key and event_ts, so same partition).
    tombstone = result.rows.row(0, named=True)
    assert result.rows.height == 1
    assert (tombstone["event_id"], tombstone["is_deleted"], tombstone["source_lsn"]) == (5, 1, 220)
    assert tombstone["event_ts"] == datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)
    assert result.deltas.select("engagement_seconds", "events").rows() == [(-60.0, -1)]


def test_update_from_invalid_to_valid_adds_without_retracting() -> None:
    old = image(id="5", duration_ms="-1")
    new = image(id="5", duration_ms="1000")
    result = run(batch(change(0, "update", new, old)))
    assert result.rows.select("event_id", "is_deleted").rows() == [(5, 0)]
    assert result.deltas["events"].to_list() == [1]
    assert result.dead_letters.is_empty()


def test_update_without_old_image_still_tombstones_an_invalid_new_image() -> None:
    """A source without REPLICA IDENTITY FULL: nothing to retract, but no stale valid row."""
    row = change(0, "update", image(id="5", content_id=None), None)
    result = run(batch(row))
    assert result.rows.select("event_id", "is_deleted").rows() == [(5, 1)]
    assert result.dead_letters["reason"].to_list() == [REASON_NULL_CONTENT_ID]
    assert result.deltas.is_empty()


def test_update_that_changes_the_id_tombstones_the_old_id() -> None:
    result = run(batch(change(0, "update", image(id="6"), image(id="5"))))
    assert result.rows.select("event_id", "is_deleted").rows() == [(5, 1), (6, 0)]
    assert result.deltas["events"].to_list() == [-1, 1]


def test_versions_of_one_row_in_one_transaction_keep_only_the_last() -> None:
    v1 = image(id="3", duration_ms="1000")
    v2 = image(id="3", duration_ms="2000")
    one_txn = batch(
        change(0, "insert", v1, lsn=500),
        change(1, "update", v2, v1, lsn=500),
        change(2, "delete", old=v2, lsn=500),
    )
    result = run(one_txn)
    assert result.rows.select("event_id", "op", "is_deleted").rows() == [(3, "delete", 1)]
    assert result.deltas["events"].to_list() == [1, -1, 1, -1]
    assert result.deltas["engagement_seconds"].sum() == 0.0

    three_txns = batch(
        change(0, "insert", v1, lsn=500),
        change(1, "update", v2, v1, lsn=510),
        change(2, "delete", old=v2, lsn=520),
    )
    rows = run(three_txns).rows
    assert rows.select("source_lsn", "op", "is_deleted", "duration_ms").rows() == [
        (500, "insert", 0, 1000),
        (510, "update", 0, 2000),
        (520, "delete", 1, 2000),
    ]


def test_counts_by_op() -> None:
    v1 = image(id="3")
    result = run(
        batch(
            change(0, "insert", v1),
            change(1, "insert", image(id="4", event_type="nope")),
            change(2, "update", v1, v1),
            change(3, "delete", old=v1),
        )
    )
    assert result.counts == {"insert": 2, "update": 1, "delete": 1}


# --- pass-through, determinism, edges ---------------------------------------------------------


def test_unicode_and_200kb_payloads_pass_through_untouched() -> None:
    big = json.dumps({"blob": "x" * 200_000, "note": "é€😀 中文 \u0000"}, ensure_ascii=False)
    unicode = '{"title": "Ünïcödé — 播客 🎧", "q": "\\"quoted\\""}'
    changes = batch(
        change(0, "insert", image(id="1", raw_payload=big, device="smart-tv 📺")),
        change(1, "insert", image(id="2", raw_payload=unicode)),
        change(2, "insert", image(id="3", raw_payload=big, event_type="bogus")),
    )
    result = run(changes)
    assert result.rows["raw_payload"].to_list() == [big, unicode]
    assert result.rows["device"].to_list()[0] == "smart-tv 📺"
    assert json.loads(result.dead_letters["raw_change"][0])["raw_payload"] == big


def test_empty_batch() -> None:
    result = run(empty_changes(), content_versions([]))
    assert result.rows.is_empty() and result.deltas.is_empty() and result.dead_letters.is_empty()
    assert result.unknown_content == 0
    assert result.counts == {"insert": 0, "update": 0, "delete": 0}


def mixed_batch(size: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A realistic batch: mostly inserts, some updates and deletes, ~3% invalid, ~2% unknown."""
    rng = random.Random(seed)
    contents = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(500)]
    catalog = content_versions(
        ContentVersion(
            cid,
            rng.choice(["podcast", "video", "newsletter"]),
            rng.choice([None, 0, 60, 600, 3600]),
        )
        for cid in contents
    )
    live: dict[int, Image] = {}
    rows: list[dict[str, object]] = []
    lsn = 1_000
    next_id = 1
    for seq in range(size):
        if seq % 4 == 0:
            lsn += rng.randint(1, 400)  # a few changes per transaction
        committed = COMMITTED + timedelta(microseconds=lsn)
        roll = rng.random()
        new = image(
            id=str(next_id),
            content_id=rng.choice(contents) if rng.random() > 0.02 else str(uuid.uuid4()),
            user_id=str(uuid.UUID(int=rng.getrandbits(128))),
            event_type=rng.choice(["play", "pause", "finish", "click"]),
            event_ts=f"2026-11-24 20:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
            f".{rng.randint(0, 999_999):06d}+00",
            duration_ms=str(rng.randint(0, 3_600_000)) if rng.random() > 0.05 else None,
            raw_payload=json.dumps({"n": seq}),
        )
        if rng.random() < 0.03:
            new |= rng.choice(
                [
                    {"event_ts": None},
                    {"duration_ms": "-3"},
                    {"content_id": None},
                    {"event_type": "x"},
                    {"raw_payload": "[]"},
                ]
            )
        if roll < 0.8 or not live:
            live[next_id] = new
            next_id += 1
            rows.append(change(seq, "insert", new, lsn=lsn, committed=committed))
        elif roll < 0.93:
            event_id = rng.choice(list(live))
            new["id"] = str(event_id)
            rows.append(change(seq, "update", new, live[event_id], lsn=lsn, committed=committed))
            live[event_id] = new
        else:
            event_id = rng.choice(list(live))
            rows.append(change(seq, "delete", old=live.pop(event_id), lsn=lsn, committed=committed))
    return batch(*rows), catalog


def frame_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    return buffer.getvalue()


def test_same_input_gives_byte_identical_output() -> None:
    changes, catalog = mixed_batch(5_000, seed=1)
    first = run(changes, catalog)
    again = run(changes.clone(), catalog.clone())
    shuffled = run(changes.sample(fraction=1.0, shuffle=True, seed=3), catalog)
    for other in (again, shuffled):
        for name in ("rows", "deltas", "dead_letters"):
            assert getattr(first, name).equals(getattr(other, name)), name
            assert frame_bytes(getattr(first, name)) == frame_bytes(getattr(other, name)), name
        assert (first.unknown_content, first.counts) == (other.unknown_content, other.counts)
    assert first.dead_letters.height > 0 and first.unknown_content > 0


def test_aggregates_from_deltas_match_the_live_rows() -> None:
    """Summing every delta of a history gives exactly the aggregate of the rows still alive."""
    changes, catalog = mixed_batch(3_000, seed=2)
    result = run(changes, catalog)
    alive = (
        result.rows.sort("source_lsn", maintain_order=True)
        .unique("event_id", keep="last", maintain_order=True)
        .filter(pl.col("is_deleted") == 0)
    )
    assert result.deltas["events"].sum() == alive.height


def test_input_contract_is_checked() -> None:
    good = batch(change(0, "insert", image()))
    with pytest.raises(EnrichInputError, match="missing \\['device'\\]"):
        enrich(good.drop("device"), CATALOG)
    with pytest.raises(EnrichInputError, match="source_lsn"):
        enrich(good.with_columns(pl.col("source_lsn").cast(pl.Int64)), CATALOG)
    with pytest.raises(EnrichInputError, match="op must be one of"):
        enrich(good.with_columns(op=pl.lit("truncate")), CATALOG)
    with pytest.raises(EnrichInputError, match="seq unique"):
        enrich(pl.concat([good, good]), CATALOG)
    with pytest.raises(EnrichInputError, match="content frame"):
        enrich(good, CATALOG.drop("is_deleted"))
    # Extra decoder columns are ignored.
    assert enrich(good.with_columns(xid=pl.lit(7)), CATALOG).rows.height == 1


def test_throughput_50k_changes(capsys: pytest.CaptureFixture[str]) -> None:
    changes, catalog = mixed_batch(50_000, seed=4)
    enrich(changes.head(100), catalog)  # warm up
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        result = enrich(changes, catalog)
        timings.append(time.perf_counter() - started)
    best = min(timings)
    with capsys.disabled():
        print(
            f"\nenrich: {changes.height} changes in {best * 1000:.1f} ms "
            f"(best of 3) = {changes.height / best:,.0f} changes/s; "
            f"rows {result.rows.height}, deltas {result.deltas.height}, "
            f"dead letters {result.dead_letters.height}"
        )


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("2026-10-31 23:59:59+00", "2026-11-01 00:00:01+00"),
        ("2026-11-01 00:00:01+00", "2026-10-31 23:59:59+00"),
    ],
    ids=["later month", "earlier month"],
)
def test_update_moving_an_event_to_another_month_tombstones_the_old_month(
    before: str, after: str
) -> None:
    """Background merges collapse versions per partition: the old month needs a tombstone. FINAL
    merges across partitions and a tie goes to the later month, so the tombstone's version is
    one below the move's: the live row wins in either direction."""
    old = image(id="7", event_ts=before)
    new = image(id="7", event_ts=after)
    rows = run(batch(change(0, "update", new=new, old=old, lsn=500))).rows
    month = {True: int(before[:7].replace("-", "")), False: int(after[:7].replace("-", ""))}
    assert sorted(
        (r["event_ts"].year * 100 + r["event_ts"].month, r["is_deleted"], r["source_lsn"])
        for r in rows.iter_rows(named=True)
    ) == sorted([(month[True], 1, 499), (month[False], 0, 500)])


def test_update_within_a_month_keeps_one_version() -> None:
    old = image(id="7", event_ts="2026-11-02 10:00:00+00")
    new = image(id="7", event_ts="2026-11-20 10:00:00+00", duration_ms="1")
    rows = run(batch(change(0, "update", new=new, old=old, lsn=501))).rows
    assert rows.select("event_id", "is_deleted", "duration_ms").rows() == [(7, 0, 1)]
