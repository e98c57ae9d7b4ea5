"""Enrichment and validation of one micro-batch of engagement_events changes (DESIGN §5).

Pure Polars over whole columns: no Dagster, no I/O, no wall-clock time; the same batch and content
versions always give byte-identical rows, deltas and dead letters, so a replay after a crash is
harmless. It must never drop a change silently nor raise on bad data (only on a broken contract).

A batch goes through four steps, each over whole columns:

1. `_images`: every change becomes one or two row images, the NEW image (insert, update; sign +1)
   and the OLD image (update, delete; sign -1), so parsing, the content join and the formula run
   once over one long frame.
2. `_parse`: the PostgreSQL text of each column becomes a typed value, and each image gets the
   first dead-letter reason that applies, in the order of `DEAD_LETTER_REASONS`.
3. `_join_content`: an as-of join picks the content version current at the change's commit LSN.
4. `with_engagement`: engagement_seconds and engagement_pct, exactly as DESIGN §5 words them.

Then the three outputs are cut from that frame: ClickHouse rows (live versions and tombstones),
signed deltas for the Redis live aggregates, and dead letters carrying the raw change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import polars as pl

FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)

OPS = ("insert", "update", "delete")

# The text columns of an engagement_events row image, as pgoutput delivers them.
IMAGE_COLUMNS = (
    "id",
    "content_id",
    "user_id",
    "event_type",
    "event_ts",
    "duration_ms",
    "device",
    "raw_payload",
)
OLD_IMAGE_COLUMNS = tuple(f"old_{name}" for name in IMAGE_COLUMNS)

UTC_MICROS = pl.Datetime("us", "UTC")

# One row per engagement_events change of the batch, in commit order. The image columns hold the
# NEW image for insert/update and the OLD image for delete; the old_* columns hold the OLD image
# of an update (NULL for inserts, equal to the image for deletes).
CHANGES_SCHEMA = pl.Schema(
    {
        "seq": pl.UInt32(),
        "op": pl.String(),
        "source_lsn": pl.UInt64(),
        "source_committed_at": UTC_MICROS,
        **dict.fromkeys(IMAGE_COLUMNS, pl.String()),
        **dict.fromkeys(OLD_IMAGE_COLUMNS, pl.String()),
    }
)

# Versions of `content`: a version holds from its commit LSN until the next version of the same id.
CONTENT_VERSIONS_SCHEMA = pl.Schema(
    {
        "content_id": pl.String(),
        "content_type": pl.String(),
        "length_seconds": pl.Int32(),
        "valid_from_lsn": pl.UInt64(),
        "is_deleted": pl.Boolean(),
    }
)

# engagement.enriched_engagements without ingested_at (the sink stamps it; it is not logic).
ENRICHED_ROWS_SCHEMA = pl.Schema(
    {
        "event_id": pl.Int64(),
        "content_id": pl.String(),
        "user_id": pl.String(),
        "event_type": pl.String(),
        "event_ts": UTC_MICROS,
        "device": pl.String(),
        "duration_ms": pl.Int32(),
        "content_type": pl.String(),
        "length_seconds": pl.Int32(),
        "engagement_seconds": pl.Float64(),
        "engagement_pct": pl.Float64(),
        "raw_payload": pl.String(),
        "op": pl.String(),
        "source_lsn": pl.UInt64(),
        "source_committed_at": UTC_MICROS,
        "is_deleted": pl.UInt8(),
    }
)

# Signed contributions to the live aggregates: +1 per valid NEW image, -1 per valid OLD image.
DELTAS_SCHEMA = pl.Schema(
    {
        "content_id": pl.String(),
        "event_ts": UTC_MICROS,
        "engagement_seconds": pl.Float64(),
        "engagement_pct": pl.Float64(),
        "events": pl.Int64(),
        "source_lsn": pl.UInt64(),
        "seq": pl.UInt32(),
    }
)

DEAD_LETTERS_SCHEMA = pl.Schema(
    {
        "source_lsn": pl.UInt64(),
        "event_id": pl.Int64(),
        "reason": pl.String(),
        "op": pl.String(),
        "raw_change": pl.String(),
        "source_committed_at": UTC_MICROS,
    }
)

REASON_UNDECODABLE_PAYLOAD = "undecodable_payload"
REASON_NULL_CONTENT_ID = "null_content_id"
REASON_NULL_EVENT_TS = "null_event_ts"
REASON_FUTURE_EVENT_TS = "future_event_ts"
REASON_NEGATIVE_DURATION = "negative_duration"
REASON_UNKNOWN_EVENT_TYPE = "unknown_event_type"
# Not one of the per-image reasons below: the stream decides it per version of the table, before
# enrichment, when a column the rows need is missing or retyped (lib/event_schema.py).
REASON_SCHEMA_MISMATCH = "schema_mismatch"

# The order in which reasons are tried; a dead letter carries the first that applies. Decoding
# comes first: when a field does not parse, the checks that read it would only report a symptom
# (an unparseable event_ts is not "NULL event_ts"). Then what the row is about (content, time)
# before what it measures (duration, event type).
DEAD_LETTER_REASONS = (
    REASON_UNDECODABLE_PAYLOAD,
    REASON_NULL_CONTENT_ID,
    REASON_NULL_EVENT_TS,
    REASON_FUTURE_EVENT_TS,
    REASON_NEGATIVE_DURATION,
    REASON_UNKNOWN_EVENT_TYPE,
)

# PostgreSQL's timestamptz output with DateStyle ISO: '2026-11-24 21:00:05.123456+00', and
# '+05:30' or '-03' when the session is not in UTC. `%.f` also accepts no fraction, `%#z` an offset
# with or without minutes. Not accepted, hence undecodable: 'infinity', BC dates, years past 9999,
# offsets with seconds (historical LMT zones, never emitted with TimeZone=UTC) and text without an
# offset (that is a `timestamp`, not a `timestamptz`: its instant is ambiguous).
TIMESTAMPTZ_FORMAT = "%Y-%m-%d %H:%M:%S%.f%#z"
# PostgreSQL prints uuids lowercase and hyphenated; other spellings come from text columns of
# sources without the uuid type, and are accepted case-insensitively, then lowercased.
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

_NEW, _OLD = 1, -1  # the `sign` of an image: NEW images add to aggregates, OLD images retract
_TEXT = "_text"  # suffix of an image's raw text columns inside the long frame


class EnrichInputError(ValueError):
    """A batch or content frame breaks the contract with the decoder (a bug, not bad data)."""


@dataclass(frozen=True)
class EnrichRules:
    """The validation rules of DESIGN §5 that deployments may tune.

    Changing them between a batch and its replay changes the output, so they belong in the run's
    configuration, never in anything that varies from one attempt to the next.
    """

    future_tolerance: timedelta = timedelta(days=1)
    event_types: frozenset[str] = frozenset({"play", "pause", "finish", "click"})

    def __post_init__(self) -> None:
        if self.future_tolerance < timedelta(0):
            raise ValueError(f"future_tolerance must be >= 0, got {self.future_tolerance}")
        if not self.event_types:
            raise ValueError("event_types must name at least one allowed event type")


@dataclass(frozen=True)
class ContentVersion:
    """One version of a `content` row, valid from the commit LSN that wrote it."""

    content_id: str
    content_type: str | None
    length_seconds: int | None
    valid_from_lsn: int = 0
    is_deleted: bool = False


@dataclass(frozen=True, eq=False)
class EnrichedBatch:
    """What one batch becomes; frames follow the *_SCHEMA constants, in commit (seq) order.

    - `rows`: enriched_engagements rows. Valid NEW images with is_deleted 0; tombstones
      (is_deleted 1) built from the OLD image for deletes, for updates whose NEW image is invalid
      and for updates that change the event id. One row per (event_id, source_lsn): the last.
    - `deltas`: signed contributions; within a change the retraction precedes the addition.
    - `dead_letters`: invalid NEW images, and deletes whose id does not parse.
    - `unknown_content`: valid NEW images whose content_id has no live content version.
    - `counts`: changes per op, every op of `OPS` present.
    """

    rows: pl.DataFrame
    deltas: pl.DataFrame
    dead_letters: pl.DataFrame
    unknown_content: int
    counts: Mapping[str, int]


def enrich(
    changes: pl.DataFrame, content: pl.DataFrame, rules: EnrichRules | None = None
) -> EnrichedBatch:
    """Enrich and validate one batch of changes against the content versions it may see.

    `content` holds every version an event of the batch may join (see `content_versions`): the
    run's cache plus the batch's own content changes. Raises EnrichInputError only when a frame
    breaks its schema or the decoder contract; bad data becomes dead letters, never an exception.
    """
    rules = rules or EnrichRules()
    changes = _conform(changes, CHANGES_SCHEMA, "changes")
    content = _conform(content, CONTENT_VERSIONS_SCHEMA, "content")
    _check_changes(changes)
    changes = changes.sort("seq")

    joined = _images(changes).pipe(_parse, rules).pipe(_join_content, content).pipe(with_engagement)
    if _has_old_images(changes):
        joined = joined.pipe(_pair_images).sort("seq", "sign")
    else:  # inserts only: one image per change, still in seq order (stable sort, as-of join)
        joined = joined.pipe(_without_partners)
    images = joined.collect()
    valid = pl.col("reason").is_null()
    live = (pl.col("sign") == _NEW) & valid
    return EnrichedBatch(
        rows=_rows(images),
        deltas=_deltas(images),
        dead_letters=_dead_letters(images, changes),
        unknown_content=images.filter(live & ~pl.col("content_found")).height,
        counts=_counts(changes),
    )


def _conform(frame: pl.DataFrame, schema: pl.Schema, name: str) -> pl.DataFrame:
    """The frame's schema columns in schema order; extra columns (decoder extras) are ignored."""
    missing = [column for column in schema if column not in frame.schema]
    mistyped = [
        f"{column}: {frame.schema[column]} (expected {dtype})"
        for column, dtype in schema.items()
        if column in frame.schema and frame.schema[column] != dtype
    ]
    if missing or mistyped:
        raise EnrichInputError(
            f"{name} frame does not match its schema: missing {missing or 'none'}, "
            f"mistyped {mistyped or 'none'}; build it with the schema constant in "
            f"engagement_dagster.lib.enrich"
        )
    return frame.select(schema.names())


