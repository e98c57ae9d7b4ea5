"""Window keys of DESIGN §7: `engagement:{10m|1h|1d|1w}:{window_start}:top|stats:{content_id}`.

The one place their names are built, for the stream (lib/sinks/redis.py), the rollups that
rewrite closed windows and `engagement top` that reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal, get_args

Window = Literal["10m", "1h", "1d", "1w"]
WINDOWS: tuple[Window, ...] = get_args(Window)
WINDOW_SECONDS: Mapping[Window, int] = {"10m": 600, "1h": 3600, "1d": 86_400, "1w": 604_800}

# `window_start` in key names: UTC, minute precision, ISO 8601 basic ('20261124T2100Z'): no
# ':' inside a key part, sorts by time, and says it is UTC.
WINDOW_START_FORMAT = "%Y%m%dT%H%MZ"
# 1970-01-05 was a Monday: weeks are ISO weeks, Monday 00:00 UTC to Monday 00:00 UTC.
_WEEK_ORIGIN_S = 4 * 86_400


def window_start(window: Window, at: datetime) -> datetime:
    """The start of the `window` that contains `at` (the open window when `at` is now), in UTC.

    Windows are aligned in UTC: 10m on :00, :10, ... :50; 1h on the hour; 1d at 00:00 UTC; 1w at
    Monday 00:00 UTC (ISO weeks). `at` must be timezone-aware.
    """
    if at.tzinfo is None:
        raise ValueError(f"window_start needs a timezone-aware time, got naive {at!r}")
    size = WINDOW_SECONDS[window]
    epoch_s = int(at.timestamp() // 1)
    origin = _WEEK_ORIGIN_S if window == "1w" else 0
    start_s = (epoch_s - origin) // size * size + origin
    return datetime.fromtimestamp(start_s, UTC)


def format_window_start(window: Window, start: datetime) -> str:
    """`window_start` as it appears in Redis key names: UTC, minute precision, '20261124T2100Z'.

    The one format of `engagement:{window}:{window_start}:...` keys, for the stream, the rollups
    and this reader alike; build keys with the functions below. Raises ValueError when `start`
    is not the start of a `window` (a key for a misaligned window would never be read).
    """
    if start.tzinfo is None or window_start(window, start) != start:
        raise ValueError(f"{start!r} is not the UTC start of a {window} window")
    return start.astimezone(UTC).strftime(WINDOW_START_FORMAT)


def window_prefix(window: Window, start: datetime) -> str:
    """`engagement:{window}:{window_start}`, the common part of a window's keys."""
    if window not in WINDOW_SECONDS:
        raise ValueError(f"unknown window {window!r}; use one of {', '.join(WINDOWS)}")
    return f"engagement:{window}:{format_window_start(window, start)}"


def window_top_key(window: Window, start: datetime) -> str:
    """`engagement:{window}:{window_start}:top`: content_id -> engagement seconds (top 100)."""
    return f"{window_prefix(window, start)}:top"


def window_stats_key(window: Window, start: datetime, content_id: str) -> str:
    """`engagement:{window}:{window_start}:stats:{content_id}`: hash of events,
    engagement_seconds and avg_engagement_pct."""
    return f"{window_prefix(window, start)}:stats:{content_id}"


def window_members_key(window: Window, start: datetime) -> str:
    """Internal: the set of content_ids that have a stats hash in the window (all of them, while
    `top` holds only the top 100 of a closed window), so a rewrite can remove stale ones."""
    return f"{window_prefix(window, start)}:_members"
