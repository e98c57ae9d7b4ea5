"""engagement_dagster: PostgreSQL engagement events to ClickHouse, Redis and Kafka, exactly once.

Dagster definitions live in `definitions.py`; everything that runs without Dagster lives in `lib/`.
"""
