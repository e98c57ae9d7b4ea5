"""Realistic engagement traffic for the source PostgreSQL: the engine of `engagement generate`.

It only writes rows to `content` and `engagement_events` in ordinary transactions; it must never
create, alter or drop schema, publications or slots, nor touch a database it was not given.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
import time
import unicodedata
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg2.errors
import psycopg2.extensions

from engagement_dagster.lib.source_db import connect

EVENT_TYPES = ("play", "pause", "finish", "click")
CONTENT_TYPES = ("podcast", "newsletter", "video")
DEVICES = ("ios", "android", "web", "desktop", "smart_tv", "tablet")

# The defects of DESIGN §5 that send a change to the dead-letter queue, one per invalid row.
INVALID_KINDS = (
    "null_event_ts",
    "future_event_ts",
    "negative_duration",
    "null_content_id",
    "unknown_event_type",
    "undecodable_payload",
)

# Column order of every event row tuple, matching INSERT_EVENTS.
EVENT_COLUMNS = (
    "content_id",
    "user_id",
    "event_type",
    "event_ts",
    "duration_ms",
    "device",
    "raw_payload",
)
CONTENT_COLUMNS = ("id", "slug", "title", "content_type", "length_seconds", "publish_ts")

EventRow = tuple[str | None, str, str, datetime | None, int | None, str, str]
ContentRow = tuple[str, str, str, str, int | None, datetime]

INSERT_EVENTS = f"INSERT INTO engagement_events ({', '.join(EVENT_COLUMNS)}) VALUES "
EVENT_VALUES = "(" + ", ".join(["%s"] * len(EVENT_COLUMNS)) + ")"
INSERT_CONTENT = (
    f"INSERT INTO content ({', '.join(CONTENT_COLUMNS)}) VALUES "
    "(%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id"
)
UPDATE_EVENT_DURATION = "UPDATE engagement_events SET duration_ms = %s WHERE id = %s"
UPDATE_EVENT_CONTENT = "UPDATE engagement_events SET content_id = %s WHERE id = %s"
DELETE_EVENT = "DELETE FROM engagement_events WHERE id = %s"
UPDATE_CONTENT = "UPDATE content SET title = %s, length_seconds = %s WHERE id = %s"
WAL_INSERT_LSN = "SELECT pg_current_wal_insert_lsn()::text"
WAL_FLUSHED_PAST = "SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn"
COUNT_CONTENT = "SELECT count(*) FROM content"
LOAD_CONTENT = "SELECT id::text, content_type, length_seconds FROM content ORDER BY id"
CONTENT_FK_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM pg_constraint
     WHERE conrelid = 'engagement_events'::regclass AND contype = 'f'
       AND conkey = ARRAY[(SELECT attnum FROM pg_attribute
                            WHERE attrelid = 'engagement_events'::regclass
                              AND attname = 'content_id')]::smallint[]
)
"""

ZIPF_S = 1.1  # content popularity: weight 1/rank^s
USER_ZIPF_S = 0.7  # heavy users exist, but the audience is broad
USER_POOL = 40_000
NULL_DURATION_SHARE = 0.05
LATE_EVENT_SHARE = 0.03
ORPHAN_SHARE = 0.005  # valid inserts with an unknown content_id, only when there is no FK
RECENT_IDS = 10_000  # per worker: the events updates and deletes pick from
MAX_BACKLOG_S = 1.0  # after a stall, catch up at most this much offered traffic
FUTURE_OFFSET = timedelta(days=3650)

_EVENT_TYPE_WEIGHTS = (45, 25, 12, 18)
_DEVICE_WEIGHTS = (30, 27, 20, 10, 8, 5)
_CONTENT_TYPE_WEIGHTS = (40, 25, 35)
_APP_VERSIONS = ("5.12.0", "5.12.1", "5.13.0", "5.14.2", "6.0.0-beta.3")
_REFERRERS = ("home", "search", "push", "email", "share", "recommendation", "deeplink")
_LOCALES = ("en-US", "en-GB", "fr-FR", "de-DE", "es-ES", "pt-BR", "ja-JP", "zh-CN", "ko-KR")
_UNKNOWN_EVENT_TYPES = ("share", "seek", "download", "like")
_NON_OBJECT_PAYLOADS = ('"truncated payload"', "[1, 2, 3]", "42")

