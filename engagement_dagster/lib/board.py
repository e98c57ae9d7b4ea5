"""The live leaderboards in Redis, read for people: what `engagement top` fetches and shows.

Read-only: it never writes a Redis key or decides what is on a board (the stream and the rollups
do, DESIGN §7); it fetches, ranks and formats. Window key names come from lib/windows.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

import psycopg2
import redis
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from engagement_dagster.lib.secure import redact, redis_client
from engagement_dagster.lib.sinks.redis import TOP_EVENTS, TOP_SECONDS, WINDOW_S
from engagement_dagster.lib.source_db import connect
from engagement_dagster.lib.windows import (
    Window,
    window_start,
    window_stats_key,
    window_top_key,
)

Metric = Literal["seconds", "events"]
METRICS: tuple[Metric, ...] = get_args(Metric)

WINDOW_WORDS: Mapping[Window, str] = {
    "10m": "10 minutes", "1h": "hour", "1d": "day", "1w": "week",
}  # fmt: skip


# What RedisSink.refresh sets on the two 10-minute boards at every refresh (window + a minute),
# so the board's age is this minus its remaining TTL.
LIVE_BOARD_TTL_S = WINDOW_S + 60

CONTENT_BY_ID = "SELECT id::text, title, content_type FROM content WHERE id = ANY(%s::uuid[])"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

# The name `engagement top` gives its Redis connection (CLIENT LIST shows who reads the board).
TOP_CLIENT_NAME = "engagement-top"

BAR_WIDTH = 12
_EIGHTHS = " ▏▎▍▌▋▊▉"


# --- what is read from Redis, and the board made of it -----------------------------------------


@dataclass(frozen=True)
class BoardData:
    """One consistent read of a board's keys, as Redis returned it.

    `events` is None for a content item whose window stats hash is missing. `ttl_ms` is the
    remaining time to live of the board's main key (None: no key, or no TTL).
    """

    seconds: Mapping[str, float]
    events: Mapping[str, int | None]
    ttl_ms: int | None
    exists: bool


@dataclass(frozen=True)
class BoardEntry:
    rank: int
    content_id: str
    engagement_seconds: float
    events: int | None
    share: float  # of the board's total by the ranking metric, 0..1
    bar: float  # the ranking metric relative to the leader's, 0..1


@dataclass(frozen=True)
class Board:
    """A ranked board at `read_at`: the entries shown and the totals over every item on it."""

    window: Window
    by: Metric
    entries: tuple[BoardEntry, ...]
    items: int
    total_seconds: float
    total_events: int
    read_at: datetime
    window_start: datetime | None  # None: the sliding 10-minute board
    refreshed_at: datetime | None  # the sliding board's last refresh, from its TTL
    expires_at: datetime | None
    exists: bool  # False: none of the window's keys are in Redis (yet)


def rank(
    seconds: Mapping[str, float], events: Mapping[str, int | None], *, by: Metric, limit: int
) -> tuple[BoardEntry, ...]:
    """The top `limit` items by `by`, then by the other metric, then by content id (stable ties).

    Shares are of the total over every item given, not only the ones shown.
    """
    ids = set(seconds) | set(events)

    def metric(content_id: str) -> float:
        if by == "seconds":
            return seconds.get(content_id, 0.0)
        return float(events.get(content_id) or 0)

    def other(content_id: str) -> float:
        if by == "seconds":
            return float(events.get(content_id) or 0)
        return seconds.get(content_id, 0.0)

    ordered = sorted(ids, key=lambda c: (-metric(c), -other(c), c))[: max(limit, 0)]
    total = sum(max(metric(c), 0.0) for c in ids)
    leader = max((metric(c) for c in ordered), default=0.0)
    return tuple(
        BoardEntry(
            rank=position,
            content_id=content_id,
            engagement_seconds=seconds.get(content_id, 0.0),
            events=events.get(content_id),
            share=max(metric(content_id), 0.0) / total if total > 0 else 0.0,
            bar=max(metric(content_id), 0.0) / leader if leader > 0 else 0.0,
        )
        for position, content_id in enumerate(ordered, start=1)
    )


def build_board(
    data: BoardData,
    *,
    window: Window,
    by: Metric,
    limit: int,
    read_at: datetime,
    start: datetime | None = None,
) -> Board:
    """The board people see, from one read of its keys (pure: no I/O, no clock)."""
    refreshed_at = expires_at = None
    if data.ttl_ms is not None and data.ttl_ms >= 0:
        expires_at = read_at + timedelta(milliseconds=data.ttl_ms)
        if window == "10m":
            age_ms = max(LIVE_BOARD_TTL_S * 1000 - data.ttl_ms, 0)
            refreshed_at = read_at - timedelta(milliseconds=age_ms)
    return Board(
        window=window,
        by=by,
        entries=rank(data.seconds, data.events, by=by, limit=limit),
        items=len(set(data.seconds) | set(data.events)),
        total_seconds=sum(data.seconds.values()),
        total_events=sum(e or 0 for e in data.events.values()),
        read_at=read_at,
        window_start=start,
        refreshed_at=refreshed_at,
        expires_at=expires_at,
        exists=data.exists,
    )


def fetch_live(client: redis.Redis) -> BoardData:
    """Both sliding 10-minute boards in one MULTI, so seconds and events come from one refresh."""
    pipe = client.pipeline(transaction=True)
    pipe.zrange(TOP_SECONDS, 0, -1, withscores=True)
    pipe.zrange(TOP_EVENTS, 0, -1, withscores=True)
    pipe.pttl(TOP_SECONDS)
    seconds_raw, events_raw, ttl_ms = pipe.execute()
    seconds = {_str(member): float(score) for member, score in seconds_raw}
    events: dict[str, int | None] = {_str(m): round(score) for m, score in events_raw}
    return BoardData(seconds, events, _ttl(ttl_ms), exists=bool(seconds or events))


def fetch_window(client: redis.Redis, window: Window, start: datetime) -> BoardData:
    """A window's `top` set and the stats hash of each item on it."""
    pipe = client.pipeline(transaction=True)
    pipe.zrange(window_top_key(window, start), 0, -1, withscores=True)
    pipe.pttl(window_top_key(window, start))
    top_raw, ttl_ms = pipe.execute()
    seconds = {_str(member): float(score) for member, score in top_raw}
    events: dict[str, int | None] = dict.fromkeys(seconds)
    if seconds:
        pipe = client.pipeline(transaction=False)
        for content_id in seconds:
            pipe.hget(window_stats_key(window, start, content_id), "events")
        for content_id, value in zip(seconds, pipe.execute(), strict=True):
            events[content_id] = _int_or_none(value)
    return BoardData(seconds, events, _ttl(ttl_ms), exists=bool(seconds))


