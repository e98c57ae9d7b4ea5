"""Reading the live boards (lib/board.py): window keys, ranking, freshness and how a board reads."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import pytest
from rich.console import Console

from engagement_dagster.lib.board import (
    LIVE_BOARD_TTL_S,
    Board,
    BoardData,
    ContentInfo,
    board_view,
    build_board,
    human_duration,
    rank,
    short_id,
)
from engagement_dagster.lib.board import (
    bar as draw_bar,
)
from engagement_dagster.lib.windows import (
    Window,
    format_window_start,
    window_start,
    window_stats_key,
    window_top_key,
)

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"
C = "cccccccc-0000-4000-8000-000000000003"
NOW = datetime(2026, 11, 24, 21, 7, 42, 500_000, tzinfo=UTC)  # a Tuesday


def render(
    board: Board,
    content: dict[str, ContentInfo] | None = None,
    *,
    watching: bool = False,
    note: str | None = None,
) -> str:
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    console.print(board_view(board, content or {}, watching=watching, note=note))
    return console.export_text()


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ("10m", datetime(2026, 11, 24, 21, 0, tzinfo=UTC)),
        ("1h", datetime(2026, 11, 24, 21, 0, tzinfo=UTC)),
        ("1d", datetime(2026, 11, 24, 0, 0, tzinfo=UTC)),
        ("1w", datetime(2026, 11, 23, 0, 0, tzinfo=UTC)),  # Monday
    ],
)
def test_window_start_is_the_utc_start_of_the_open_window(
    window: Window, expected: datetime
) -> None:
    assert window_start(window, NOW) == expected
    # The same instant in another zone is the same window.
    in_tokyo = NOW.astimezone(timezone(timedelta(hours=9)))
    assert window_start(window, in_tokyo) == expected


def test_a_window_contains_its_own_start_and_ends_before_the_next() -> None:
    monday = datetime(2026, 11, 23, tzinfo=UTC)
    assert window_start("1w", monday) == monday
    assert window_start("1w", monday - timedelta(microseconds=1)) == monday - timedelta(days=7)
    assert window_start("10m", datetime(2026, 11, 24, 21, 9, 59, tzinfo=UTC)).minute == 0
    assert window_start("10m", datetime(2026, 11, 24, 21, 10, tzinfo=UTC)).minute == 10


def test_window_start_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        window_start("1h", datetime(2026, 11, 24, 21, 7))


def test_window_keys_use_the_one_window_start_format() -> None:
    start = window_start("1h", NOW)
    assert format_window_start("1h", start) == "20261124T2100Z"
    assert window_top_key("1h", start) == "engagement:1h:20261124T2100Z:top"
    assert window_stats_key("1d", window_start("1d", NOW), A) == (
        f"engagement:1d:20261124T0000Z:stats:{A}"
    )
    assert window_top_key("10m", window_start("10m", NOW)) == "engagement:10m:20261124T2100Z:top"


def test_a_key_for_a_misaligned_window_is_refused() -> None:
    with pytest.raises(ValueError, match="not the UTC start of a 1h window"):
        window_top_key("1h", datetime(2026, 11, 24, 21, 10, tzinfo=UTC))
    with pytest.raises(ValueError, match="1w"):
        window_top_key("1w", datetime(2026, 11, 24, tzinfo=UTC))  # a Tuesday


def test_rank_orders_by_the_metric_then_the_other_then_the_id() -> None:
    seconds = {A: 100.0, B: 300.0, C: 100.0}
    events = {A: 5, B: 1, C: 9}
    by_seconds = rank(seconds, events, by="seconds", limit=10)
    assert [e.content_id for e in by_seconds] == [B, C, A]
    assert [e.rank for e in by_seconds] == [1, 2, 3]
    assert [round(e.share, 3) for e in by_seconds] == [0.6, 0.2, 0.2]
    assert [e.bar for e in by_seconds] == [1.0, pytest.approx(1 / 3), pytest.approx(1 / 3)]
    by_events = rank(seconds, events, by="events", limit=10)
    assert [e.content_id for e in by_events] == [C, A, B]
    assert [round(e.share, 3) for e in by_events] == [0.6, 0.333, 0.067]
    # Full ties fall back to the content id, so two reads of one board never swap rows.
    tie = rank({B: 1.0, A: 1.0}, {B: 1, A: 1}, by="seconds", limit=10)
    assert [e.content_id for e in tie] == [A, B]


def test_rank_shares_are_of_every_item_not_only_those_shown() -> None:
    top = rank({A: 50.0, B: 30.0, C: 20.0}, {A: 1, B: 1, C: 1}, by="seconds", limit=1)
    assert len(top) == 1
    assert top[0].content_id == A and top[0].share == 0.5


def test_rank_of_an_item_with_events_but_no_seconds_and_missing_stats() -> None:
    entries = rank({A: 10.0}, {A: None, B: 4}, by="seconds", limit=5)
    assert [(e.content_id, e.engagement_seconds, e.events) for e in entries] == [
        (A, 10.0, None),
        (B, 0.0, 4),
    ]


def test_build_board_totals_and_age_of_the_sliding_board() -> None:
    data = BoardData(
        seconds={A: 3725.5, B: 65.0}, events={A: 3, B: 40}, ttl_ms=655_000, exists=True
    )
    board = build_board(data, window="10m", by="seconds", limit=20, read_at=NOW)
    assert board.total_seconds == 3790.5 and board.total_events == 43 and board.items == 2
    assert LIVE_BOARD_TTL_S == 660
    assert board.refreshed_at == NOW - timedelta(seconds=5)
    assert board.expires_at == NOW + timedelta(seconds=655)
    assert board.window_start is None


def test_build_board_without_keys_is_empty_and_not_there() -> None:
    board = build_board(
        BoardData({}, {}, ttl_ms=None, exists=False),
        window="1h",
        by="events",
        limit=20,
        read_at=NOW,
        start=window_start("1h", NOW),
    )
    assert board.entries == () and not board.exists
    assert board.refreshed_at is None and board.expires_at is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (12.4, "12s"),
        (59.6, "1m 00s"),
        (65, "1m 05s"),
        (3599, "59m 59s"),
        (3725.5, "1h 02m"),
        (86_399, "23h 59m"),
        (2 * 86_400 + 3 * 3600 + 59, "2d 03h"),
        (-65, "-1m 05s"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_bar_and_short_id() -> None:
    assert draw_bar(1.0, width=4) == "████"
    assert draw_bar(0.5, width=4) == "██  "
    assert draw_bar(1 / 16, width=4) == "▎   "  # 2 of 32 eighths
    assert draw_bar(0.0, width=4) == "    "
    assert draw_bar(7.0, width=2) == "██"
    assert short_id(A) == "aaaaaaaa"
    assert short_id("not-a-uuid-but-long-enough") == "not-a-uuid-b"


def test_a_board_reads_as_a_ranked_table_with_titles() -> None:
    data = BoardData(
        seconds={A: 3725.5, B: 65.0, C: 12.0},
        events={A: 3, B: 40, C: 2},
        ttl_ms=659_600,
        exists=True,
    )
    board = build_board(data, window="10m", by="seconds", limit=20, read_at=NOW)
    text = render(
        board,
        {A: ContentInfo("Deep [dive] into CDC", "podcast"), B: ContentInfo("Weekly", None)},
    )
    lines = text.splitlines()
    assert lines[0] == (
        "engagement top · last 10 minutes (sliding, by event time) · ranked by engagement seconds"
    )
    assert lines[1] == (
        "total 1h 03m engaged · 45 events · 3 items · refreshed 21:07:42 UTC (0.4s ago) "
        "· read 21:07:42 UTC"
    )
    rows = [line.split() for line in lines[3:6]]
    assert rows[0][:2] == ["1", "aaaaaaaa"] and "Deep [dive] into CDC" in lines[3]
    assert "podcast" in lines[3] and "1h 02m" in lines[3] and "98.0%" in lines[3]
    assert rows[1][:3] == ["2", "bbbbbbbb", "Weekly"] and "1m 05s" in lines[4]
    assert rows[2][:3] == ["3", "cccccccc", "(unknown"]
    assert lines[-1].startswith("--watch to follow it live")


def test_empty_boards_say_why() -> None:
    sliding = build_board(
        BoardData({}, {}, None, exists=False), window="10m", by="seconds", limit=20, read_at=NOW
    )
    assert "no engagement in the last 10 minutes — is the stream running? " in render(sliding)
    assert "`engagement services status`" in render(sliding)
    hourly = build_board(
        BoardData({}, {}, None, exists=False),
        window="1h",
        by="seconds",
        limit=20,
        read_at=NOW,
        start=window_start("1h", NOW),
    )
    text = render(hourly, watching=True)
    assert "no data for window 1h yet (written by the rollups)" in text
    assert "engagement:1h:20261124T2100Z:top" in text
    assert "Ctrl-C to quit" in text


def test_a_window_board_shows_its_window_and_expiry() -> None:
    start = window_start("1d", NOW)
    data = BoardData({A: 7200.0}, {A: None}, ttl_ms=60_000, exists=True)
    board = build_board(data, window="1d", by="seconds", limit=20, read_at=NOW, start=start)
    text = render(board, note="titles unavailable, PostgreSQL: down")
    assert "this day (window 1d from 2026-11-24 00:00 UTC)" in text
    assert "(the window's top 100)" in text and "expires 21:08:42 UTC" in text
    assert "titles unavailable, PostgreSQL: down" in text
    row = next(line for line in text.splitlines() if line.lstrip().startswith("1 "))
    assert "2h 00m" in row and " - " in row and "100.0%" in row
