"""The JSON Schemas of the Kafka topics (contracts/) and the rule that keeps them compatible.

A consumer written against a released schema must keep working on every later message of its
topic: `breaking_changes` names what would break it, and `release_problems` applies the
versioning rule. Pure functions over JSON documents: no Kafka client, no service.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engagement_dagster.lib.settings import PROJECT_ROOT

CONTRACTS_DIR = PROJECT_ROOT / "contracts"
RELEASED_DIR = CONTRACTS_DIR / "released"  # <topic>.<x-schema-version>.schema.json, never edited
SCHEMA_SUFFIX = ".schema.json"
_TOPIC_MAJOR = re.compile(r"^(?P<base>.+)\.v(?P<major>[0-9]+)$")

# Keywords that only explain: changing them changes no message and no consumer.
ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "examples", "default", "deprecated"}
)
# Keywords that restrict a value; adding or changing one rejects messages that were valid.
CONSTRAINTS = (
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "multipleOf",
)
# Keywords `_compare` understands; a change of any other (a $ref, an allOf...) counts as breaking.
_COMPARED = frozenset(
    {*CONSTRAINTS, "type", "enum", "const", "required", "additionalProperties", "properties",
     "items", "x-topic", "x-schema-version"}
)  # fmt: skip


class ContractError(ValueError):
    """A schema file is not a contract schema (names its file and what is missing)."""


@dataclass(frozen=True)
class ContractSchema:
    """One topic's JSON Schema: `topic` (x-topic) ends in its major version (.v1), `version`
    (x-schema-version) counts compatible revisions within it; enriched messages carry it as
    `schema_version`."""

    topic: str
    version: int
    schema: Mapping[str, Any]
    path: Path

    @property
    def major(self) -> int:
        return int(_topic_major(self.topic, self.path)["major"])

    @property
    def family(self) -> str:
        """The topic without its major version: engagement.enriched for engagement.enriched.v1."""
        return _topic_major(self.topic, self.path)["base"]


def load_schema(path: Path) -> ContractSchema:
    schema = json.loads(path.read_text(encoding="utf-8"))
    topic, version = schema.get("x-topic"), schema.get("x-schema-version")
    if not isinstance(topic, str) or not isinstance(version, int) or version < 1:
        raise ContractError(
            f"{path}: a contract schema names its topic in x-topic (ending in .v<major>) and "
            f"its revision in x-schema-version (an integer >= 1); got {topic!r}, {version!r}"
        )
    _topic_major(topic, path)
    return ContractSchema(topic, version, schema, path)


def current_schemas(directory: Path = CONTRACTS_DIR) -> list[ContractSchema]:
    """The schemas the producers write to now: contracts/<topic>.schema.json."""
    return [load_schema(p) for p in sorted(directory.glob(f"*{SCHEMA_SUFFIX}"))]


def released_schemas(directory: Path = RELEASED_DIR) -> list[ContractSchema]:
    """Every released revision: contracts/released/<topic>.<version>.schema.json."""
    found = [load_schema(p) for p in sorted(directory.glob(f"*{SCHEMA_SUFFIX}"))]
    for released in found:
        expected = f"{released.topic}.{released.version}{SCHEMA_SUFFIX}"
        if released.path.name != expected:
            raise ContractError(f"{released.path}: a release of this schema is named {expected}")
    return found


def release_problems(current: ContractSchema, released: Iterable[ContractSchema]) -> list[str]:
    """The versioning rule for one current schema, against the released ones of its topic:

    - its file is named after its topic, and its version is not below a released one;
    - at a released version it is that release, unchanged (a release is never edited);
    - above it, it has no breaking change against the newest release. A breaking change needs a
      new topic (engagement.enriched.v2, a new file and producer), which has no release yet.
    """
    problems = []
    expected_name = f"{current.topic}{SCHEMA_SUFFIX}"
    if current.path.name != expected_name:
        problems.append(f"{current.path.name}: the schema of {current.topic} is {expected_name}")
    ours = sorted((r for r in released if r.topic == current.topic), key=lambda r: r.version)
    if not ours:
        return problems
    newest = ours[-1]
    if current.version < newest.version:
        problems.append(
            f"{current.topic}: x-schema-version {current.version} is below the released "
            f"{newest.version}"
        )
    elif current.version == newest.version:
        if _comparable(current.schema) != _comparable(newest.schema):
            problems.append(
                f"{current.topic}: differs from its release {newest.path.name}, which is never "
                f"edited: raise x-schema-version to {newest.version + 1} (and SCHEMA_VERSION where "
                "the producer writes it) for a compatible change"
            )
    else:
        problems.extend(
            f"{current.topic} v{current.version} breaks v{newest.version}: {change}; a breaking "
            f"change needs a new topic ({current.family}.v{current.major + 1})"
            for change in breaking_changes(newest.schema, current.schema)
        )
    return problems


def breaking_changes(released: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What in `current` would break a consumer of `released`, or reject a message `released`
    accepted: a removed field, a changed type or constraint, a newly required field (or a
    field no longer required), a narrowed enum, a closed object. Empty: compatible.

    Compatible: a new optional field, an enum with more values (consumers tolerate unknown
    values), a removed constraint, any annotation (description, title, examples)."""
    return list(_compare(released, current, "$"))