_TITLE_OPENERS = (
    "The",
    "Inside",
    "Beyond",
    "Café",
    "Über",
    "Notes on",
    "Señales de",
    "Ζωή και",
    "東京の",
    "音楽と",
    "Crème de la",
    "Björk and",
)
_TITLE_SUBJECTS = (
    "Science",
    "Startups",
    "Design",
    "Football",
    "Jazz",
    "Economics",
    "Climate",
    "Cooking",
    "Privacy",
    "Naïve Bayes",
    "Fjords",
    "夜の散歩",
    "ラーメン",
    "Smørrebrød",
    "Histoire",
)
_TITLE_SUFFIXES = (
    "",
    "",
    "",
    " Weekly",
    " Live",
    " 🎧",
    " 🚀",
    " — Part 2",
    " (Director\u2019s cut)",
)


class GeneratorError(RuntimeError):
    """The traffic generator cannot run; the message says what to do."""


@dataclass(frozen=True)
class TrafficOptions:
    rate: float = 50.0
    duration_s: float | None = None
    update_ratio: float = 0.05
    delete_ratio: float = 0.02
    invalid_ratio: float = 0.0
    content_update_ratio: float = 0.001
    max_events_per_txn: int = 5
    workers: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(
                f"rate must be a positive number of changes per second, not {self.rate}"
            )
        if self.duration_s is not None and self.duration_s < 0:
            raise ValueError(f"duration_s must be >= 0 or None, not {self.duration_s}")
        ratios = (
            self.update_ratio,
            self.delete_ratio,
            self.invalid_ratio,
            self.content_update_ratio,
        )
        if any(not 0.0 <= r <= 1.0 for r in ratios) or sum(ratios) > 1.0:
            raise ValueError(
                "update, delete, invalid and content-update ratios must each be in [0, 1] and "
                f"sum to at most 1 (the rest are inserts); got {ratios}"
            )
        if self.max_events_per_txn < 1:
            raise ValueError(f"max_events_per_txn must be >= 1, not {self.max_events_per_txn}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, not {self.workers}")


@dataclass(frozen=True)
class TrafficReport:
    inserted: int
    updated: int
    deleted: int
    invalid: int
    content_updated: int
    transactions: int
    elapsed_s: float

    @property
    def changes(self) -> int:
        return self.inserted + self.updated + self.deleted + self.invalid + self.content_updated

    @property
    def events_per_s(self) -> float:
        return self.changes / self.elapsed_s if self.elapsed_s > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Row building: pure functions of a random.Random, so tests check realism without a database.
# ---------------------------------------------------------------------------------------------


def zipf_cum_weights(n: int, s: float) -> list[float]:
    """Cumulative weights 1/rank^s for ranks 1..n, for `random.choices(cum_weights=...)`."""
    return list(itertools.accumulate(1.0 / rank**s for rank in range(1, n + 1)))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass(frozen=True)
class Catalog:
    """What traffic is drawn from: content ranked by popularity and a skewed pool of users."""

    content_ids: tuple[str, ...]
    content_types: tuple[str | None, ...]
    content_lengths: tuple[int | None, ...]
    content_cum_weights: tuple[float, ...]
    user_ids: tuple[str, ...]
    user_cum_weights: tuple[float, ...]

    @classmethod
    def build(
        cls,
        content: Sequence[tuple[str, str | None, int | None]],
        rng: random.Random,
        *,
        users: int = USER_POOL,
    ) -> Catalog:
        """Rank `content` (id, content_type, length_seconds) in a random popularity order."""
        if not content:
            raise GeneratorError(
                "table `content` is empty: there is nothing to engage with. "
                "Run `engagement seed` (or seed_content) first."
            )
        ranked = sorted(content)
        rng.shuffle(ranked)
        return cls(
            content_ids=tuple(c[0] for c in ranked),
            content_types=tuple(c[1] for c in ranked),
            content_lengths=tuple(c[2] for c in ranked),
            content_cum_weights=tuple(zipf_cum_weights(len(ranked), ZIPF_S)),
            user_ids=tuple(random_uuid(rng) for _ in range(users)),
            user_cum_weights=tuple(zipf_cum_weights(users, USER_ZIPF_S)),
        )


