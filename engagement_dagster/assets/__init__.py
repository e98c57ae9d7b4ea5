"""What the Dagster UI shows: source tables now; the stream's sink assets, backfills and rollups
as they land."""
