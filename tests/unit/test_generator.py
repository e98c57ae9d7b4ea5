"""The traffic generator's rows and transaction mix, checked without a database."""

from __future__ import annotations

import itertools
import json
import random
import re
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from engagement_dagster.lib import generator
from engagement_dagster.lib.generator import (
    CONTENT_COLUMNS,
    CONTENT_TYPES,
    DEVICES,
    EVENT_COLUMNS,
    EVENT_TYPES,
    INVALID_KINDS,
    Catalog,
    EventRow,
    GeneratorError,
    Pacer,
    PlannedTransaction,
    TrafficMix,
    TrafficOptions,
    TrafficReport,
    make_content,
    make_events,
)
from engagement_dagster.lib.source_db import CREATE_CONTENT, CREATE_ENGAGEMENT_EVENTS

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
EVENTS = 20_000


def defects(row: EventRow, now: datetime) -> set[str]:
    """The reasons DESIGN §5 gives for a dead letter, checked independently of the generator."""
    content_id, _user_id, event_type, event_ts, duration_ms, _device, raw_payload = row
    found = set()
    if event_ts is None:
        found.add("null_event_ts")
    elif event_ts > now + timedelta(days=1):
        found.add("future_event_ts")
    if duration_ms is not None and duration_ms < 0:
        found.add("negative_duration")
    if content_id is None:
        found.add("null_content_id")
    if event_type not in {"play", "pause", "finish", "click"}:
        found.add("unknown_event_type")
    try:
        decodable = isinstance(json.loads(raw_payload), dict)
    except ValueError:
        decodable = False
    if not decodable:
        found.add("undecodable_payload")
    return found


def is_uuid(value: object) -> bool:
    try:
        return str(uuid.UUID(str(value))) == value
    except ValueError:
        return False


def table_columns(ddl: str) -> list[str]:
    body = ddl[ddl.index("(") + 1 : ddl.rindex(")")]
    return [line.split()[0] for line in body.strip().splitlines()]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    rng = random.Random(11)
    content = [make_content(rng, NOW) for _ in range(500)]
    return Catalog.build([(c[0], c[3], c[4]) for c in content], rng)


@pytest.fixture(scope="module")
def events(catalog: Catalog) -> list[EventRow]:
    rng = random.Random(12)
    rows: list[EventRow] = []
    while len(rows) < EVENTS:
        rows += make_events(rng, catalog, NOW, generator.transaction_size(rng, 5))
    return rows


def plan(
    catalog: Catalog, options: TrafficOptions, transactions: int, **kwargs: bool
) -> list[PlannedTransaction]:
    """Run a TrafficMix as a worker would, with the database's ids made up."""
    mix = TrafficMix(options, catalog, random.Random(options.seed), **kwargs)
    ids = itertools.count(1)
    planned = []
    for _ in range(transactions):
        txn = mix.next_transaction(NOW)
        mix.inserted(txn, [next(ids) for _ in txn.events])
        planned.append(txn)
    return planned


def test_event_rows_have_the_insert_column_order(events: list[EventRow]) -> None:
    schema = table_columns(CREATE_ENGAGEMENT_EVENTS)
    assert list(EVENT_COLUMNS) == [c for c in schema if c != "id"]
    assert list(CONTENT_COLUMNS) == table_columns(CREATE_CONTENT)
    for content_id, user_id, event_type, event_ts, duration_ms, device, payload in events[:2000]:
        assert is_uuid(content_id) and is_uuid(user_id)
        assert event_type in EVENT_TYPES and device in DEVICES
        assert isinstance(event_ts, datetime) and event_ts.tzinfo is not None
        assert duration_ms is None or (isinstance(duration_ms, int) and duration_ms >= 0)
        assert isinstance(json.loads(payload), dict)


def test_planned_sql_puts_one_multi_row_insert_last(catalog: Catalog) -> None:
    options = TrafficOptions(update_ratio=0.2, delete_ratio=0.1, content_update_ratio=0.1, seed=3)
    for txn in plan(catalog, options, 300):
        query, params = txn.sql()
        statements = query.split("; ")
        assert query.count("%s") == len(params)
        assert sum(s.startswith("INSERT") for s in statements) == (1 if txn.events else 0)
        if txn.events:
            insert = statements[-1]
            assert insert.startswith(f"INSERT INTO engagement_events ({', '.join(EVENT_COLUMNS)})")
            assert insert.endswith("RETURNING id")
            assert insert.count("%s") == len(EVENT_COLUMNS) * len(txn.events)


def test_every_event_type_and_device_occurs(events: list[EventRow]) -> None:
    types = Counter(row[2] for row in events)
    devices = Counter(row[5] for row in events)
    assert set(types) == set(EVENT_TYPES)
    assert set(devices) == set(DEVICES)
    assert min(types.values()) > 0.05 * len(events)
    assert min(devices.values()) > 0.02 * len(events)


def test_about_five_percent_of_durations_are_null(events: list[EventRow]) -> None:
    share = sum(row[4] is None for row in events) / len(events)
    assert 0.03 <= share <= 0.07


