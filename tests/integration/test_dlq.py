"""`engagement dlq list|replay` on real services: replay delivers what today's rules accept, once.

Dead letters are made the way the stream makes them: `enrich` on a CHANGES_SCHEMA frame of text
images, written through the ClickHouse sink. PostgreSQL holds each event as the test says it is
now. Each test gets its own chDB database and Kafka topic prefix, so nothing else in the session
sees (or adds to) its dead letters, rows and messages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient

from engagement_dagster.lib import dead_letters
from engagement_dagster.lib.clickhouse import chdb_path, clickhouse_client
from engagement_dagster.lib.dead_letters import (
    NOT_REPLAYABLE,
    REPLAYED,
    STILL_INVALID,
    SUPERSEDED,
    DeadLetter,
    plan_replay,
    replay_dead_letters,
    rules_from_env,
)
from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    DEAD_LETTERS_SCHEMA,
    DELTAS_SCHEMA,
    IMAGE_COLUMNS,
    ContentVersion,
    EnrichRules,
    content_versions,
    enrich,
)
from engagement_dagster.lib.kafka_config import kafka_client_config
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.base import SinkBatch
from engagement_dagster.lib.sinks.clickhouse import ClickHouseSink
from engagement_dagster.lib.sinks.kafka import ENRICHED_TOPIC
from engagement_dagster.lib.source_db import connect

BIN = Path(sys.executable).parent
CONTENT = str(uuid.uuid4())
USER = str(uuid.uuid4())
# What pgoutput delivers with TimeZone=UTC, DateStyle=ISO, and canonical jsonb text.
EVENT_TS = "2026-11-20 10:00:05.123456+00"
PAYLOAD = '{"app": "ios"}'
COMMITTED = datetime(2026, 11, 20, 10, 0, 6, tzinfo=UTC)
ALLOW_SHARE = {"ENGAGEMENT_EXTRA_EVENT_TYPES": "share"}
Image = dict[str, str | None]


def image(event_id: int, event_type: str = "share", duration: str | None = "1000") -> Image:
    return {
        "id": str(event_id),
        "content_id": CONTENT,
        "user_id": USER,
        "event_type": event_type,
        "event_ts": EVENT_TS,
        "duration_ms": duration,
        "device": "ios",
        "raw_payload": PAYLOAD,
    }


@dataclass(frozen=True)
class Change:
    """One engagement_events change the stream dead-lettered, and the row PostgreSQL holds now."""

    name: str
    op: str
    new: Image
    old: Image | None
    lsn: int


@dataclass(frozen=True)
class World:
    settings: Settings
    env: dict[str, str]
    changes: tuple[Change, ...]

    def id_of(self, name: str) -> int:
        return int(next(c for c in self.changes if c.name == name).new["id"] or 0)

    def lsn_of(self, name: str) -> int:
        return next(c for c in self.changes if c.name == name).lsn

    @property
    def ids(self) -> list[int]:
        return sorted({int(c.new["id"] or 0) for c in self.changes})


def scenario(base_id: int) -> tuple[tuple[Change, ...], dict[int, Image]]:
    """Dead-lettered changes (LSN order) and what PostgreSQL holds now, by event id.

    With "share" allowed: new, twice-2 and retyped replay; changed (fixed at the source since),
    gone (deleted since) and twice-1 (a later change of its event is a dead letter too) are
    superseded; like and neg still fail.
    """
    lsn = 0x7_0000_0000 + base_id % 1000 * 0x1000
    names = ("new", "changed", "gone", "like", "neg", "twice", "retyped")
    e = {name: base_id + i for i, name in enumerate(names, start=1)}
    changes = (
        Change("new", "insert", image(e["new"]), None, lsn + 1),
        Change("changed", "insert", image(e["changed"]), None, lsn + 2),
        Change("gone", "insert", image(e["gone"]), None, lsn + 3),
        Change("like", "insert", image(e["like"], "like"), None, lsn + 4),
        Change("neg", "insert", image(e["neg"], "play", "-5"), None, lsn + 5),
        Change("twice-1", "insert", image(e["twice"]), None, lsn + 6),
        Change("twice-2", "update", image(e["twice"], duration="1500"), image(e["twice"]), lsn + 7),
        # A valid play updated to a share: the stream tombstoned the play at this LSN.
        Change("retyped", "update", image(e["retyped"]), image(e["retyped"], "play"), lsn + 8),
    )
    postgres = {
        e["new"]: image(e["new"]),
        e["changed"]: image(e["changed"], duration="2000"),
        e["like"]: image(e["like"], "like"),
        e["neg"]: image(e["neg"], "play", "-5"),
        e["twice"]: image(e["twice"], duration="1500"),
        e["retyped"]: image(e["retyped"]),
    }
    return changes, postgres


def changes_frame(changes: tuple[Change, ...]) -> pl.DataFrame:
    records = [
        {
            "seq": seq,
            "op": change.op,
            "source_lsn": change.lsn,
            "source_committed_at": COMMITTED,
            **change.new,
            **{f"old_{k}": v for k, v in (change.old or {}).items()},
        }
        for seq, change in enumerate(changes)
    ]
    return pl.DataFrame(records, schema=CHANGES_SCHEMA)


class LetterWriter(ClickHouseSink):
    """The ClickHouse sink under its own checkpoint name, so the stream's stays untouched."""

    name = "dlq_test"


