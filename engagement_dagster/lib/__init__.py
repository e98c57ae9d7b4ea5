"""Plain Python behind the platform: settings, schema, local services, traffic.

Nothing in this package imports Dagster, so all of it runs and is tested without Dagster.
"""