def _check_changes(changes: pl.DataFrame) -> None:
    """The decoder's promises: an op per change, a unique seq, a commit LSN and time each."""
    broken = changes.select(
        bad_op=(~pl.col("op").is_in(OPS).fill_null(False)).sum(),
        duplicate_seq=pl.col("seq").is_duplicated().sum(),
        null_meta=pl.any_horizontal(
            pl.col("seq", "source_lsn", "source_committed_at").is_null()
        ).sum(),
    ).row(0, named=True)
    if any(broken.values()):
        first_lsn = changes.select(pl.col("source_lsn").min()).item()
        raise EnrichInputError(
            f"changes batch starting at LSN {first_lsn} breaks the decoder contract {broken}: "
            f"op must be one of {OPS}, seq unique, seq/source_lsn/source_committed_at non-NULL; "
            f"fix the decoder, the batch cannot be enriched as is"
        )


def _images(changes: pl.DataFrame) -> pl.LazyFrame:
    """One row per row image: NEW for insert/update (sign +1), OLD for update/delete (sign -1)."""
    meta = ("seq", "op", "source_lsn", "source_committed_at")
    is_delete = pl.col("op") == "delete"
    new = (
        changes.lazy()
        .filter(~is_delete)
        .select(
            *meta,
            pl.lit(_NEW, pl.Int8).alias("sign"),
            *(pl.col(name).alias(name + _TEXT) for name in IMAGE_COLUMNS),
        )
    )
    # A delete's OLD image is in the image columns (the old_* copy is a courtesy of the decoder).
    old = (
        changes.lazy()
        .filter(pl.col("op") != "insert")
        .select(
            *meta,
            pl.lit(_OLD, pl.Int8).alias("sign"),
            *(
                pl.when(is_delete)
                .then(pl.col(name))
                .otherwise(pl.col(f"old_{name}"))
                .alias(name + _TEXT)
                for name in IMAGE_COLUMNS
            ),
        )
    )
    return pl.concat([old, new])