def _lognormal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> float:
    return min(high, max(low, rng.lognormvariate(math.log(median), sigma)))


def plausible_length_seconds(rng: random.Random, content_type: str | None) -> int | None:
    """Length of a piece of content: ~10% unknown (NULL), ~1% zero, else plausible per type."""
    r = rng.random()
    if r < 0.10:
        return None
    if r < 0.11:
        return 0
    if content_type == "podcast":
        return round(_lognormal(rng, 40 * 60, 0.6, 5 * 60, 4 * 3600))
    if content_type == "video":
        return round(_lognormal(rng, 8 * 60, 0.9, 15, 3 * 3600))
    return round(_lognormal(rng, 5 * 60, 0.5, 30, 45 * 60))  # newsletter: reading time


def _title(rng: random.Random) -> str:
    return (
        f"{rng.choice(_TITLE_OPENERS)} {rng.choice(_TITLE_SUBJECTS)}{rng.choice(_TITLE_SUFFIXES)}"
    )


def slugify(title: str) -> str:
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    words = "".join(c if c.isalnum() else " " for c in ascii_title.lower()).split()
    return "-".join(words) or "untitled"


def make_content(rng: random.Random, now: datetime) -> ContentRow:
    """One content row in CONTENT_COLUMNS order, published in the past (mostly recently)."""
    title = _title(rng)
    content_type = rng.choices(CONTENT_TYPES, weights=_CONTENT_TYPE_WEIGHTS)[0]
    age = timedelta(days=min(rng.expovariate(1 / 120), 5 * 365), minutes=rng.randint(5, 600))
    return (
        random_uuid(rng),
        f"{slugify(title)}-{rng.getrandbits(32):08x}",
        title,
        content_type,
        plausible_length_seconds(rng, content_type),
        now - age,
    )


def plausible_duration_ms(rng: random.Random, event_type: str, length: int | None) -> int | None:
    """Milliseconds engaged, as the client reports them: ~5% missing (NULL)."""
    if rng.random() < NULL_DURATION_SHARE:
        return None
    if event_type == "click":
        return rng.randint(0, 1_500)
    if event_type == "finish":
        if length:
            return round(length * 1000 * rng.uniform(0.85, 1.02))
        return round(_lognormal(rng, 20 * 60_000, 0.8, 10_000, 4 * 3600_000))
    if event_type == "play" and length:
        return round(length * 1000 * rng.betavariate(1.2, 3.0))
    median = 90_000 if event_type == "play" else 40_000
    return round(_lognormal(rng, median, 1.0, 500, 4 * 3600_000))


def _payload(rng: random.Random, device: str) -> str:
    payload: dict[str, object] = {
        "app_version": rng.choice(_APP_VERSIONS),
        "session_id": f"{rng.getrandbits(64):016x}",
        "referrer": rng.choice(_REFERRERS),
    }
    if rng.random() < 0.7:
        payload["locale"] = rng.choice(_LOCALES)
    if device in ("smart_tv", "desktop") and rng.random() < 0.5:
        payload["screen"] = rng.choice(("1920x1080", "3840x2160", "2560x1440"))
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _event_ts(rng: random.Random, now: datetime) -> datetime:
    if rng.random() < LATE_EVENT_SHARE:
        # Offline clients and retries deliver some events late: seconds to a few minutes.
        return now - timedelta(seconds=min(rng.expovariate(1 / 30), 300) + 1)
    return now