INSERT_EVENT = """
INSERT INTO engagement_events
    (id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
VALUES (%s::bigint, %s::uuid, %s::uuid, %s, %s::timestamptz, %s::integer, %s, %s::jsonb)
"""


@contextmanager
def dead_letter_world(settings: Settings, source_dsn: str, base_id: int) -> Iterator[World]:
    tag = uuid.uuid4().hex[:8]
    base_path = chdb_path(settings.clickhouse_dsn)
    assert base_path is not None and base_path.parent.name.startswith("test")
    path = base_path.parent / f"clickhouse-dlq-{tag}"
    env = {
        "ENGAGEMENT_CLICKHOUSE_URL": f"chdb://{path}",
        "ENGAGEMENT_KAFKA_TOPIC_PREFIX": f"{settings.kafka_topic_prefix}dlq-{tag}.",
    }
    world_settings = Settings(
        clickhouse_url=env["ENGAGEMENT_CLICKHOUSE_URL"],
        kafka_topic_prefix=env["ENGAGEMENT_KAFKA_TOPIC_PREFIX"],
    )
    changes, postgres = scenario(base_id)
    content = content_versions([ContentVersion(CONTENT, "podcast", 600, 0)])
    enriched = enrich(changes_frame(changes), content)  # today's stream: the default rules
    assert enriched.dead_letters.height == len(changes)
    truncate = pl.DataFrame(
        {
            "source_lsn": [changes[-1].lsn + 1],
            "event_id": [None],
            "reason": ["truncate"],
            "op": ["truncate"],
            "raw_change": ['{"op": "truncate", "table": "engagement_events"}'],
            "source_committed_at": [COMMITTED],
        },
        schema=DEAD_LETTERS_SCHEMA,
    )
    writer = LetterWriter(world_settings.clickhouse_dsn)
    try:
        writer.setup()
        # What the stream wrote for these changes: dead letters, and tombstones of old images.
        assert writer.apply(
            SinkBatch(
                last_lsn=changes[-1].lsn + 1,
                rows=enriched.rows,
                deltas=DELTAS_SCHEMA.to_frame(),
                dead_letters=pl.concat([enriched.dead_letters, truncate]),
            )
        )
    finally:
        writer.close()  # the sink may hold the embedded database between batches
    with connect(source_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO content (id, slug, title, content_type, length_seconds) "
            "VALUES (%s, %s, 'Replayed', 'podcast', 600)",
            (CONTENT, f"dlq-{tag}"),
        )
        for row in postgres.values():
            cur.execute(INSERT_EVENT, [row[c] for c in IMAGE_COLUMNS])
        # The test's images are what PostgreSQL prints, as the decoder would deliver them.
        cur.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
        cur.execute(
            "SELECT event_ts::text, raw_payload::text FROM engagement_events WHERE id = %s",
            (base_id + 1,),
        )
        assert cur.fetchone() == (EVENT_TS, PAYLOAD)
    try:
        yield World(world_settings, env, changes)
    finally:
        with connect(source_dsn) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM engagement_events WHERE id = ANY(%s)", (list(postgres),))
            cur.execute("DELETE FROM content WHERE id = %s", (CONTENT,))
        shutil.rmtree(path, ignore_errors=True)
        Path(f"{path}.lock").unlink(missing_ok=True)