def _text(name: str) -> pl.Expr:
    return pl.col(name + _TEXT)


def _uuid(name: str) -> pl.Expr:
    return pl.when(_text(name).str.contains(UUID_PATTERN)).then(_text(name).str.to_lowercase())


def _parse(images: pl.LazyFrame, rules: EnrichRules) -> pl.LazyFrame:
    """Typed columns from the text image, and the image's first dead-letter reason (or NULL)."""
    parsed = images.with_columns(
        event_id=_text("id").cast(pl.Int64, strict=False),
        content_id=_uuid("content_id"),
        user_id=_uuid("user_id"),
        event_type=_text("event_type"),
        event_ts=_text("event_ts").str.to_datetime(
            TIMESTAMPTZ_FORMAT, time_unit="us", strict=False
        ),
        duration_ms=_text("duration_ms").cast(pl.Int32, strict=False),
        device=_text("device"),
        raw_payload=_text("raw_payload"),
    )

    def unparsed(name: str, parsed_name: str) -> pl.Expr:
        return _text(name).is_not_null() & pl.col(parsed_name).is_null()

    # jsonb text is canonical JSON, so an object is exactly text that starts with '{'; the id is
    # the primary key, so a NULL id is as undecodable as a non-integer one.
    undecodable = (
        pl.col("event_id").is_null()
        | unparsed("content_id", "content_id")
        | unparsed("user_id", "user_id")
        | unparsed("event_ts", "event_ts")
        | unparsed("duration_ms", "duration_ms")
        | (pl.col("raw_payload").is_not_null() & ~pl.col("raw_payload").str.starts_with("{"))
    )
    future_limit = pl.col("source_committed_at") + pl.lit(rules.future_tolerance)
    allowed_event_type = pl.col("event_type").is_in(sorted(rules.event_types)).fill_null(False)
    return parsed.with_columns(
        reason=pl.when(undecodable)
        .then(pl.lit(REASON_UNDECODABLE_PAYLOAD))
        .when(pl.col("content_id").is_null())
        .then(pl.lit(REASON_NULL_CONTENT_ID))
        .when(pl.col("event_ts").is_null())
        .then(pl.lit(REASON_NULL_EVENT_TS))
        .when(pl.col("event_ts") > future_limit)
        .then(pl.lit(REASON_FUTURE_EVENT_TS))
        .when(pl.col("duration_ms") < 0)
        .then(pl.lit(REASON_NEGATIVE_DURATION))
        .when(~allowed_event_type)
        .then(pl.lit(REASON_UNKNOWN_EVENT_TYPE))
        .otherwise(pl.lit(None, pl.String))
    )


