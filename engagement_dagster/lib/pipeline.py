"""Wiring of one change stream from settings: the three sinks and the stream loop around them.

The CLI (`engagement stream`) and the Dagster job `cdc_stream` both build their stream here, so
the two can never differ; adding a fourth sink is one line in `default_sinks`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from engagement_dagster.lib.clickhouse import chdb_path
from engagement_dagster.lib.enrich import EnrichRules
from engagement_dagster.lib.kafka_config import kafka_client_config, librdkafka_config
from engagement_dagster.lib.settings import Settings
from engagement_dagster.lib.sinks.base import Sink
from engagement_dagster.lib.sinks.clickhouse import SINK_NAME, ClickHouseSink
from engagement_dagster.lib.sinks.isolated import IsolatedSink
from engagement_dagster.lib.sinks.kafka_confluent import ConfluentKafkaSink
from engagement_dagster.lib.sinks.redis import RedisSink
from engagement_dagster.lib.stream import Stream, StreamOptions, StreamReport


def default_sinks(settings: Settings, *, isolate: bool = False) -> list[Sink]:
    """Redis first: it has the tightest latency target, and sinks start in this order.
    `isolate`: an embedded chDB sink runs in a process of its own (see clickhouse_sink)."""
    return [
        RedisSink(
            settings.redis_url,
            window_ttls=settings.window_ttls,
            lateness_s=settings.rollup_lateness_seconds,
            source_dsn=settings.pg_dsn,  # to rebuild its keys if Redis loses them
            rules=enrich_rules(settings),
        ),
        clickhouse_sink(settings, isolate=isolate),
        kafka_sink(settings),
    ]


def clickhouse_sink(settings: Settings, *, isolate: bool = False) -> Sink:
    """The ClickHouse sink. With `isolate` and embedded chDB, in a process of its own
    (lib/sinks/isolated.py): opening chDB holds the GIL, and a stream opens it again after every
    other reader. Short-lived users (restart, tests) keep it in-process."""
    factory = functools.partial(
        ClickHouseSink, settings.clickhouse_dsn, hold_s=settings.clickhouse_hold_seconds
    )
    if not isolate or chdb_path(settings.clickhouse_dsn) is None:
        return factory()
    sink = IsolatedSink(SINK_NAME, factory)
    sink.start()  # its imports run while the stream starts; chDB opens at its first call
    return sink


def kafka_sink(settings: Settings) -> Sink:
    """The Kafka sink on the configured client library (ENGAGEMENT_KAFKA_CLIENT)."""
    # One producer identity per slot: a new run fences the one before it, whichever library
    # each uses; both write the same checkpoint records, so a switch resumes where it was.
    transactional_id = f"engagement-stream-{settings.slot}"
    if settings.kafka_client == "kafka-python":  # imported only when chosen (0.1 s at start-up)
        from engagement_dagster.lib.sinks.kafka import KafkaSink

        return KafkaSink(
            kafka_client_config(settings),
            transactional_id=transactional_id,
            topic_prefix=settings.kafka_topic_prefix,
        )
    return ConfluentKafkaSink(
        librdkafka_config(settings),
        transactional_id=transactional_id,
        topic_prefix=settings.kafka_topic_prefix,
    )


def enrich_rules(settings: Settings) -> EnrichRules:
    """The validation rules of DESIGN §5 as configured: one source for stream and replay."""
    return EnrichRules(event_types=settings.event_types)


def build_stream(
    settings: Settings,
    options: StreamOptions | None = None,
    *,
    on_report: Callable[[StreamReport], None] | None = None,
) -> Stream:
    return Stream(
        dsn=settings.pg_dsn,
        slot=settings.slot,
        publication=settings.publication,
        sinks=default_sinks(settings, isolate=True),
        options=options,
        rules=enrich_rules(settings),
        on_report=on_report,
    )
