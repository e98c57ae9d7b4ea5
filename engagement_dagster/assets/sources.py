"""The two PostgreSQL tables the platform captures, as external (source) assets.

Specs only: nothing here reads or writes the source.
"""

from __future__ import annotations

import dagster as dg

CONTENT_COLUMNS = dg.TableSchema(
    columns=[
        dg.TableColumn("id", "uuid", description="primary key"),
        dg.TableColumn("slug", "text", description="unique"),
        dg.TableColumn("title", "text"),
        dg.TableColumn("content_type", "text", description="podcast | newsletter | video"),
        dg.TableColumn("length_seconds", "integer", description="NULL when unknown"),
        dg.TableColumn("publish_ts", "timestamptz"),
    ]
)

ENGAGEMENT_EVENT_COLUMNS = dg.TableSchema(
    columns=[
        dg.TableColumn("id", "bigserial", description="primary key"),
        dg.TableColumn("content_id", "uuid", description="content.id; may be unknown or NULL"),
        dg.TableColumn("user_id", "uuid"),
        dg.TableColumn("event_type", "text", description="play | pause | finish | click"),
        dg.TableColumn("event_ts", "timestamptz"),
        dg.TableColumn("duration_ms", "integer", description="NULL when not measured"),
        dg.TableColumn("device", "text"),
        dg.TableColumn("raw_payload", "jsonb"),
    ]
)

content_source = dg.AssetSpec(
    key=["postgres", "content"],
    group_name="source",
    kinds={"postgres"},
    description="Catalogue of podcasts, newsletters and videos; joined into every event.",
    metadata={"dagster/column_schema": CONTENT_COLUMNS, "dagster/table_name": "public.content"},
)

engagement_events_source = dg.AssetSpec(
    key=["postgres", "engagement_events"],
    group_name="source",
    kinds={"postgres"},
    description="Users' engagement events, captured by logical replication "
    "(REPLICA IDENTITY FULL).",
    metadata={
        "dagster/column_schema": ENGAGEMENT_EVENT_COLUMNS,
        "dagster/table_name": "public.engagement_events",
    },
)

source_assets = [content_source, engagement_events_source]