def _join_content(images: pl.LazyFrame, content: pl.DataFrame) -> pl.LazyFrame:
    """Each image joins the latest content version with valid_from_lsn <= its commit LSN.

    Content changed in the event's own transaction shares its LSN and is visible to it, as it is
    to any reader of that transaction. A deleted version gives NULL content fields, exactly like
    an id that never had a version. Two versions of one id at one LSN: the later given wins.
    """
    versions = (
        content.lazy()
        .with_columns(pl.col("content_id").str.to_lowercase())
        .unique(["content_id", "valid_from_lsn"], keep="last", maintain_order=True)
        .sort("valid_from_lsn", maintain_order=True)
        .rename({"is_deleted": "content_is_deleted"})
    )
    live_version = pl.col("valid_from_lsn").is_not_null() & ~pl.col("content_is_deleted")
    return (
        images.sort("source_lsn", maintain_order=True)
        .join_asof(
            versions,
            left_on="source_lsn",
            right_on="valid_from_lsn",
            by="content_id",
            strategy="backward",
            check_sortedness=False,  # both sides are sorted just above
        )
        .with_columns(
            content_found=live_version.fill_null(False),
            content_type=pl.when(live_version).then(pl.col("content_type")),
            length_seconds=pl.when(live_version).then(pl.col("length_seconds")),
        )
    )


