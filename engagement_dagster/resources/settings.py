"""Resolution of resource config against the environment: run config wins, then ENGAGEMENT_*.

A field left unset (None) in Dagster config falls back to the env var of DESIGN §9 and then to
its local default, so the Definitions never bake in a host, a port or a secret.
"""

from __future__ import annotations

from typing import Any

from engagement_dagster.lib.settings import Settings


def resolve_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the non-None overrides from run config on top."""
    return Settings(**{name: value for name, value in overrides.items() if value is not None})