def make_events(
    rng: random.Random,
    catalog: Catalog,
    now: datetime,
    k: int,
    *,
    allow_orphans: bool = False,
) -> list[EventRow]:
    """`k` valid event rows in EVENT_COLUMNS order.

    With `allow_orphans` (the source has no FK on content_id) a small share points at content that
    does not exist: still valid, the pipeline enriches it with NULL content fields.
    """
    picks = rng.choices(
        range(len(catalog.content_ids)), cum_weights=catalog.content_cum_weights, k=k
    )
    users = rng.choices(catalog.user_ids, cum_weights=catalog.user_cum_weights, k=k)
    event_types = rng.choices(EVENT_TYPES, weights=_EVENT_TYPE_WEIGHTS, k=k)
    devices = rng.choices(DEVICES, weights=_DEVICE_WEIGHTS, k=k)
    rows: list[EventRow] = []
    for pick, user, event_type, device in zip(picks, users, event_types, devices, strict=True):
        content_id = catalog.content_ids[pick]
        if allow_orphans and rng.random() < ORPHAN_SHARE:
            content_id = random_uuid(rng)
        duration = plausible_duration_ms(rng, event_type, catalog.content_lengths[pick])
        rows.append(
            (
                content_id,
                user,
                event_type,
                _event_ts(rng, now),
                duration,
                device,
                _payload(rng, device),
            )
        )
    return rows


def make_invalid_event(rng: random.Random, catalog: Catalog, now: datetime, kind: str) -> EventRow:
    """An otherwise valid event row with exactly the one defect `kind` (one of INVALID_KINDS)."""
    content_id, user, event_type, event_ts, duration, device, payload = make_events(
        rng, catalog, now, 1
    )[0]
    if kind == "null_event_ts":
        event_ts = None
    elif kind == "future_event_ts":
        event_ts = now + FUTURE_OFFSET
    elif kind == "negative_duration":
        duration = -rng.randint(1, 600_000)
    elif kind == "null_content_id":
        content_id = None
    elif kind == "unknown_event_type":
        event_type = rng.choice(_UNKNOWN_EVENT_TYPES)
    elif kind == "undecodable_payload":
        payload = rng.choice(_NON_OBJECT_PAYLOADS)
    else:
        raise ValueError(f"unknown invalid kind {kind!r}; expected one of {INVALID_KINDS}")
    return (content_id, user, event_type, event_ts, duration, device, payload)


def transaction_size(rng: random.Random, max_changes: int) -> int:
    """Changes in one transaction: 1..max, halving in likelihood with each extra change."""
    if max_changes <= 1:
        return 1
    weights = [0.5**i for i in range(max_changes)]
    return rng.choices(range(1, max_changes + 1), weights=weights)[0]


@dataclass(frozen=True)
class PlannedTransaction:
    """One transaction's changes, as an application would commit them."""

    events: tuple[EventRow, ...]  # the valid rows first, then the invalid ones
    valid_events: int
    invalid_kinds: tuple[str, ...]  # the defect of each invalid row, in order
    duration_updates: tuple[tuple[int, int], ...]  # (duration_ms, event_id)
    content_moves: tuple[tuple[str, int], ...]  # (content_id, event_id)
    deletes: tuple[int, ...]
    content_updates: tuple[tuple[str, int | None, str], ...]  # (title, length_seconds, id)

    @property
    def changes(self) -> int:
        return (
            len(self.events)
            + len(self.duration_updates)
            + len(self.content_moves)
            + len(self.deletes)
            + len(self.content_updates)
        )

    def sql(self) -> tuple[str, list[object]]:
        """One query string holding every statement, the multi-row INSERT last, and its values.

        Several statements in one simple-protocol query run as one implicit transaction on an
        autocommit connection: one round trip per commit. The INSERT comes last so that the
        result the driver returns is its RETURNING id, in VALUES order.
        """
        statements: list[str] = []
        params: list[object] = []
        for duration, event_id in self.duration_updates:
            statements.append(UPDATE_EVENT_DURATION)
            params += (duration, event_id)
        for content_id, event_id in self.content_moves:
            statements.append(UPDATE_EVENT_CONTENT)
            params += (content_id, event_id)
        for event_id in self.deletes:
            statements.append(DELETE_EVENT)
            params.append(event_id)
        for update in self.content_updates:
            statements.append(UPDATE_CONTENT)
            params += update
        if self.events:
            values = ", ".join([EVENT_VALUES] * len(self.events))
            statements.append(f"{INSERT_EVENTS}{values} RETURNING id")
            for row in self.events:
                params += row
        return "; ".join(statements), params


