"""The reconciliation's rules without services: PostgreSQL's count by the stream's validation,
Kafka's newest message per event and its doubles, and which sink is behind rather than lost."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg

from engagement_dagster.assets.rollups import reconcile_check_result
from engagement_dagster.lib.enrich import EnrichRules
from engagement_dagster.lib.reconcile import (
    Count,
    Observation,
    Reconciliation,
    kafka_count,
    kafka_frame,
    postgres_count,
    verdicts,
)

START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
END = START + timedelta(minutes=10)
CONTENT = "6a1f6f1e-3f5d-4b8e-9c43-2f8f7a1c0d11"
PG = Count(3, 45_000)
T = 1_000


def message(
    event_id: int, lsn: int, at: datetime | None, ms: int | None, deleted: int = 0
) -> bytes:
    """An `engagement.enriched.v1` value with the fields the count reads (and one it ignores)."""
    ts = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if at else None
    return json.dumps(
        {"event_id": event_id, "content_id": CONTENT, "event_ts": ts, "duration_ms": ms,
         "source_lsn": lsn, "is_deleted": deleted, "op": "insert", "schema_version": 1}
    ).encode()  # fmt: skip


def test_postgres_counts_the_valid_rows_as_the_stream_validates_them() -> None:
    csv = (
        f'"1","{CONTENT}","{CONTENT}","play","2026-11-24 12:00:01+00","30000","web",\n'
        f'"2","{CONTENT}","{CONTENT}","pause","2026-11-24 12:00:02+00",,"web",\n'
        f'"3","{CONTENT}","{CONTENT}","play","2026-11-24 12:00:03+00","-5","web",\n'
        f'"4",,"{CONTENT}","play","2026-11-24 12:00:04+00","10","web",\n'
        f'"5","{CONTENT}","{CONTENT}","dance","2026-11-24 12:00:05+00","10","web",\n'
        f'"6","{CONTENT}","{CONTENT}","dance","2026-11-24 12:00:06+00","7","web",\n'
    ).encode()
    at = datetime(2026, 11, 25, tzinfo=UTC)
    assert postgres_count(csv, T, at, EnrichRules()) == Count(2, 30_000)
    dancing = EnrichRules(event_types=frozenset({"play", "pause", "dance"}))
    assert postgres_count(csv, T, at, dancing) == Count(4, 30_017)
    assert postgres_count(b"", T, at, EnrichRules()) == Count(0, 0)


def test_kafka_counts_each_events_newest_message_up_to_postgres_lsn() -> None:
    inside, outside = START + timedelta(seconds=5), END + timedelta(minutes=5)
    frame = kafka_frame(
        [
            message(1, 10, inside, 1_000),  # inserted ...
            message(1, 20, inside, 2_000),  # ... updated in place: counts once, 2000 ms
            message(2, 10, inside, 5_000),
            message(2, 30, outside, 5_000),  # moved out of the window
            message(3, 10, outside, 7_000),
            message(3, 40, inside, 7_000),  # moved into it
            message(4, 10, inside, 9_000),
            message(4, 50, inside, 9_000, deleted=1),  # deleted
            message(5, 60, inside, None),  # no duration: an event, 0 ms
            message(6, 59, outside, 1, deleted=1),  # a month move: tombstone one LSN below ...
            message(6, 60, inside, 3_000),  # ... the live version
            message(7, T + 1, inside, 100),  # committed after PostgreSQL was read
        ]
    )
    assert kafka_count([frame], START, END, T) == (Count(4, 12_000), 0)
    assert kafka_count([frame], START, END, 45) == (Count(3, 2_000 + 7_000 + 9_000), 0)  # 4 live
    assert kafka_count([], START, END, T) == (Count(0, 0), 0)


def test_kafka_counts_a_version_delivered_twice_as_doubled_not_as_two_events() -> None:
    at = START + timedelta(seconds=1)
    first = kafka_frame([message(1, 10, at, 1_000), message(2, 10, at, 500)])
    again = kafka_frame([message(1, 10, at, 1_000)])  # the same version in a later chunk
    assert kafka_count([first, again], START, END, T) == (Count(2, 1_500), 1)
    elsewhere = kafka_frame([message(3, 10, END + timedelta(hours=1), 1)] * 2)
    assert kafka_count([first, elsewhere], START, END, T) == (Count(2, 1_500), 0)


def statuses(*observations: Observation, active: bool = False) -> dict[str, str]:
    return {s.sink: s.status for s in verdicts(PG, T, observations, stream_active=active)}


def test_a_sink_that_applied_everything_and_differs_has_lost_or_doubled() -> None:
    assert statuses(
        Observation("clickhouse", Count(2, 30_000), T + 5),
        Observation("kafka", PG, T + 5),
        Observation("redis", PG, 900, same_as="clickhouse"),
    ) == {"clickhouse": "differs", "kafka": "equal", "redis": "equal"}
    doubled = Observation("kafka", PG, T + 5, extra_differences=("1 message delivered twice",))
    (kafka,) = verdicts(PG, T, [doubled], stream_active=False)
    assert kafka.status == "differs" and kafka.detail.startswith("1 message delivered twice")


def test_a_sink_below_postgres_lsn_is_behind_only_when_a_lag_explains_it() -> None:
    short = Count(2, 30_000)
    # The stream is running and the sink is still short after the wait.
    assert statuses(Observation("kafka", short, T - 1), Observation("clickhouse", PG, T + 1),
                    active=True) == {"kafka": "behind", "clickhouse": "equal"}  # fmt: skip
    # No stream: behind the other sinks ...
    assert statuses(Observation("kafka", short, T - 9), Observation("clickhouse", PG, T - 1)) == {
        "kafka": "behind",
        "clickhouse": "equal",
    }
    # ... or every sink alike: PostgreSQL changed after what the stream applied.
    assert statuses(
        Observation("kafka", short, T - 1),
        Observation("clickhouse", short, T - 1),
        Observation("redis", short, 900, same_as="clickhouse"),
    ) == {"kafka": "behind", "clickhouse": "behind", "redis": "behind"}
    # As far as the others, which agree with PostgreSQL: lost.
    assert statuses(Observation("kafka", short, T - 1), Observation("clickhouse", PG, T - 1)) == {
        "kafka": "differs",
        "clickhouse": "equal",
    }


def test_a_closed_redis_window_is_behind_when_it_holds_its_rollup_and_the_window_changed() -> None:
    old = Count(2, 30_000)
    assert statuses(
        Observation("clickhouse", PG, T + 1),
        Observation("redis", old, 900, lag_explains=True, note="re-roll due"),
    ) == {"clickhouse": "equal", "redis": "behind"}
    assert statuses(
        Observation("clickhouse", PG, T + 1),
        Observation("redis", old, 900, lag_explains=False),
    ) == {"clickhouse": "equal", "redis": "differs"}
    # Built from what ClickHouse lost: it shares ClickHouse's verdict.
    assert statuses(
        Observation("clickhouse", old, T + 1),
        Observation("kafka", PG, T + 1),
        Observation("redis", old, 900, same_as="clickhouse"),
    ) == {"clickhouse": "differs", "kafka": "equal", "redis": "differs"}


def test_the_check_result_plots_each_count_and_fails_as_an_error_only_when_lost() -> None:
    sinks = verdicts(
        PG,
        T,
        [
            Observation("clickhouse", PG, T + 1),
            Observation("redis", Count(2, 30_000), 900, lag_explains=True, note="re-roll due"),
            Observation("kafka", None, None, note="kafka: topic missing"),
        ],
        stream_active=False,
    )
    result = Reconciliation(START, T, PG, sinks, 0, 0, None, 1.5, 2)
    outcome = reconcile_check_result(result)
    assert not outcome.passed and outcome.severity == dg.AssetCheckSeverity.WARN
    assert outcome.metadata["postgres_events"] == dg.MetadataValue.int(3)
    assert outcome.metadata["clickhouse_engagement_ms"] == dg.MetadataValue.int(45_000)
    assert outcome.metadata["redis_events_diff"] == dg.MetadataValue.int(-1)
    assert outcome.metadata["redis_engagement_ms_diff"] == dg.MetadataValue.int(-15_000)
    assert "kafka_events" not in outcome.metadata
    assert outcome.metadata["status"] == dg.MetadataValue.text(
        "clickhouse equal, redis behind, kafka unavailable"
    )
    assert outcome.description and "kafka unavailable: kafka: topic missing" in outcome.description

    lost = Reconciliation(
        START, T, PG, (sinks[0], replace(sinks[1], status="differs")), 0, 0, None, 0, 1
    )
    assert reconcile_check_result(lost).severity == dg.AssetCheckSeverity.ERROR