@pytest.fixture
def world(clean_sinks: Settings, source_dsn: str) -> Iterator[World]:
    with dead_letter_world(clean_sinks, source_dsn, base_id=880_000_000) as made:
        yield made


def dlq(world: World, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "engagement"), "dlq", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200", **world.env, **env},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def enriched_rows(world: World) -> dict[int, dict[str, Any]]:
    with clickhouse_client(world.settings.clickhouse_dsn) as client:
        result = client.query(
            "SELECT event_id, source_lsn, is_deleted, event_type, content_type, duration_ms, "
            "engagement_seconds, engagement_pct FROM engagement.enriched_engagements FINAL "
            "WHERE event_id IN {ids:Array(Int64)}",
            parameters={"ids": world.ids},
        )
        return {
            row[0]: dict(zip(result.column_names, row, strict=True)) for row in result.result_rows
        }


def letter_states(world: World) -> dict[int, tuple[int, bool]]:
    """LSN -> (revision, replayed) of the test's dead letters."""
    with clickhouse_client(world.settings.clickhouse_dsn) as client:
        rows = client.query(
            "SELECT lsn, revision, replayed_at IS NOT NULL FROM engagement.dead_letters FINAL"
        ).result_rows
    return {int(lsn): (int(revision), bool(replayed)) for lsn, revision, replayed in rows}


def kafka_messages(world: World) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
    """Every committed message of the world's enriched topic, with its headers."""
    consumer = KafkaConsumer(
        world.settings.kafka_topic_prefix + ENRICHED_TOPIC,
        **kafka_client_config(world.settings),
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    try:
        return [(json.loads(m.value), dict(m.headers or [])) for m in consumer]
    finally:
        consumer.close()


def kafka_topics(settings: Settings) -> set[str]:
    admin = KafkaAdminClient(**kafka_client_config(settings))
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


# --- list -------------------------------------------------------------------------------------


def test_dlq_list_shows_counts_per_reason_and_the_newest_first(world: World) -> None:
    done = dlq(world, "list")
    lines = done.stdout.splitlines()
    counts = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1]}
    assert counts["unknown_event_type"][:2] == ["7", "7"]
    assert counts["negative_duration"][:2] == ["1", "1"]
    assert counts["truncate"][:2] == ["1", "1"]
    assert counts["total"][:2] == ["9", "9"]
    assert "event_type=share" in done.stdout and "table=engagement_events" in done.stdout

    letters = [json.loads(line) for line in dlq(world, "list", "--json").stdout.splitlines()]
    assert len(letters) == 9
    assert [x["lsn"] for x in letters] == sorted((x["lsn"] for x in letters), reverse=True)
    assert letters[0]["reason"] == "truncate" and letters[0]["event_id"] is None
    assert {x["event_id"]: x["reason"] for x in letters[1:]} == {
        world.id_of(c.name): "negative_duration" if c.name == "neg" else "unknown_event_type"
        for c in world.changes
    }
    assert all(x["replayed_at"] is None and x["revision"] == 0 for x in letters)
    assert letters[1]["raw_change"]["op"] == "update"
    assert letters[1]["raw_change"]["old_event_type"] == "play"

    only = dlq(world, "list", "--reason", "negative_duration", "--json").stdout.splitlines()
    assert [json.loads(x)["event_id"] for x in only] == [world.id_of("neg")]
    assert len(dlq(world, "list", "--limit", "2", "--json").stdout.splitlines()) == 2


# --- replay -----------------------------------------------------------------------------------


def summary_line(stdout: str, reason: str) -> list[str]:
    line = next(x for x in stdout.splitlines() if x.split()[:1] == [reason])
    return line.split()