class TrafficMix:
    """Plans transactions for one connection: the change mix of TrafficOptions, no I/O.

    It remembers the ids of recently inserted valid events (fed back through `inserted`) so
    updates and deletes hit recent events; invalid rows are never updated or deleted, so each
    keeps exactly its one defect. Invalid kinds come round-robin, so all occur early.
    """

    def __init__(
        self,
        options: TrafficOptions,
        catalog: Catalog,
        rng: random.Random,
        *,
        allow_orphans: bool = False,
    ) -> None:
        self.catalog = catalog
        self.rng = rng
        self.allow_orphans = allow_orphans
        self.max_changes = options.max_events_per_txn
        self.recent: deque[tuple[int, str | None]] = deque(maxlen=RECENT_IDS)  # (id, content)
        self._invalid_kinds = itertools.cycle(INVALID_KINDS)
        o = options
        # Cumulative thresholds over one uniform draw: update, delete, invalid, content, insert.
        self._update, self._delete, self._invalid, self._content = itertools.accumulate(
            (o.update_ratio, o.delete_ratio, o.invalid_ratio, o.content_update_ratio)
        )

    def next_transaction(self, now: datetime) -> PlannedTransaction:
        rng, catalog, recent = self.rng, self.catalog, self.recent
        valid = 0
        invalid_kinds: list[str] = []
        duration_updates: list[tuple[int, int]] = []
        content_moves: list[tuple[str, int]] = []
        deletes: list[int] = []
        content_updates: list[tuple[str, int | None, str]] = []
        for _ in range(transaction_size(rng, self.max_changes)):
            r = rng.random()
            if r < self._update and recent:
                index = rng.randrange(len(recent))
                event_id, content_id = recent[index]
                new_content = self._other_content(content_id) if rng.random() < 0.3 else None
                if new_content is not None:
                    content_moves.append((new_content, event_id))
                    recent[index] = (event_id, new_content)
                else:
                    duration_updates.append((rng.randint(500, 3_600_000), event_id))
            elif self._update <= r < self._delete and recent:
                index = rng.randrange(len(recent))
                deletes.append(recent[index][0])
                del recent[index]
            elif self._delete <= r < self._invalid:
                invalid_kinds.append(next(self._invalid_kinds))
            elif self._invalid <= r < self._content:
                pick = rng.randrange(len(catalog.content_ids))
                title = _title(rng)
                if rng.random() < 0.5:
                    title += rng.choice((" (updated)", " — remastered", " ✨"))
                length = plausible_length_seconds(rng, catalog.content_types[pick])
                content_updates.append((title, length, catalog.content_ids[pick]))
            else:  # an insert, or an update/delete with no recent event to act on yet
                valid += 1
        events = make_events(rng, catalog, now, valid, allow_orphans=self.allow_orphans)
        events += [make_invalid_event(rng, catalog, now, kind) for kind in invalid_kinds]
        return PlannedTransaction(
            events=tuple(events),
            valid_events=valid,
            invalid_kinds=tuple(invalid_kinds),
            duration_updates=tuple(duration_updates),
            content_moves=tuple(content_moves),
            deletes=tuple(deletes),
            content_updates=tuple(content_updates),
        )

    def inserted(self, txn: PlannedTransaction, ids: Sequence[int]) -> None:
        """Feed back the RETURNING ids of `txn`'s INSERT; its valid events become targets."""
        self.recent.extend(
            zip(ids[: txn.valid_events], (row[0] for row in txn.events), strict=False)
        )

    def _other_content(self, content_id: str | None) -> str | None:
        """Popular content other than `content_id` to move an event to; None if there is none."""
        for _ in range(5):
            picked = self.rng.choices(
                self.catalog.content_ids, cum_weights=self.catalog.content_cum_weights
            )[0]
            if picked != content_id:
                return picked
        return None