def with_engagement(frame: FrameT) -> FrameT:
    """Add DESIGN §5's engagement_seconds and engagement_pct from duration_ms and length_seconds.

    NULL in, NULL out, never a division error; pct is NULL when length_seconds <= 0 and is not
    clamped. Shared with anything that must agree with the stream (backfills, checks).

    The Float64 values must be the ones ClickHouse computes from the same inputs, bit for bit, in
    any batch (the rows are compared with ClickHouse and summed in rollups):

    - Division: Polars divides a column by a scalar as a multiplication by the reciprocal, which
      is 1 ulp off for ~14% of durations, and only in frames of two rows or more, so the same
      change would give different bits in different batches (pola-rs/polars#20038, #23741).
      A Decimal(38, 3) holds duration_ms / 1000 exactly and its cast to Float64 is correctly
      rounded, which is IEEE division, as in ClickHouse. `100 * seconds / length_seconds` keeps
      the formula's order and divides column by column, which Polars does exactly.
    - Rounding: `round(2, mode="half_to_even")` computes rint(x * 100) / 100 in Float64, ties to
      even, which is what ClickHouse's round(x, 2) does on Float64 (its docs: banker's rounding
      for floats; it equals roundBankers). The mode is pinned, not left to a default (Polars 1.x
      rounded half away from zero). It is not decimal rounding: 0.125 gives 0.12 and 2728.425
      (really 2728.42499999...) gives 2728.42, as in ClickHouse.

    Both were checked bit for bit against chDB 26.9 on 300,000 (duration, length) pairs, and the
    unit tests pin ClickHouse's answers for the tie cases.
    """
    engagement_seconds = (pl.col("duration_ms").cast(pl.Decimal(38, 3)) / 1000).cast(pl.Float64)
    return frame.with_columns(
        engagement_seconds=engagement_seconds,
        engagement_pct=pl.when(pl.col("length_seconds") > 0).then(
            (100 * engagement_seconds / pl.col("length_seconds")).round(2, mode="half_to_even")
        ),
    )


def _pair_images(images: pl.LazyFrame) -> pl.LazyFrame:
    """Give each image its partner's id and validity (the other image of the same change)."""
    partner = images.select(
        "seq",
        sign=-pl.col("sign"),
        partner_event_id=pl.col("event_id"),
        partner_valid=pl.col("reason").is_null(),
        partner_month=_partition_month(),
    )
    return images.join(partner, on=["seq", "sign"], how="left")


def _has_old_images(changes: pl.DataFrame) -> bool:
    return bool((changes["op"] != "insert").any())


def _without_partners(images: pl.LazyFrame) -> pl.LazyFrame:
    """`_pair_images` of a batch of inserts only (no image has a partner), without its join:
    the join and the sort after it were most of the cost of enriching a backfill's chunk
    (bench/backfill.py)."""
    return images.with_columns(
        partner_event_id=pl.lit(None, pl.Int64),
        partner_valid=pl.lit(None, pl.Boolean),
        partner_month=pl.lit(None, pl.Int32),
    )


def _partition_month() -> pl.Expr:
    """toYYYYMM(event_ts) of enriched_engagements' monthly partitions (NULL time: 197001)."""
    ts = pl.col("event_ts").fill_null(pl.lit(0).cast(UTC_MICROS))
    return ts.dt.year() * 100 + ts.dt.month()