def test_durations_are_plausible_per_event_type(catalog: Catalog, events: list[EventRow]) -> None:
    lengths = dict(zip(catalog.content_ids, catalog.content_lengths, strict=True))
    by_type: dict[str, list[int]] = {t: [] for t in EVENT_TYPES}
    for content_id, _, event_type, _, duration_ms, _, _ in events:
        if duration_ms is not None:
            by_type[event_type].append(duration_ms)
        assert content_id is not None
        length = lengths[content_id]
        if event_type == "finish" and duration_ms is not None and length:
            assert 0.8 * length * 1000 <= duration_ms <= 1.05 * length * 1000
    assert max(by_type["click"]) <= 2_000
    assert all(0 < d <= 4 * 3600_000 for t in ("play", "pause") for d in by_type[t])


def test_popularity_is_skewed(catalog: Catalog, events: list[EventRow]) -> None:
    per_content = Counter(row[0] for row in events)
    top_tenth = sum(n for _, n in per_content.most_common(len(catalog.content_ids) // 10))
    assert top_tenth > 0.5 * len(events)
    per_user = Counter(row[1] for row in events)
    assert len(per_user) > 5_000  # a broad audience
    assert per_user.most_common(1)[0][1] > 20  # with heavy users


def test_a_few_events_arrive_late_none_from_the_future(events: list[EventRow]) -> None:
    lateness = [NOW - row[3] for row in events if row[3] is not None]
    late = [d for d in lateness if d > timedelta(0)]
    assert 0.01 * len(events) <= len(late) <= 0.06 * len(events)
    assert all(timedelta(0) <= d <= timedelta(minutes=6) for d in lateness)


def test_payloads_carry_app_version_session_and_referrer(events: list[EventRow]) -> None:
    payloads = [json.loads(row[6]) for row in events[:2000]]
    assert all({"app_version", "session_id", "referrer"} <= p.keys() for p in payloads)
    assert any("locale" in p for p in payloads)


def test_content_is_realistic() -> None:
    rng = random.Random(5)
    rows = [make_content(rng, NOW) for _ in range(3000)]
    ids, slugs, titles, types, lengths, published = zip(*rows, strict=True)
    assert len(set(ids)) == len(set(slugs)) == len(rows)
    assert all(re.fullmatch(r"[a-z0-9-]+", s) for s in slugs)
    assert set(types) == set(CONTENT_TYPES)
    assert any(re.search(r"[À-ɏ]", t) for t in titles)  # accents
    assert any(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", t) for t in titles)  # CJK
    assert any(re.search(r"[\U0001F300-\U0001FAFF]", t) for t in titles)  # emoji
    null_share = sum(v is None for v in lengths) / len(rows)
    assert 0.08 <= null_share <= 0.12
    assert 0 < sum(v == 0 for v in lengths) < 0.03 * len(rows)
    assert all(p < NOW for p in published)
    for content_type, length in zip(types, lengths, strict=True):
        if length:
            ceiling = {"podcast": 4 * 3600, "video": 3 * 3600, "newsletter": 45 * 60}
            assert 15 <= length <= ceiling[content_type]


def test_every_invalid_kind_occurs_and_each_invalid_row_is_invalid(catalog: Catalog) -> None:
    planned = plan(catalog, TrafficOptions(invalid_ratio=0.05, seed=8), 10_000)
    kinds: Counter[str] = Counter()
    for txn in planned:
        valid, invalid = txn.events[: txn.valid_events], txn.events[txn.valid_events :]
        assert all(defects(row, NOW) == set() for row in valid)
        for kind, row in zip(txn.invalid_kinds, invalid, strict=True):
            assert defects(row, NOW) == {kind}
            kinds[kind] += 1
    assert set(kinds) == set(INVALID_KINDS)
    assert min(kinds.values()) > 0.1 * sum(kinds.values()) / len(INVALID_KINDS)


def test_no_invalid_rows_without_an_invalid_ratio(catalog: Catalog) -> None:
    planned = plan(catalog, TrafficOptions(invalid_ratio=0.0, seed=9), 2_000)
    assert all(defects(row, NOW) == set() for txn in planned for row in txn.events)


def test_change_mix_and_transaction_sizes(catalog: Catalog) -> None:
    options = TrafficOptions(
        update_ratio=0.1, delete_ratio=0.05, invalid_ratio=0.03, content_update_ratio=0.02, seed=4
    )
    planned = plan(catalog, options, 10_000)
    sizes = Counter(txn.changes for txn in planned)
    assert set(sizes) <= set(range(1, options.max_events_per_txn + 1))
    assert set(sizes) == set(range(1, options.max_events_per_txn + 1))
    assert sum(sizes[n] for n in (1, 2, 3)) > 0.8 * len(planned)

    changes = sum(sizes.elements())
    updates = sum(len(t.duration_updates) + len(t.content_moves) for t in planned)
    assert abs(updates / changes - 0.1) < 0.015
    assert abs(sum(len(t.deletes) for t in planned) / changes - 0.05) < 0.01
    assert abs(sum(len(t.invalid_kinds) for t in planned) / changes - 0.03) < 0.008
    assert abs(sum(len(t.content_updates) for t in planned) / changes - 0.02) < 0.006
    assert sum(len(t.content_moves) for t in planned) > 0.2 * updates
    assert sum(len(t.duration_updates) for t in planned) > 0.5 * updates


def test_updates_and_deletes_hit_only_live_valid_events(catalog: Catalog) -> None:
    options = TrafficOptions(update_ratio=0.2, delete_ratio=0.1, invalid_ratio=0.05, seed=6)
    mix = TrafficMix(options, catalog, random.Random(6))
    ids = itertools.count(1)
    valid_ids: set[int] = set()
    deleted: set[int] = set()
    content_of: dict[int, str | None] = {}
    for _ in range(5_000):
        txn = mix.next_transaction(NOW)
        targets = [e for _, e in txn.duration_updates] + [e for _, e in txn.content_moves]
        assert set(targets) <= valid_ids - deleted
        assert set(txn.deletes) <= valid_ids - deleted
        assert len(set(txn.deletes)) == len(txn.deletes)
        deleted |= set(txn.deletes)
        for new_content, event_id in txn.content_moves:
            assert new_content in catalog.content_ids
            assert new_content != content_of[event_id], "a move must change content_id"
            content_of[event_id] = new_content
        for title, length, content_id in txn.content_updates:
            assert title and content_id in catalog.content_ids
            assert length is None or length >= 0
        returned = [next(ids) for _ in txn.events]
        valid_ids |= set(returned[: txn.valid_events])
        content_of.update(zip(returned, (row[0] for row in txn.events), strict=True))
        mix.inserted(txn, returned)
    assert deleted


def test_unknown_content_ids_only_without_a_foreign_key(catalog: Catalog) -> None:
    known = set(catalog.content_ids)
    without_fk = make_events(random.Random(1), catalog, NOW, EVENTS, allow_orphans=True)
    orphans = [row for row in without_fk if row[0] not in known]
    assert 0 < len(orphans) < 0.02 * EVENTS
    assert all(is_uuid(row[0]) and defects(row, NOW) == set() for row in orphans)
    with_fk = make_events(random.Random(1), catalog, NOW, EVENTS)
    assert all(row[0] in known for row in with_fk)


def test_same_seed_same_traffic(catalog: Catalog) -> None:
    first = plan(catalog, TrafficOptions(invalid_ratio=0.1, seed=21), 200)
    again = plan(catalog, TrafficOptions(invalid_ratio=0.1, seed=21), 200)
    assert first == again


def offered_by_pacer(
    rate: float, duration_s: float, *, stall_at: float = -1.0, stall_s: float = 0.0
) -> tuple[int, int]:
    """Simulate a worker whose commits take 0.2 ms, one of them `stall_s` more; no sleeping.

    Returns the changes offered in `duration_s` and the most offered in any second.
    """
    pacer, now, offered, per_second = Pacer(rate, 0.0), 0.0, 0, Counter[int]()
    while True:
        wait = pacer.wait_s(now, offered)
        if now + wait >= duration_s:
            return offered, max(per_second.values())
        now += wait
        if stall_at <= now and stall_s:
            now, stall_s = now + stall_s, 0.0
        now += 0.0002
        offered += 2
        per_second[int(now)] += 2


def test_pacing_holds_the_rate_without_drift() -> None:
    offered, busiest = offered_by_pacer(1_000, 30)
    assert abs(offered - 30_000) <= 4
    assert busiest <= 1_004


def test_pacing_catches_up_a_short_stall() -> None:
    offered, busiest = offered_by_pacer(1_000, 10, stall_at=3, stall_s=0.6)
    assert abs(offered - 10_000) <= 4
    assert busiest <= 2_004  # the stalled 0.6 s are made up within about a second


def test_pacing_forgets_backlog_beyond_a_second() -> None:
    offered, busiest = offered_by_pacer(1_000, 10, stall_at=3, stall_s=4)
    assert abs(offered - 1_000 * (10 - 4 + 1)) <= 4
    assert busiest <= 2_004  # one second of backlog on top of the rate, no more


def test_empty_content_says_to_seed_first() -> None:
    with pytest.raises(GeneratorError, match="seed"):
        Catalog.build([], random.Random(1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0},
        {"rate": float("inf")},
        {"duration_s": -1},
        {"update_ratio": 0.6, "delete_ratio": 0.5},
        {"invalid_ratio": -0.1},
        {"max_events_per_txn": 0},
        {"workers": 0},
    ],
)
def test_options_are_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TrafficOptions(**kwargs)  # type: ignore[arg-type]


def test_report_rate_counts_every_change() -> None:
    report = TrafficReport(
        inserted=70,
        updated=10,
        deleted=5,
        invalid=10,
        content_updated=5,
        transactions=60,
        elapsed_s=2.0,
    )
    assert report.events_per_s == 50.0
    assert TrafficReport(0, 0, 0, 0, 0, 0, 0.0).events_per_s == 0.0