# ---------------------------------------------------------------------------------------------
# One worker: one connection committing paced transactions.
# ---------------------------------------------------------------------------------------------


class Pacer:
    """Wall-clock pacing: change number n is due at origin + n / rate.

    The offered rate holds over time without drift, and a short stall is caught up; after a long
    one, the backlog beyond `max_backlog_s` of traffic is forgotten rather than burst out.
    """

    def __init__(self, rate: float, started: float, max_backlog_s: float = MAX_BACKLOG_S) -> None:
        self.rate = rate
        self.origin = started
        self.max_backlog_s = max_backlog_s

    def wait_s(self, now: float, offered: int) -> float:
        """Seconds to wait before offering change number `offered` (0 when it is due)."""
        due = self.origin + offered / self.rate
        if now - due > self.max_backlog_s:
            self.origin += now - due - self.max_backlog_s
            due = now - self.max_backlog_s
        return max(0.0, due - now)


@dataclass
class _Totals:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    invalid: int = 0
    content_updated: int = 0
    transactions: int = 0

    def add(self, txn: PlannedTransaction) -> None:
        self.inserted += txn.valid_events
        self.invalid += len(txn.invalid_kinds)
        self.updated += len(txn.duration_updates) + len(txn.content_moves)
        self.deleted += len(txn.deletes)
        self.content_updated += len(txn.content_updates)
        self.transactions += 1


class _Worker:
    def __init__(self, dsn: str, mix: TrafficMix, rate: float, halt: threading.Event) -> None:
        self.dsn = dsn
        self.mix = mix
        self.rate = rate
        self.halt = halt
        self.totals = _Totals()
        self.error: BaseException | None = None

    def run(self, started: float, deadline: float | None) -> None:
        try:
            with connect(self.dsn) as conn:
                self._run(conn, started, deadline)
        except BaseException as exc:  # raised again by run_traffic in the caller's thread
            self.error = exc
            self.halt.set()

    def _run(
        self, conn: psycopg2.extensions.connection, started: float, deadline: float | None
    ) -> None:
        with conn.cursor() as cur:
            # A load generator may lose its last few hundred milliseconds of traffic if the server
            # crashes; in exchange commits do not wait for the WAL flush, so one connection can
            # commit thousands of small transactions a second. Commit order, and so the change
            # stream, is unchanged; run_traffic waits for the flush before it returns.
            cur.execute("SET synchronous_commit = off")
            pacer = Pacer(self.rate, started)
            offered = 0
            while not self.halt.is_set():
                now = time.monotonic()
                wait = pacer.wait_s(now, offered)
                if deadline is not None and now + wait >= deadline:
                    return
                if wait > 0 and self.halt.wait(wait):
                    return
                txn = self.mix.next_transaction(datetime.now(UTC))
                query, params = txn.sql()
                cur.execute(query, params)
                if txn.events:
                    self.mix.inserted(txn, [row[0] for row in cur.fetchall()])
                self.totals.add(txn)
                offered += txn.changes


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def seed_content(dsn: str, count: int = 500, *, seed: int | None = None) -> int:
    """Insert demo content until the table holds at least `count` rows; return rows added."""
    rng = random.Random(seed)
    added = 0
    with connect(dsn) as conn, conn.cursor() as cur:
        _execute_on_schema(cur, COUNT_CONTENT)
        row = cur.fetchone()
        missing = count - (row[0] if row else 0)
        # A collision (the same seed twice, a concurrent seeder) inserts nothing; draw again.
        for _ in range(10):
            if added >= missing:
                break
            now = datetime.now(UTC)
            with conn:  # one transaction per round
                for _ in range(missing - added):
                    cur.execute(INSERT_CONTENT, make_content(rng, now))
                    added += cur.rowcount
    if added < missing:
        raise GeneratorError(f"could add only {added} of {missing} content rows (slug collisions)")
    return added