def _rows(images: pl.DataFrame) -> pl.DataFrame:
    """ClickHouse rows: live NEW images and tombstones, one per (event_id, source_lsn).

    Tombstones come from the OLD image because that is the version ClickHouse holds: same key,
    same event_ts (so the same partition when the table is partitioned by event time). An update
    tombstones its OLD image when its NEW image is invalid (PostgreSQL no longer holds a valid
    row, so ClickHouse must not keep a stale valid one) or when it moves the row to another id
    (the old id is gone from PostgreSQL). When an update carries no usable OLD id (a source
    without REPLICA IDENTITY FULL), an invalid NEW image tombstones its own id instead. A
    tombstone of an invalid image is harmless.

    Several changes of one row in one transaction share source_lsn, the ReplacingMergeTree
    version. On a tie ClickHouse keeps "the last row of the most recent insert", so which of an
    insert and the delete that followed it survives would depend on how the sink orders, splits
    and replays its inserts, not on the data. So only the last change per (event_id, source_lsn)
    and monthly partition, by seq, is kept: PostgreSQL's state at commit, and every (key,
    version) is unique within a partition. Versions
    from different transactions are all kept; ClickHouse orders them by source_lsn.
    """
    sign = pl.col("sign")
    op = pl.col("op")
    valid = pl.col("reason").is_null()
    has_id = pl.col("event_id").is_not_null()
    live = (sign == _NEW) & valid
    old_tombstone = (
        (sign == _OLD)
        & has_id
        & (
            (op == "delete")
            | ~pl.col("partner_valid").fill_null(False)
            | pl.col("partner_event_id").ne_missing(pl.col("event_id"))
            # ReplacingMergeTree collapses versions within a partition only: a valid update
            # that moves the event to another month leaves a tombstone in the old month.
            | pl.col("partner_month").ne_missing(_partition_month())
        )
    )
    new_tombstone = (
        (sign == _NEW) & (op == "update") & ~valid & has_id & pl.col("partner_event_id").is_null()
    )
    # FINAL also merges one key's versions across partitions, and on a tie the later partition
    # wins: a tombstone left in a later month at the move's own LSN would hide the live row of
    # an event moved back in time. One less than the commit LSN still supersedes every older
    # version in the old month, never ties with a commit (a commit record is longer than a
    # byte) and stays above the previous transaction, so no checkpoint filters it out.
    moved_away = (
        (sign == _OLD)
        & (op == "update")
        & pl.col("partner_valid").fill_null(False)
        & pl.col("partner_event_id").eq_missing(pl.col("event_id"))
        & pl.col("partner_month").ne_missing(_partition_month())
    )
    return (
        images.filter(live | old_tombstone | new_tombstone)
        .with_columns(
            is_deleted=(~live).cast(pl.UInt8),
            source_lsn=pl.when(moved_away)
            .then(pl.col("source_lsn") - 1)
            .otherwise(pl.col("source_lsn")),
        )
        .filter(pl.struct("event_id", "source_lsn", _partition_month()).is_last_distinct())
        .select(pl.col(name).cast(dtype) for name, dtype in ENRICHED_ROWS_SCHEMA.items())
    )


def _deltas(images: pl.DataFrame) -> pl.DataFrame:
    """Signed contributions of valid images: +1 per NEW image, -1 per OLD image.

    A NULL duration contributes 0 seconds and still counts as an event. An OLD image is judged by
    the same rules at the same reference time (this change's commit) as its NEW image once was at
    its own, earlier commit. All rules but one are time-free; the future check is only more lenient
    later, so an image valid at its insert stays valid. The edge: an image dead-lettered at insert
    as future_event_ts, updated or deleted once its event_ts came within the tolerance, retracts a
    contribution that was never added. It needs an event more than `future_tolerance` ahead of
    its commit that is then changed after that much time; it only touches the Redis live
    aggregates of that event's windows, which the rollups rewrite from ClickHouse (where a
    tombstone is harmless) when the window closes. The same holds for the content join: the
    retraction uses the content version at this change's LSN, so engagement_pct of a retraction
    can differ from what was added if the content's length changed in between.
    """
    return images.filter(pl.col("reason").is_null()).select(
        "content_id",
        "event_ts",
        engagement_seconds=pl.col("sign") * pl.col("engagement_seconds").fill_null(0.0),
        engagement_pct=pl.col("sign") * pl.col("engagement_pct"),
        events=pl.col("sign").cast(pl.Int64),
        source_lsn="source_lsn",
        seq="seq",
    )


def _dead_letters(images: pl.DataFrame, changes: pl.DataFrame) -> pl.DataFrame:
    """Invalid NEW images, and deletes that cannot even name their row, with the raw change.

    A delete whose OLD image is otherwise invalid is not a dead letter: that image was already
    dead-lettered when it was written, and its tombstone is harmless.
    """
    letters = images.filter(
        ((pl.col("sign") == _NEW) & pl.col("reason").is_not_null())
        | ((pl.col("op") == "delete") & pl.col("event_id").is_null())
    ).select("seq", "source_lsn", "event_id", "reason", "op", "source_committed_at")
    # op and every text column exactly as they came, so the change can be replayed.
    raw = changes.join(letters.select("seq"), on="seq", how="semi").select(
        "seq",
        raw_change=pl.struct("op", *IMAGE_COLUMNS, *OLD_IMAGE_COLUMNS).struct.json_encode(),
    )
    return (
        letters.join(raw, on="seq", how="left")
        .sort("seq")
        .select(pl.col(name).cast(dtype) for name, dtype in DEAD_LETTERS_SCHEMA.items())
    )