def _compare(old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterable[str]:
    if _types(old) != _types(new):
        yield f"{where}: type changed from {_shown(_types(old))} to {_shown(_types(new))}"
    for keyword in CONSTRAINTS:
        if keyword in new and new.get(keyword) != old.get(keyword):
            yield (
                f"{where}: {keyword} changed from {old.get(keyword)!r} to {new[keyword]!r}"
                if keyword in old
                else f"{where}: {keyword} {new[keyword]!r} added"
            )
    old_values, new_values = _enum(old), _enum(new)
    if new_values is not None:
        if old_values is None:
            yield f"{where}: values restricted to {sorted(new_values, key=repr)}"
        elif not old_values <= new_values:
            gone = sorted(old_values - new_values, key=repr)
            yield f"{where}: enum narrowed, {gone} no longer allowed"
    old_required, new_required = set(old.get("required", ())), set(new.get("required", ()))
    for name in sorted(new_required - old_required):
        yield f"{where}.{name}: newly required"
    for name in sorted(old_required - new_required):
        yield f"{where}.{name}: no longer required (consumers rely on it being there)"
    if old.get("additionalProperties", True) is not False and (
        new.get("additionalProperties", True) is False
    ):
        yield f"{where}: closed (additionalProperties false): unknown fields are rejected"
    old_properties = old.get("properties", {})
    new_properties = new.get("properties", {})
    for name, schema in old_properties.items():
        if name not in new_properties:
            yield f"{where}.{name}: removed"
        else:
            yield from _compare(schema, new_properties[name], f"{where}.{name}")
    if "items" in old or "items" in new:
        yield from _compare(old.get("items", {}), new.get("items", {}), f"{where}[]")
    for keyword in sorted((set(old) | set(new)) - _COMPARED - ANNOTATIONS):
        if _comparable(old.get(keyword)) != _comparable(new.get(keyword)):
            yield f"{where}: {keyword} changed (not a keyword this check can judge)"


def _types(schema: Mapping[str, Any]) -> frozenset[str] | None:
    """The JSON types a schema allows; None when it does not say (any type)."""
    declared = schema.get("type")
    if declared is None:
        return None
    return frozenset([declared] if isinstance(declared, str) else declared)


def _enum(schema: Mapping[str, Any]) -> frozenset[Any] | None:
    if "const" in schema:
        return frozenset([_hashable(schema["const"])])
    if "enum" in schema:
        return frozenset(_hashable(v) for v in schema["enum"])
    return None


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def _shown(types: frozenset[str] | None) -> str:
    return "any" if types is None else "/".join(sorted(types))


def _comparable(schema: Any) -> Any:
    """The schema without annotations, for 'is this the released schema unchanged'."""
    if isinstance(schema, Mapping):
        return {
            key: (
                {name: _comparable(sub) for name, sub in value.items()}  # names, not keywords
                if key == "properties" and isinstance(value, Mapping)
                else _comparable(value)
            )
            for key, value in schema.items()
            if key not in ANNOTATIONS
        }
    if isinstance(schema, Sequence) and not isinstance(schema, str):
        return [_comparable(v) for v in schema]
    return schema


def _topic_major(topic: str, path: Path) -> Mapping[str, str]:
    match = _TOPIC_MAJOR.match(topic)
    if match is None:
        raise ContractError(f"{path}: x-topic {topic!r} does not end in .v<major>")
    return match.groupdict()