def _execute_on_schema(cur: psycopg2.extensions.cursor, query: str) -> None:
    try:
        cur.execute(query)
    except psycopg2.errors.UndefinedTable as exc:
        raise GeneratorError(
            f"the source schema is missing ({exc.pgerror.strip() if exc.pgerror else exc}). "
            "Run `engagement db init` first."
        ) from exc


def content_has_foreign_key(dsn: str) -> bool:
    """True when engagement_events.content_id REFERENCES content (the schema of `db init`)."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(CONTENT_FK_EXISTS)
        row = cur.fetchone()
    return bool(row and row[0])


def _load_content(dsn: str) -> list[tuple[str, str | None, int | None]]:
    with connect(dsn) as conn, conn.cursor() as cur:
        _execute_on_schema(cur, LOAD_CONTENT)
        return list(cur.fetchall())


def _wait_for_wal_flush(dsn: str, timeout_s: float = 5.0) -> None:
    """Return once every commit of the run is flushed, so the change stream can decode it.

    The workers commit asynchronously and logical decoding reads only flushed WAL: without this
    wait, the last ~200 ms of traffic would reach the stream only after the WAL writer's next
    flush, and a caller that generates, then streams "until caught up", would miss them.
    """
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(WAL_INSERT_LSN)
        (target,) = cur.fetchone() or ("0/0",)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            cur.execute(WAL_FLUSHED_PAST, (target,))
            row = cur.fetchone()
            if row and row[0]:
                return
            time.sleep(0.02)


def _snapshot(workers: Sequence[_Worker], started: float) -> TrafficReport:
    totals = [w.totals for w in workers]
    return TrafficReport(
        inserted=sum(t.inserted for t in totals),
        updated=sum(t.updated for t in totals),
        deleted=sum(t.deleted for t in totals),
        invalid=sum(t.invalid for t in totals),
        content_updated=sum(t.content_updated for t in totals),
        transactions=sum(t.transactions for t in totals),
        elapsed_s=time.monotonic() - started,
    )


def run_traffic(
    dsn: str,
    options: TrafficOptions,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[TrafficReport], None] | None = None,
) -> TrafficReport:
    """Offer `options.rate` changes per second until `duration_s` passes or `stop` is set.

    Each worker thread holds one connection and paces rate/workers; `on_progress` gets the
    running totals about once a second, in the caller's thread. A worker's error stops all of
    them and is raised here.
    """
    rng = random.Random(options.seed)
    catalog = Catalog.build(_load_content(dsn), rng)
    allow_orphans = not content_has_foreign_key(dsn)
    halt = threading.Event()
    workers = [
        _Worker(
            dsn,
            TrafficMix(
                options, catalog, random.Random(rng.getrandbits(64)), allow_orphans=allow_orphans
            ),
            options.rate / options.workers,
            halt,
        )
        for _ in range(options.workers)
    ]
    started = time.monotonic()
    deadline = None if options.duration_s is None else started + options.duration_s
    threads = [
        threading.Thread(
            target=w.run, args=(started, deadline), name=f"engagement-generate-{i}", daemon=True
        )
        for i, w in enumerate(workers)
    ]
    for t in threads:
        t.start()
    next_progress = started + 1.0
    try:
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(timeout=0.05)
            if stop is not None and stop.is_set():
                halt.set()
            if on_progress is not None and time.monotonic() >= next_progress:
                next_progress += 1.0
                on_progress(_snapshot(workers, started))
    finally:
        halt.set()
        for t in threads:
            t.join()
    errors = [w.error for w in workers if w.error is not None]
    if errors:
        raise GeneratorError(f"traffic generation failed: {errors[0]}") from errors[0]
    report = _snapshot(workers, started)
    _wait_for_wal_flush(dsn)
    if on_progress is not None:
        on_progress(report)
    return report