def _counts(changes: pl.DataFrame) -> dict[str, int]:
    per_op = dict(changes.group_by("op").len().iter_rows())
    return {op: int(per_op.get(op, 0)) for op in OPS}


def empty_changes() -> pl.DataFrame:
    """A batch with no changes, in CHANGES_SCHEMA."""
    return CHANGES_SCHEMA.to_frame()


def content_versions(
    current: pl.DataFrame | Mapping[str, ContentVersion] | Iterable[ContentVersion],
    changes: Iterable[ContentVersion] = (),
) -> pl.DataFrame:
    """The content frame `enrich` joins: the run's cache plus the batch's content changes.

    `current` is a previous `fold_content_versions` result, or rows read from `content` (a dict
    by id or a list). Rows read from a snapshot should carry valid_from_lsn 0 ("valid since
    before anything we replay"), or replayed events older than the snapshot would not see them.
    `changes` come in commit order (see `content_versions_from_change`).
    """
    if isinstance(current, pl.DataFrame):
        cache = _conform(current, CONTENT_VERSIONS_SCHEMA, "content cache")
    else:
        rows = current.values() if isinstance(current, Mapping) else current
        cache = _versions_frame(rows)
    return pl.concat([cache, _versions_frame(changes)])


def fold_content_versions(versions: pl.DataFrame) -> pl.DataFrame:
    """The next cache: the latest version per content_id, deleted content dropped, sorted by id.

    Dropping a deletion is safe: the cache only serves later LSNs, where a deleted id and an
    unknown id both give NULL content fields.
    """
    return (
        _conform(versions, CONTENT_VERSIONS_SCHEMA, "content versions")
        .with_columns(pl.col("content_id").str.to_lowercase())
        .sort("valid_from_lsn", maintain_order=True)
        .unique("content_id", keep="last", maintain_order=True)
        .filter(~pl.col("is_deleted"))
        .sort("content_id")
    )


def content_versions_from_change(
    op: str,
    image: Mapping[str, str | None],
    old_image: Mapping[str, str | None] | None,
    source_lsn: int,
) -> tuple[ContentVersion, ...]:
    """The versions one decoded `content` change creates (text images keyed by column name).

    An update that changes the primary key also ends the old id. A length_seconds that is not an
    integer is treated as unknown (NULL): content is reference data, it never dead-letters.
    """
    if op not in OPS:
        raise EnrichInputError(f"content change at LSN {source_lsn} has op {op!r}; expected {OPS}")
    content_id = image.get("id")
    if content_id is None:
        raise EnrichInputError(f"content change at LSN {source_lsn} has no id; check the decoder")
    if op == "delete":
        return (ContentVersion(content_id.lower(), None, None, source_lsn, is_deleted=True),)
    version = ContentVersion(
        content_id=content_id.lower(),
        content_type=image.get("content_type"),
        length_seconds=_int32_or_none(image.get("length_seconds")),
        valid_from_lsn=source_lsn,
    )
    old_id = (old_image or {}).get("id")
    if op == "update" and old_id is not None and old_id.lower() != version.content_id:
        return (ContentVersion(old_id.lower(), None, None, source_lsn, is_deleted=True), version)
    return (version,)


def _int32_or_none(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and -(2**31) <= value < 2**31 else None


def _versions_frame(versions: Iterable[ContentVersion]) -> pl.DataFrame:
    rows = [
        (v.content_id, v.content_type, v.length_seconds, v.valid_from_lsn, v.is_deleted)
        for v in versions
    ]
    return pl.DataFrame(rows, schema=CONTENT_VERSIONS_SCHEMA, orient="row")
