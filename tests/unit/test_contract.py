"""The Kafka topics' JSON Schemas (contracts/): valid, versioned like the producer, met by the
messages the sinks build, and backward compatible with their last release (no services)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from jsonschema import Draft202012Validator

from engagement_dagster.lib.contract import (
    ContractError,
    ContractSchema,
    breaking_changes,
    current_schemas,
    load_schema,
    release_problems,
    released_schemas,
)
from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    ContentVersion,
    content_versions,
    enrich,
)
from engagement_dagster.lib.sinks.kafka_contract import (
    DLQ_TOPIC,
    ENRICHED_TOPIC,
    SCHEMA_VERSION,
    dead_letter_values,
    row_messages,
)
from tests.unit.test_enrich import PODCAST, change, image


def schema_of(topic: str) -> ContractSchema:
    (found,) = [s for s in current_schemas() if s.topic == topic]
    return found


def validator(topic: str) -> Draft202012Validator:
    return Draft202012Validator(schema_of(topic).schema)


# --- the repository's schemas ------------------------------------------------------------------


def test_every_contract_topic_has_a_valid_draft_2020_12_schema() -> None:
    schemas = current_schemas()
    assert {s.topic for s in schemas} == {ENRICHED_TOPIC, DLQ_TOPIC}
    for schema in schemas:
        assert schema.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema.schema)


def test_the_enriched_schema_version_is_the_one_the_producer_writes() -> None:
    assert schema_of(ENRICHED_TOPIC).version == SCHEMA_VERSION


def test_the_current_schemas_keep_the_versioning_rule_against_their_releases() -> None:
    released = released_schemas()
    for schema in current_schemas():
        assert any(r.topic == schema.topic for r in released), f"{schema.topic}: no release kept"
        assert release_problems(schema, released) == []


def test_messages_the_kafka_sinks_build_meet_the_schemas() -> None:
    """Inserts, an update moving an event a month back (tombstone at LSN - 1), a NULL duration,
    unknown content, a delete, and dead letters of several reasons."""
    unknown = "0B9F0B1E-0000-4000-8000-0000000000FF"
    moved = image(duration_ms=None, event_ts="2026-10-01 00:00:00+00")
    changes = pl.DataFrame(
        [
            change(0, "insert", image(), lsn=100),
            change(1, "insert", image(id="2", content_id=unknown), lsn=100),
            change(2, "update", moved, image(), lsn=200),
            change(3, "delete", old=image(id="2"), lsn=300),
            change(4, "insert", image(id="5", event_type="share"), lsn=300),
            change(5, "insert", image(id="6", event_ts="yesterday"), lsn=300),
        ],
        schema=CHANGES_SCHEMA,
    )
    batch = enrich(changes, content_versions([ContentVersion(PODCAST, "podcast", 600)]))
    keys, values = row_messages(batch.rows)
    messages = [json.loads(v) for v in values]
    assert [(m["event_id"], m["source_lsn"], m["is_deleted"]) for m in messages] == [
        (1, 100, 0), (2, 100, 0), (1, 199, 1), (1, 200, 0), (2, 300, 1)
    ]  # fmt: skip
    assert keys == [(m["content_id"] or "").encode() or None for m in messages]
    for message in messages:
        assert list(validator(ENRICHED_TOPIC).iter_errors(message)) == [], message
        assert message["schema_version"] == SCHEMA_VERSION
    truncate = {
        "source_lsn": 7,
        "event_id": None,
        "reason": "truncate",
        "op": "truncate",
        "raw_change": '{"op": "truncate", "table": "engagement_events"}',
        "source_committed_at": datetime(2026, 11, 24, 21, 0, tzinfo=UTC),  # no fraction
    }
    letters = pl.concat([batch.dead_letters, pl.DataFrame([truncate], batch.dead_letters.schema)])
    dead = [json.loads(v) for v in dead_letter_values(letters)]
    assert [d["reason"] for d in dead] == ["unknown_event_type", "undecodable_payload", "truncate"]
    for letter in dead:
        assert list(validator(DLQ_TOPIC).iter_errors(letter)) == [], letter


def test_the_schemas_reject_what_the_contract_rules_out() -> None:
    (value,) = row_messages(
        enrich(
            pl.DataFrame([change(0, "insert", image())], schema=CHANGES_SCHEMA), content(), None
        ).rows
    )[1]
    good = json.loads(value)
    enriched = validator(ENRICHED_TOPIC)
    assert enriched.is_valid(good)
    assert enriched.is_valid(good | {"country": "FR"}), "unknown fields are allowed"
    for broken in (
        {k: v for k, v in good.items() if k != "duration_ms"},
        good | {"op": "upsert"},
        good | {"is_deleted": 2},
        good | {"event_ts": "2026-11-24 21:00:00+00"},
        good | {"content_id": "not-a-uuid"},
        good | {"duration_ms": "30000"},
        good | {"source_lsn": -1},
    ):
        assert not enriched.is_valid(broken), broken


def content() -> pl.DataFrame:
    return content_versions([ContentVersion(PODCAST, "podcast", 600)])


# --- the compatibility check -------------------------------------------------------------------

BASE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "op", "ts"],
    "properties": {
        "id": {"type": "integer"},
        "op": {"enum": ["insert", "update"]},
        "ts": {"type": "string", "pattern": "^[0-9]{4}"},
        "note": {"type": ["string", "null"], "description": "optional"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


def changed(edit: Any) -> dict[str, Any]:
    schema = copy.deepcopy(BASE)
    edit(schema)
    return schema


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(lambda s: s["properties"].pop("note"), "$.note: removed", id="removed-field"),
        pytest.param(
            lambda s: s["properties"]["id"].update(type="string"),
            "$.id: type changed from integer to string",
            id="changed-type",
        ),
        pytest.param(
            lambda s: s["properties"]["note"].update(type="string"),
            "$.note: type changed from null/string to string",
            id="null-no-longer-allowed",
        ),
        pytest.param(
            lambda s: s["properties"]["id"].update(type=["integer", "null"]),
            "$.id: type changed from integer to integer/null",
            id="null-now-possible",
        ),
        pytest.param(
            lambda s: s["required"].append("note"), "$.note: newly required", id="newly-required"
        ),
        pytest.param(
            lambda s: s.update(
                required=[*s["required"], "country"],
                properties={**s["properties"], "country": {"type": "string"}},
            ),
            "$.country: newly required",
            id="new-required-field",
        ),
        pytest.param(
            lambda s: s["required"].remove("ts"),
            "$.ts: no longer required (consumers rely on it being there)",
            id="no-longer-required",
        ),
        pytest.param(
            lambda s: s["properties"]["op"].update(enum=["insert"]),
            "$.op: enum narrowed, ['update'] no longer allowed",
            id="narrowed-enum",
        ),
        pytest.param(
            lambda s: s["properties"]["note"].update(enum=["a", "b"]),
            "$.note: values restricted to ['a', 'b']",
            id="new-enum",
        ),
        pytest.param(
            lambda s: s["properties"]["ts"].update(pattern="^[0-9]{4}-"),
            "$.ts: pattern changed from '^[0-9]{4}' to '^[0-9]{4}-'",
            id="changed-pattern",
        ),
        pytest.param(
            lambda s: s["properties"]["id"].update(minimum=0),
            "$.id: minimum 0 added",
            id="new-constraint",
        ),
        pytest.param(
            lambda s: s["properties"]["tags"]["items"].update(type="integer"),
            "$.tags[]: type changed from string to integer",
            id="changed-item-type",
        ),
        pytest.param(
            lambda s: s.update(additionalProperties=False),
            "$: closed (additionalProperties false): unknown fields are rejected",
            id="closed-object",
        ),
        pytest.param(
            lambda s: s["properties"]["id"].update(allOf=[{"minimum": 1}]),
            "$.id: allOf changed (not a keyword this check can judge)",
            id="unjudged-keyword",
        ),
    ],
)
def test_a_breaking_change_is_named(edit: Any, expected: str) -> None:
    assert breaking_changes(BASE, changed(edit)) == [expected]


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(
            lambda s: s["properties"].update(country={"type": ["string", "null"]}),
            id="new-optional-field",
        ),
        pytest.param(
            lambda s: s["properties"]["op"].update(enum=["insert", "update", "delete"]),
            id="widened-enum",
        ),
        pytest.param(lambda s: s["properties"]["ts"].pop("pattern"), id="removed-constraint"),
        pytest.param(
            lambda s: s["properties"]["id"].update(description="the id", examples=[1]),
            id="annotations",
        ),
        pytest.param(lambda s: None, id="unchanged"),
    ],
)
def test_a_compatible_change_passes(edit: Any) -> None:
    assert breaking_changes(BASE, changed(edit)) == []


def write(path: Path, schema: dict[str, Any]) -> Path:
    path.write_text(json.dumps(schema))
    return path


def contract(tmp_path: Path, topic: str, version: int, **edits: Any) -> ContractSchema:
    schema = changed(lambda s: s.update(edits)) | {"x-topic": topic, "x-schema-version": version}
    released = tmp_path / "released"
    released.mkdir(exist_ok=True)
    return load_schema(write(released / f"{topic}.{version}.schema.json", schema))


def current(tmp_path: Path, topic: str, version: int, edit: Any = None) -> ContractSchema:
    schema = changed(edit or (lambda s: None)) | {"x-topic": topic, "x-schema-version": version}
    return load_schema(write(tmp_path / f"{topic}.schema.json", schema))


def test_the_versioning_rule(tmp_path: Path) -> None:
    topic = "engagement.things.v1"
    releases = [contract(tmp_path, topic, 1), contract(tmp_path, topic, 2)]
    assert released_schemas(tmp_path / "released") == releases

    def add_field(s: dict[str, Any]) -> None:
        s["properties"]["country"] = {"type": "string"}

    def remove_field(s: dict[str, Any]) -> None:
        s["properties"].pop("note")

    def reword(s: dict[str, Any]) -> None:
        s["properties"]["id"]["description"] = "clearer"

    assert release_problems(current(tmp_path, topic, 2), releases) == []
    assert release_problems(current(tmp_path, topic, 2, reword), releases) == []
    assert release_problems(current(tmp_path, topic, 3, add_field), releases) == []
    (edited,) = release_problems(current(tmp_path, topic, 2, add_field), releases)
    assert "never edited: raise x-schema-version to 3" in edited
    (below,) = release_problems(current(tmp_path, topic, 1), releases)
    assert "below the released 2" in below
    (broken,) = release_problems(current(tmp_path, topic, 3, remove_field), releases)
    assert broken == (
        "engagement.things.v1 v3 breaks v2: $.note: removed; a breaking change needs a new "
        "topic (engagement.things.v2)"
    )
    # A new major version is a new topic: no release of it yet, nothing to break.
    assert (
        release_problems(current(tmp_path, "engagement.things.v2", 1, remove_field), releases) == []
    )


def test_a_schema_without_topic_or_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="x-topic"):
        load_schema(write(tmp_path / "x.schema.json", BASE))
    with pytest.raises(ContractError, match=r"does not end in \.v<major>"):
        load_schema(
            write(tmp_path / "x.schema.json", BASE | {"x-topic": "t", "x-schema-version": 1})
        )
    misnamed = tmp_path / "released"
    misnamed.mkdir()
    write(misnamed / "t.v1.schema.json", BASE | {"x-topic": "t.v1", "x-schema-version": 1})
    with pytest.raises(ContractError, match=r"named t\.v1\.1\.schema\.json"):
        released_schemas(misnamed)