def test_dlq_replay_delivers_what_the_current_rules_accept_once(world: World) -> None:
    letters_before = letter_states(world)

    # With today's rules nothing is valid: a dry run says so and changes nothing.
    unchanged = dlq(world, "replay", "--dry-run")
    assert "would replay 0 dead letters" in unchanged.stdout
    assert summary_line(unchanged.stdout, "unknown_event_type")[1:5] == ["0", "4", "3", "0"]

    # An operator allows "share": the dry run shows the plan, and still writes nothing.
    plan = dlq(world, "replay", "--dry-run", **ALLOW_SHARE)
    assert "dry run: nothing written" in plan.stdout and "would replay 3" in plan.stdout
    assert summary_line(plan.stdout, "unknown_event_type")[1:5] == ["3", "1", "3", "0"]
    assert summary_line(plan.stdout, "negative_duration")[1:5] == ["0", "1", "0", "0"]
    assert summary_line(plan.stdout, "truncate")[1:5] == ["0", "0", "0", "1"]
    assert letter_states(world) == letters_before
    assert not {k: v for k, v in enriched_rows(world).items() if v["is_deleted"] == 0}
    assert world.settings.kafka_topic_prefix + ENRICHED_TOPIC not in kafka_topics(world.settings)

    done = dlq(world, "replay", **ALLOW_SHARE)
    assert "replayed 3 dead letters: 3 rows into ClickHouse and Kafka" in done.stdout
    assert summary_line(done.stdout, "unknown_event_type")[1:5] == ["3", "1", "3", "0"]
    assert "unknown_event_type 1" in done.stdout  # "like" still fails, and says why
    assert f"event {world.id_of('changed')} changed in PostgreSQL since (duration_ms)" in (
        done.stdout
    )
    assert f"event {world.id_of('gone')} was deleted in PostgreSQL since" in done.stdout

    # ClickHouse: the replayed versions at their own LSN, enriched with today's content;
    # the update's live version wins over the tombstone the stream wrote at the same LSN.
    rows = enriched_rows(world)
    live = {event_id: row for event_id, row in rows.items() if row["is_deleted"] == 0}
    assert sorted(live) == sorted(world.id_of(n) for n in ("new", "twice-2", "retyped"))
    new = live[world.id_of("new")]
    assert new["source_lsn"] == world.lsn_of("new") and new["event_type"] == "share"
    assert new["content_type"] == "podcast" and new["engagement_seconds"] == 1.0
    assert new["engagement_pct"] == 0.17
    assert live[world.id_of("twice-2")]["source_lsn"] == world.lsn_of("twice-2")
    assert live[world.id_of("twice-2")]["duration_ms"] == 1500
    assert live[world.id_of("retyped")]["source_lsn"] == world.lsn_of("retyped")

    # Kafka (read_committed): each replayed event once, marked as a replay; nothing superseded.
    messages = kafka_messages(world)
    by_event = [m["event_id"] for m, _ in messages]
    assert sorted(by_event) == sorted(live)
    assert all(h == {"engagement-source": b"dlq-replay"} for _, h in messages)
    assert all(m["schema_version"] == 1 and m["is_deleted"] == 0 for m, _ in messages)

    # The replayed dead letters have a new revision; the others are untouched.
    states = letter_states(world)
    replayed = {world.lsn_of(n) for n in ("new", "twice-2", "retyped")}
    assert {lsn for lsn, (_, done_) in states.items() if done_} == replayed
    assert all(states[lsn] == (1, True) for lsn in replayed)
    assert all(states[lsn] == (0, False) for lsn in set(states) - replayed)
    listed = [json.loads(x) for x in dlq(world, "list", "--json").stdout.splitlines()]
    assert sum(1 for x in listed if x["replayed_at"]) == 3

    # A second replay judges the rest again and delivers nothing new.
    again = dlq(world, "replay", **ALLOW_SHARE)
    assert "replayed 0 dead letters: 0 rows" in again.stdout
    assert summary_line(again.stdout, "unknown_event_type")[1:5] == ["0", "1", "3", "0"]
    assert sorted(m["event_id"] for m, _ in kafka_messages(world)) == sorted(by_event)
    assert letter_states(world) == states


def test_an_interrupted_replay_is_completed_without_sending_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(dsn: str, letters: object) -> None:
        raise RuntimeError("killed after the Kafka commit, before marking")

    rules = rules_from_env(ALLOW_SHARE)
    with monkeypatch.context() as patch:
        patch.setattr(dead_letters, "_mark_replayed", crash)
        with pytest.raises(RuntimeError, match="before marking"):
            replay_dead_letters(world.settings, rules=rules)
    delivered = sorted(m["event_id"] for m, _ in kafka_messages(world))
    assert len(delivered) == 3
    assert not any(replayed for _, replayed in letter_states(world).values())

    done = dlq(world, "replay", **ALLOW_SHARE)
    assert "completed an interrupted replay: 3 dead letters already delivered" in done.stdout
    assert "replayed 0 dead letters" in done.stdout
    assert sorted(m["event_id"] for m, _ in kafka_messages(world)) == delivered
    assert sum(1 for _, replayed in letter_states(world).values() if replayed) == 3