def read_board(
    client: redis.Redis, *, window: Window, by: Metric, limit: int, now: datetime | None = None
) -> Board:
    """The board of `window` now: the sliding 10 minutes, or the open 1h/1d/1w window."""
    read_at = now or datetime.now(UTC)
    if window == "10m":
        data = fetch_live(client)
        return build_board(data, window=window, by=by, limit=limit, read_at=read_at)
    start = window_start(window, read_at)
    data = fetch_window(client, window, start)
    return build_board(data, window=window, by=by, limit=limit, read_at=read_at, start=start)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ttl(ttl_ms: int | None) -> int | None:
    """PTTL's -2 (no key) and -1 (no TTL) as None."""
    return int(ttl_ms) if ttl_ms is not None and ttl_ms >= 0 else None


def _int_or_none(value: bytes | str | None) -> int | None:
    if value is None:
        return None
    try:
        return round(float(_str(value)))
    except ValueError:
        return None


# --- titles from PostgreSQL ---------------------------------------------------------------------


@dataclass(frozen=True)
class ContentInfo:
    title: str | None
    content_type: str | None


class ContentTitles:
    """Title and content_type by content id, read from PostgreSQL once per id and cached.

    A board must show even when PostgreSQL is down: then `lookup` returns what it has and `error`
    says why the rest is missing.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._cache: dict[str, ContentInfo] = {}
        self.error: str | None = None

    def lookup(self, content_ids: Iterable[str]) -> Mapping[str, ContentInfo]:
        wanted = [c for c in content_ids if c not in self._cache and _UUID.match(c)]
        if wanted:
            try:
                with connect(self.dsn) as conn, conn.cursor() as cur:
                    cur.execute(CONTENT_BY_ID, (wanted,))
                    for content_id, title, content_type in cur.fetchall():
                        self._cache[content_id] = ContentInfo(title, content_type)
                self.error = None
            except psycopg2.Error as exc:
                self.error = f"titles unavailable, PostgreSQL: {str(exc).strip()}"
        return self._cache


# --- how a board reads --------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """Engagement time as people say it: '45s', '12m 05s', '1h 02m', '3d 04h'."""
    sign = "-" if seconds < 0 else ""
    s = round(abs(seconds))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m {s % 60:02d}s"
    if s < 86_400:
        return f"{sign}{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{sign}{s // 86_400}d {s % 86_400 // 3600:02d}h"


def human_age(seconds: float) -> str:
    """How long ago: '0.4s', '12s', '3m 10s'."""
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f}s"
    return human_duration(seconds)


def short_id(content_id: str) -> str:
    """The first block of a uuid, enough to tell items on one board apart."""
    return content_id.split("-", 1)[0] if _UUID.match(content_id) else content_id[:12]


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A bar of `width` cells filled to `fraction`, in eighths of a cell."""
    eighths = round(min(max(fraction, 0.0), 1.0) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def empty_message(board: Board) -> str:
    if board.window == "10m":
        return (
            "no engagement in the last 10 minutes — is the stream running? "
            "`engagement services status`"
        )
    assert board.window_start is not None
    return (
        f"no data for window {board.window} yet (written by the rollups): "
        f"{window_top_key(board.window, board.window_start)} is not in Redis"
    )


def _clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%S UTC")


def board_header(board: Board) -> str:
    metric = "engagement seconds" if board.by == "seconds" else "events"
    if board.window == "10m":
        scope = "last 10 minutes (sliding, by event time)"
    else:
        assert board.window_start is not None
        scope = (
            f"this {WINDOW_WORDS[board.window]} (window {board.window} from "
            f"{board.window_start:%Y-%m-%d %H:%M} UTC)"
        )
    return f"engagement top · {scope} · ranked by {metric}"


def board_status(board: Board) -> str:
    """Totals and freshness: what the board adds up to and how old it is."""
    parts = [
        f"total {human_duration(board.total_seconds)} engaged",
        f"{board.total_events:,} events",
        f"{board.items:,} items" + (" (the window's top 100)" if board.window != "10m" else ""),
    ]
    if board.refreshed_at is not None:
        age = (board.read_at - board.refreshed_at).total_seconds()
        parts.append(f"refreshed {_clock(board.refreshed_at)} ({human_age(age)} ago)")
    elif board.expires_at is not None:
        parts.append(f"expires {_clock(board.expires_at)}")
    parts.append(f"read {_clock(board.read_at)}")
    return " · ".join(parts)


def board_view(
    board: Board,
    content: Mapping[str, ContentInfo],
    *,
    watching: bool = False,
    note: str | None = None,
) -> RenderableType:
    """The board as people read it: a header, the ranked table (or why it is empty), a hint."""
    parts: list[RenderableType] = [Text(board_header(board), style="bold")]
    if board.entries:
        parts.append(Text(board_status(board), style="dim"))
        parts.append(_table(board, content))
    else:
        parts.append(Text(empty_message(board), style="yellow"))
    if note:
        parts.append(Text(note, style="red"))
    other = "events" if board.by == "seconds" else "seconds"
    hint = (
        "refreshing every second · Ctrl-C to quit"
        if watching
        else "--watch to follow it live · --limit N for more"
    )
    parts.append(Text(f"{hint} · --by {other} · --window 10m|1h|1d|1w", style="dim"))
    return Group(*parts)


def _table(board: Board, content: Mapping[str, ContentInfo]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("content", no_wrap=True)
    table.add_column("title", overflow="ellipsis", no_wrap=True, max_width=48)
    table.add_column("type", no_wrap=True)
    table.add_column("engaged", justify="right", no_wrap=True)
    table.add_column("events", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=BAR_WIDTH)
    for entry in board.entries:
        info = content.get(entry.content_id)
        table.add_row(
            str(entry.rank),
            short_id(entry.content_id),
            Text((info.title or "") if info else "(unknown content)", style="" if info else "dim"),
            Text((info.content_type or "") if info else "", style="cyan"),
            human_duration(entry.engagement_seconds),
            f"{entry.events:,}" if entry.events is not None else "-",
            f"{entry.share * 100:.1f}%",
            Text(bar(entry.bar), style="green"),
        )
    return table


# --- the command ---------------------------------------------------------------------------------


def show_top(
    console: Console,
    *,
    redis_url: str,
    pg_dsn: str,
    window: Window,
    by: Metric,
    limit: int,
    watch: bool,
    interval_s: float = 1.0,
) -> int:
    """`engagement top`: print the board once, or follow it every `interval_s` until Ctrl-C.

    Returns the exit code: 0, or 1 when Redis cannot be read (with the fix in the message).
    """
    client = redis_client(
        redis_url, socket_timeout=5, socket_connect_timeout=3, client_name=TOP_CLIENT_NAME
    )
    titles = ContentTitles(pg_dsn)
    failed = False

    def view() -> RenderableType:
        nonlocal failed
        try:
            board = read_board(client, window=window, by=by, limit=limit)
        except redis.RedisError as exc:
            failed = True
            return Text(
                f"cannot read the board from Redis at {redact(redis_url)}: {exc}; "
                "check it with `engagement services status`",
                style="red",
            )
        failed = False
        content = titles.lookup(e.content_id for e in board.entries)
        return board_view(board, content, watching=watch, note=titles.error)

    try:
        if not watch:
            console.print(view())
            return 1 if failed else 0
        # While watching, an outage shows in place of the board until Redis is back.
        with Live(view(), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval_s)
                live.update(view())
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