def test_nothing_to_list_or_replay_before_the_stream_made_the_table(
    clean_sinks: Settings, tmp_path: Path
) -> None:
    env = {"ENGAGEMENT_CLICKHOUSE_URL": f"chdb://{tmp_path / 'clickhouse'}"}
    for argv in (["list"], ["replay", "--dry-run"]):
        done = subprocess.run(
            [str(BIN / "engagement"), "dlq", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        assert done.returncode == 0, done.stderr
        assert "engagement.dead_letters does not exist yet" in done.stdout


# --- the decision, on data in memory ------------------------------------------------------------


def letter(
    lsn: int, op: str, new: Image | None, old: Image | None = None, reason: str = "r"
) -> DeadLetter:
    raw: dict[str, Any] = {"op": op, **(new or {})}
    raw.update({f"old_{k}": v for k, v in (old or {}).items()})
    return DeadLetter(
        lsn=lsn,
        event_id=int(new["id"]) if new and new["id"] and new["id"].isdigit() else None,
        reason=reason,
        op=op,
        raw_change=json.dumps(raw),
        source_committed_at=COMMITTED,
        first_seen_at=COMMITTED + timedelta(seconds=1),
        replayed_at=None,
        revision=0,
    )


def test_plan_replay_decides_each_outcome() -> None:
    content = content_versions([ContentVersion(CONTENT, "podcast", 600, 0)])
    rules = EnrichRules(event_types=frozenset({"play", "share"}))
    letters = [
        letter(10, "insert", image(1)),  # valid now
        letter(11, "insert", image(2, "like")),  # still invalid
        letter(12, "insert", image(3)),  # PostgreSQL changed it
        letter(13, "insert", image(4)),  # PostgreSQL deleted it
        letter(14, "insert", image(5)),  # ClickHouse has a later version
        letter(15, "insert", image(6)),  # a later dead letter of the same event
        letter(16, "update", image(6, duration="7"), image(6)),
        DeadLetter(
            17,
            None,
            "truncate",
            "truncate",
            '{"op": "truncate", "table": "t"}',
            COMMITTED,
            COMMITTED,
            None,
            0,
        ),
        letter(18, "insert", image(9, duration="abc") | {"id": "x"}),  # no event id
        DeadLetter(19, 9, "r", "insert", "not json", COMMITTED, COMMITTED, None, 0),
    ]
    current = {
        1: image(1),
        2: image(2, "like"),
        3: image(3, duration="5"),
        5: image(5),
        6: image(6, duration="7"),
    }
    outcomes = plan_replay(letters, current, {5: 99, 1: 10}, content, rules)
    assert [(o.letter.lsn, o.outcome) for o in outcomes] == [
        (10, REPLAYED),
        (11, STILL_INVALID),
        (12, SUPERSEDED),
        (13, SUPERSEDED),
        (14, SUPERSEDED),
        (15, SUPERSEDED),
        (16, REPLAYED),
        (17, NOT_REPLAYABLE),
        (18, NOT_REPLAYABLE),
        (19, NOT_REPLAYABLE),
    ]
    details = [o.detail for o in outcomes]
    assert details[1] == "unknown_event_type"
    assert details[2] == "event 3 changed in PostgreSQL since (duration_ms)"
    assert details[3] == "event 4 was deleted in PostgreSQL since"
    assert details[4] == "ClickHouse holds a later version of event 5 (LSN 0/63)"
    assert details[5] == "a later change of event 6 (LSN 0/10) is a dead letter too"
    assert details[7] == "a truncate is not a row change"


def test_replay_rows_are_the_stream_rows_at_the_letters_lsn() -> None:
    content = content_versions([ContentVersion(CONTENT, "podcast", 600, 0)])
    rules = rules_from_env(ALLOW_SHARE)
    rows = dead_letters.replay_rows([letter(42, "insert", image(7))], content, rules)
    assert rows.select("event_id", "source_lsn", "is_deleted", "engagement_pct").rows() == [
        (7, 42, 0, 0.17)
    ]


def test_rules_from_env_widen_the_event_types_only() -> None:
    defaults = EnrichRules()
    assert rules_from_env({}) == defaults
    widened = rules_from_env({"ENGAGEMENT_EXTRA_EVENT_TYPES": " share, like ,,"})
    assert widened.event_types == defaults.event_types | {"share", "like"}
    assert widened.future_tolerance == defaults.future_tolerance
