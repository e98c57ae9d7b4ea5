"""Redis sink: the live 10-minute board `engagement:top:10m` and the open window keys.

Each batch is one Lua script that checks the checkpoint, applies every signed contribution and
moves the checkpoint, atomically: a replay is a no-op. Every key it writes has a TTL.

The live board slides by event time and is kept incrementally: per-second buckets hold each
second's contributions, a running board holds the sum of the buckets in (low, high], and every
slide adds the seconds that entered the window and subtracts the ones that left it. So a batch
costs its own contributions plus one copy of the board, not a union of 600 buckets. Integer
milliseconds keep the sums exact under any number of increments and retractions; the public
board is the running board times 0.001. A board whose state is missing or too stale to slide
(the buckets it would subtract may have expired) is rebuilt from the buckets.

Window keys (`engagement:{10m|1h|1d|1w}:{window_start}:...`, DESIGN §7): the stream adds to a
window's keys while it is open or within the lateness allowance; after that the rollups'
`rewrite_window` is their only writer (lib/rollups.py reads the Redis checkpoint first, so the
rewrite holds everything the stream applied).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import polars as pl
import redis

from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    DEAD_LETTERS_SCHEMA,
    DELTAS_SCHEMA,
    ENRICHED_ROWS_SCHEMA,
    IMAGE_COLUMNS,
    UTC_MICROS,
    EnrichRules,
    enrich,
)
from engagement_dagster.lib.secure import redis_client
from engagement_dagster.lib.sinks.base import Sink, SinkBatch
from engagement_dagster.lib.windows import (
    WINDOW_SECONDS,
    WINDOW_START_FORMAT,
    Window,
    window_members_key,
    window_prefix,
    window_start,
    window_top_key,
)

if TYPE_CHECKING:
    from engagement_dagster.lib.backfill import SourceSnapshot

log = logging.getLogger("engagement.sinks.redis")

SINK_NAME = "redis"
WINDOW_S = 600
TOP_SECONDS = "engagement:top:10m"
TOP_EVENTS = "engagement:top:10m:events"
CHECKPOINT_KEY = "engagement:_checkpoint:redis"
BUCKET_MS = "engagement:_live:ms:{second}"  # content_id -> engagement milliseconds
BUCKET_EVENTS = "engagement:_live:events:{second}"  # content_id -> events
BOARD_MS = "engagement:_live:board:ms"  # sum of the buckets in (low, high]
BOARD_EVENTS = "engagement:_live:board:events"
BOARD_STATE = "engagement:_live:state"  # hash: low, high (epoch seconds)
LIVE_KEYS = (TOP_SECONDS, TOP_EVENTS, BOARD_MS, BOARD_EVENTS, BOARD_STATE)
CHECKPOINT_TTL_S = 35 * 24 * 3600
# A bucket lives while it can be in the window, plus a minute for late slides.
BUCKET_TTL_S = WINDOW_S + 60
# Board, state and public boards: the window plus a minute (lib/board.py reads the age from it).
BOARD_TTL_S = WINDOW_S + 60
# Slide by single seconds only this far; a longer gap (an idle stream) rebuilds the board.
MAX_SLIDE_S = 30

# Window key stats hash fields. The three DESIGN §7 names are what readers use; the exact
# integer sums let increments and retractions never drift, and averages stay sum/count.
STATS_EVENTS = "events"
STATS_SECONDS = "engagement_seconds"
STATS_AVG_PCT = "avg_engagement_pct"
STATS_MS = "engagement_ms"
STATS_PCT_X100 = "engagement_pct_x100_sum"
STATS_PCT_COUNT = "engagement_pct_count"
WINDOW_ROLLUP_SCHEMA = pl.Schema(
    {
        "content_id": pl.String(),
        "events": pl.Int64(),
        "engagement_seconds_sum": pl.Float64(),
        "engagement_pct_sum": pl.Float64(),
        "engagement_pct_count": pl.Int64(),
    }
)
# The Polars truncation that gives a window's start (weeks start on Monday, as in lib/windows.py).
TRUNCATE_EVERY: Mapping[Window, str] = {"10m": "10m", "1h": "1h", "1d": "1d", "1w": "1w"}

# Shared Lua: slide the running board to ARGV `now` and publish it. Called by both scripts.
_SLIDE_LUA = """
local function move_bucket(second, sign)
  local ms = redis.call('ZRANGE', 'engagement:_live:ms:' .. second, 0, -1, 'WITHSCORES')
  for j = 1, #ms, 2 do
    redis.call('ZINCRBY', 'engagement:_live:board:ms', sign * tonumber(ms[j + 1]), ms[j])
  end
  local ev = redis.call('ZRANGE', 'engagement:_live:events:' .. second, 0, -1, 'WITHSCORES')
  for j = 1, #ev, 2 do
    local left = redis.call('ZINCRBY', 'engagement:_live:board:events',
                            sign * tonumber(ev[j + 1]), ev[j])
    if tonumber(left) <= 0 then
      redis.call('ZREM', 'engagement:_live:board:events', ev[j])
      redis.call('ZREM', 'engagement:_live:board:ms', ev[j])
    end
  end
end

local function rebuild(low, high)
  redis.call('DEL', 'engagement:_live:board:ms', 'engagement:_live:board:events')
  local ms, ev = {}, {}
  for s = low + 1, high do
    local k = 'engagement:_live:ms:' .. s
    if redis.call('EXISTS', k) == 1 then
      table.insert(ms, k)
      table.insert(ev, 'engagement:_live:events:' .. s)
    end
  end
  if #ms > 0 then
    redis.call('ZUNIONSTORE', 'engagement:_live:board:ms', #ms, unpack(ms))
    redis.call('ZUNIONSTORE', 'engagement:_live:board:events', #ev, unpack(ev))
  end
end

-- Returns low, high: the board holds the buckets of the seconds in (low, high].
local function slide(now, window, max_slide, ttl)
  local state = redis.call('HMGET', 'engagement:_live:state', 'low', 'high')
  local low, high = tonumber(state[1]), tonumber(state[2])
  local new_low = now - window
  if low == nil or high == nil or new_low - low > max_slide or now - high > max_slide
     or high - now > max_slide then
    rebuild(new_low, now)
    low, high = new_low, now
  else
    for s = high + 1, now do move_bucket(s, 1) end
    for s = low + 1, new_low do move_bucket(s, -1) end
    low, high = math.max(low, new_low), math.max(high, now)
  end
  redis.call('HSET', 'engagement:_live:state', 'low', low, 'high', high)
  redis.call('EXPIRE', 'engagement:_live:state', ttl)
  return low, high
end

local function publish(ttl)
  redis.call('DEL', KEYS[1], KEYS[2])
  if redis.call('EXISTS', 'engagement:_live:board:events') == 1 then
    redis.call('ZUNIONSTORE', KEYS[1], 1, 'engagement:_live:board:ms', 'WEIGHTS', '0.001')
    redis.call('ZUNIONSTORE', KEYS[2], 1, 'engagement:_live:board:events')
  end
  for _, k in ipairs({KEYS[1], KEYS[2], 'engagement:_live:board:ms',
                      'engagement:_live:board:events'}) do
    redis.call('EXPIRE', k, ttl)
  end
end
"""

# KEYS: top seconds, top events, checkpoint. ARGV: batch last LSN, expected checkpoint,
# checkpoint TTL, now, window, max slide, board TTL, number of live groups; then the live groups
# (second, content_id, milliseconds, events, expire_at); then the window groups (key prefix,
# content_id, milliseconds, events, pct x100, pct count, TTL).
APPLY_SCRIPT = (
    _SLIDE_LUA
    + """
local current = tonumber(redis.call('GET', KEYS[3]) or '0')
if current >= tonumber(ARGV[1]) then return 0 end
if current ~= tonumber(ARGV[2]) then return -1 end
local ttl = tonumber(ARGV[7])
local low, high = slide(tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ttl)
local i = 9
local expiring = {}  -- second -> its buckets' expire_at
for _ = 1, tonumber(ARGV[8]) do
  local second, cid = tonumber(ARGV[i]), ARGV[i + 1]
  if second > low then
    local ms_key = 'engagement:_live:ms:' .. ARGV[i]
    local ev_key = 'engagement:_live:events:' .. ARGV[i]
    redis.call('ZINCRBY', ms_key, ARGV[i + 2], cid)
    local ev = redis.call('ZINCRBY', ev_key, ARGV[i + 3], cid)
    if tonumber(ev) <= 0 then
      redis.call('ZREM', ms_key, cid)
      redis.call('ZREM', ev_key, cid)
    end
    expiring[ARGV[i]] = ARGV[i + 4]
    if second <= high then
      redis.call('ZINCRBY', 'engagement:_live:board:ms', ARGV[i + 2], cid)
      local left = redis.call('ZINCRBY', 'engagement:_live:board:events', ARGV[i + 3], cid)
      if tonumber(left) <= 0 then
        redis.call('ZREM', 'engagement:_live:board:events', cid)
        redis.call('ZREM', 'engagement:_live:board:ms', cid)
      end
    end
  end
  i = i + 5
end
-- Once per second touched, after its last change (a bucket emptied and refilled is a new key).
for second, expire_at in pairs(expiring) do
  redis.call('EXPIREAT', 'engagement:_live:ms:' .. second, expire_at)
  redis.call('EXPIREAT', 'engagement:_live:events:' .. second, expire_at)
end
while i <= #ARGV do
  local prefix, cid = ARGV[i], ARGV[i + 1]
  local stats, top, members = prefix .. ':stats:' .. cid, prefix .. ':top', prefix .. ':_members'
  local events = redis.call('HINCRBY', stats, 'events', ARGV[i + 3])
  local ms = redis.call('HINCRBY', stats, 'engagement_ms', ARGV[i + 2])
  local pct = redis.call('HINCRBY', stats, 'engagement_pct_x100_sum', ARGV[i + 4])
  local pct_count = redis.call('HINCRBY', stats, 'engagement_pct_count', ARGV[i + 5])
  if events <= 0 then
    redis.call('DEL', stats)
    redis.call('ZREM', top, cid)
    redis.call('SREM', members, cid)
  else
    local avg = ''
    if pct_count > 0 then avg = pct / (100 * pct_count) end
    redis.call('HSET', stats, 'engagement_seconds', ms / 1000, 'avg_engagement_pct', avg)
    redis.call('ZADD', top, ms / 1000, cid)
    redis.call('SADD', members, cid)
    redis.call('EXPIRE', stats, ARGV[i + 6])
  end
  redis.call('EXPIRE', top, ARGV[i + 6])
  redis.call('EXPIRE', members, ARGV[i + 6])
  i = i + 7
end
publish(ttl)
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[3])
return 1
"""
)

# KEYS: top seconds, top events. ARGV: now, window, max slide, board TTL.
REFRESH_SCRIPT = (
    _SLIDE_LUA
    + """
slide(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
publish(tonumber(ARGV[4]))
return redis.call('ZCARD', KEYS[2])
"""
)


class CheckpointMoved(RuntimeError):
    """Another writer moved the Redis checkpoint under us: two streams are running."""


class RedisLost(RuntimeError):
    """Redis no longer holds what this process applied, and no source is configured to rebuild
    the stream's keys from."""


class RedisSink(Sink):
    name = SINK_NAME

    def __init__(
        self,
        url: str,
        *,
        window_s: int = WINDOW_S,
        window_ttls: Mapping[Window, int] | None = None,
        lateness_s: int = 120,
        clock: Callable[[], float] = time.time,
        source_dsn: str | None = None,
        rules: EnrichRules | None = None,
    ) -> None:
        """`window_ttls` (by "10m", "1h", "1d", "1w"; Settings.window_ttls): which window keys the
        stream keeps current, and their TTL; None or empty keeps only the live board.
        `source_dsn` and `rules`: where and how to rebuild those keys if Redis loses them
        (`checkpoint`); without a source such a loss is an error (RedisLost)."""
        super().__init__()
        self.source_dsn = source_dsn
        self.rules = rules or EnrichRules()
        self._known = 0  # the highest checkpoint this process read or wrote
        self.client = redis_client(url, socket_timeout=10, socket_connect_timeout=5)
        self.window_s = window_s
        self.window_ttls = dict(window_ttls or {})
        self.lateness_s = lateness_s
        self.clock = clock
        self._apply = self.client.register_script(APPLY_SCRIPT)
        self._refresh = self.client.register_script(REFRESH_SCRIPT)

    def read_checkpoint(self) -> int:
        return read_checkpoint(self.client)

    def checkpoint(self) -> int:
        """As every sink's (read once, then kept); but a stored checkpoint below one this process
        has read or written means Redis lost data: restarted without persistence, or with an
        append-only file missing its last second. Then the keys the stream owns are rebuilt
        from the source first (`rebuild`), since the slot may have moved past what was lost."""
        if self._checkpoint is None:
            stored = self.read_checkpoint()
            if stored < self._known:
                if self.source_dsn is None:
                    raise RedisLost(
                        f"sink redis: the checkpoint is {stored}, below {self._known} that this "
                        "process applied: Redis lost data, and no source is configured to "
                        "rebuild the live board and open windows from"
                    )
                log.warning(
                    "sink redis: checkpoint %d is below %d, which this process applied: Redis "
                    "lost data; rebuilding the live board and open windows from the source",
                    stored, self._known,
                )  # fmt: skip
                stored = self.rebuild()
            self._checkpoint = stored
            self._known = max(self._known, stored)
        return self._checkpoint

    def rebuild(self, snapshot: SourceSnapshot | None = None) -> int:
        """Rebuild every key the stream owns (the live board, its per-second buckets and state,
        the open windows) from a snapshot of the source (a new one, or the caller's: a restart
        from a point passes its own), and set the checkpoint to the snapshot's version
        (lib/backfill.py): the stream then applies exactly the commits after it. The checkpoint
        is deleted first, so a crash half-way never leaves a checkpoint without its data.
        Closed windows belong to the rollups: re-materialize redis/engagement_windows for them.
        Returns the new checkpoint."""
        from engagement_dagster.lib.backfill import source_snapshot  # psycopg2, only when needed

        if snapshot is None:
            if self.source_dsn is None:
                raise RedisLost("sink redis: no source to rebuild from")
            with source_snapshot(self.source_dsn) as taken:
                return self.rebuild(taken)
        started = time.monotonic()
        now = int(self.clock())
        since = self._oldest_owned(now)
        deltas = []
        content = snapshot.content()
        for text in snapshot.copy_events("event_ts >= %(since)s", {"since": since}, 100_000):
            changes = text.with_columns(
                seq=pl.int_range(text.height, dtype=pl.UInt32),
                op=pl.lit("insert"),
                source_lsn=pl.lit(snapshot.version, pl.UInt64),
                source_committed_at=pl.lit(snapshot.taken_at, UTC_MICROS),
                **{f"old_{name}": pl.lit(None, pl.String) for name in IMAGE_COLUMNS},
            ).select(CHANGES_SCHEMA.names())
            deltas.append(enrich(changes, content, self.rules).deltas)
        version = snapshot.version
        self.client.delete(CHECKPOINT_KEY)
        self._delete_owned(now)
        batch = SinkBatch(
            last_lsn=version,
            rows=ENRICHED_ROWS_SCHEMA.to_frame(),
            deltas=pl.concat(deltas) if deltas else DELTAS_SCHEMA.to_frame(),
            dead_letters=DEAD_LETTERS_SCHEMA.to_frame(),
        )
        self.write(batch, 0)
        log.warning(
            "sink redis: rebuilt from a snapshot of the source in %.1f s (%d events since %s); "
            "checkpoint %d",
            time.monotonic() - started, batch.deltas.height, since.isoformat(), version,
        )  # fmt: skip
        return version

    def _open_windows(self, now: int) -> list[tuple[Window, datetime]]:
        """Every window the stream still writes (end + lateness after `now`), up to a day ahead
        (a valid event is at most a day in the future)."""
        at = datetime.fromtimestamp(now, UTC)
        found = []
        for window in self.window_ttls:
            size = timedelta(seconds=WINDOW_SECONDS[window])
            start = window_start(window, at - size - timedelta(seconds=self.lateness_s))
            while start <= at + timedelta(days=1):
                if (start + size).timestamp() + self.lateness_s > now:
                    found.append((window, start))
                start += size
        return found

    def _oldest_owned(self, now: int) -> datetime:
        """The earliest event time a key the stream owns can hold."""
        oldest = datetime.fromtimestamp(now - self.window_s, UTC)
        return min([oldest, *(start for _, start in self._open_windows(now))])

    def _delete_owned(self, now: int) -> None:
        """Delete the live board's keys and the open windows' keys."""
        live = [*self.client.scan_iter(match="engagement:_live:*", count=1000)]
        keys = [*live, TOP_SECONDS, TOP_EVENTS]
        for window, start in self._open_windows(now):
            prefix = window_prefix(window, start)
            members = window_members_key(window, start)
            keys += [window_top_key(window, start), members]
            keys += [f"{prefix}:stats:{_text(cid)}" for cid in self.client.smembers(members)]
        for i in range(0, len(keys), 1000):
            self.client.delete(*keys[i : i + 1000])

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        now = int(self.clock())
        seconds = _by_second(batch.deltas)
        live = self._live_contributions(seconds, now)
        windows = self._window_contributions(seconds, now)
        result = self._apply(
            keys=[TOP_SECONDS, TOP_EVENTS, CHECKPOINT_KEY],
            args=[
                batch.last_lsn, checkpoint, CHECKPOINT_TTL_S,
                now, self.window_s, MAX_SLIDE_S, BOARD_TTL_S, len(live) // 5,
                *live, *windows,
            ],
        )  # fmt: skip
        if result == -1:
            raise CheckpointMoved(
                f"Redis checkpoint moved away from {checkpoint} while applying up to "
                f"{batch.last_lsn}; is a second stream running on this slot, or did Redis "
                "lose its data?"
            )
        self._known = max(self._known, batch.last_lsn)

    def _live_contributions(self, seconds: pl.DataFrame, now: int) -> list[Any]:
        """Flattened (second, content_id, ms, events, expire_at) groups for the live board."""
        live = (
            seconds.filter(pl.col("second") > now - self.window_s)  # already out of the window
            .select("second", "content_id", "ms", "events")
            .with_columns(expire_at=pl.col("second") + BUCKET_TTL_S)
        )
        return _flatten(live)

    def _window_contributions(self, seconds: pl.DataFrame, now: int) -> list[Any]:
        """Flattened (key prefix, content_id, ms, events, pct x100, pct count, ttl) groups for
        the windows still open to the stream: those with end + lateness after `now`."""
        if seconds.height == 0 or not self.window_ttls:
            return []
        at = seconds.with_columns(
            ts=pl.from_epoch("second", time_unit="s").dt.replace_time_zone("UTC")
        )
        flat: list[Any] = []
        for window, ttl in self.window_ttls.items():
            size_s = WINDOW_SECONDS[window]
            grouped = (
                at.with_columns(start=pl.col("ts").dt.truncate(TRUNCATE_EVERY[window]))
                .filter(pl.col("start").dt.epoch("s") + size_s + self.lateness_s > now)
                .group_by("start", "content_id", maintain_order=True)
                .agg(pl.col("ms", "events", "pct_x100", "pct_count").sum())
                .select(
                    prefix=pl.format(
                        "engagement:{}:{}", pl.lit(window), pl.col("start").dt.strftime(
                            WINDOW_START_FORMAT
                        )
                    ),
                    content_id="content_id", ms="ms", events="events",
                    pct_x100="pct_x100", pct_count="pct_count", ttl=pl.lit(ttl),
                )
            )  # fmt: skip
            flat.extend(_flatten(grouped))
        return flat

    def refresh(self, *, now_s: float | None = None) -> int:
        """Slide the live board to now and publish it; the number of items on it."""
        now = int(now_s or self.clock())
        return int(
            self._refresh(
                keys=[TOP_SECONDS, TOP_EVENTS],
                args=[now, self.window_s, MAX_SLIDE_S, BOARD_TTL_S],
            )
        )

    def tick(self) -> None:
        """Slide the boards even when no change arrives."""
        self.refresh()

    def close(self) -> None:
        self.client.close()


def _by_second(deltas: pl.DataFrame) -> pl.DataFrame:
    """The batch's signed contributions summed once per (event second, content), in exact
    integers: the live board and every window aggregate from this much smaller frame."""
    return (
        deltas.filter(pl.col("content_id").is_not_null())
        .group_by(
            pl.col("event_ts").dt.epoch("s").alias("second"), "content_id", maintain_order=True
        )
        .agg(
            ms=(pl.col("engagement_seconds").fill_null(0.0) * 1000).round(0).cast(pl.Int64).sum(),
            events=pl.col("events").sum(),
            pct_x100=(pl.col("engagement_pct").fill_null(0.0) * 100).round(0).cast(pl.Int64).sum(),
            pct_count=pl.when(pl.col("engagement_pct").is_not_null())
            .then(pl.col("events"))
            .otherwise(0)
            .sum(),
        )
    )


def _flatten(frame: pl.DataFrame) -> list[Any]:
    """The rows of `frame` end to end, as script arguments; groups that sum to nothing dropped."""
    flat: list[Any] = []
    for row in frame.filter((pl.col("ms") != 0) | (pl.col("events") != 0)).iter_rows():
        flat.extend(row)
    return flat


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_checkpoint(client: redis.Redis) -> int:
    """The Redis sink's checkpoint: the highest commit LSN it has applied (0: none)."""
    value = client.get(CHECKPOINT_KEY)
    return int(value) if value else 0


# --- closed windows: written by the rollups, authoritative ---------------------------------------


def rewrite_window(
    client: redis.Redis,
    window: Window,
    start: datetime,
    rows: pl.DataFrame,
    *,
    ttl_s: int,
    top_n: int = 100,
) -> None:
    """Replace every key of one window with `rows` (WINDOW_ROLLUP_SCHEMA), in one MULTI.

    Writes the `top` set (the `top_n` items by engagement seconds), a stats hash per item with
    events (> 0), and the internal member set; removes stats of items no longer in the window.
    Idempotent. Callers make sure the stream no longer adds to this window (lib/rollups.py).
    """
    prefix = window_prefix(window, start)
    top, members = window_top_key(window, start), window_members_key(window, start)
    rows = rows.filter(pl.col("events") > 0).with_columns(
        ms=(pl.col("engagement_seconds_sum") * 1000).round(0).cast(pl.Int64),
        pct_x100=(pl.col("engagement_pct_sum") * 100).round(0).cast(pl.Int64),
    )
    before = {_text(m) for m in client.smembers(members)}
    keep = set(rows["content_id"].to_list())
    pipe = client.pipeline(transaction=True)
    pipe.delete(top, members, *(f"{prefix}:stats:{cid}" for cid in before - keep))
    leaders = rows.sort("ms", "content_id", descending=[True, False]).head(top_n)
    if leaders.height:
        # Python's ms / 1000 (one IEEE division, as in the stream's Lua), not Polars' division,
        # which multiplies by the reciprocal and can be one ulp off.
        scores = {cid: ms / 1000 for cid, ms in leaders.select("content_id", "ms").iter_rows()}
        pipe.zadd(top, scores)
        pipe.expire(top, ttl_s)
    for cid, events, ms, pct_x100, pct_count in rows.select(
        "content_id", "events", "ms", "pct_x100", "engagement_pct_count"
    ).iter_rows():
        stats = f"{prefix}:stats:{cid}"
        pipe.delete(stats)
        pipe.hset(
            stats,
            mapping={
                STATS_EVENTS: events,
                STATS_SECONDS: repr(ms / 1000),
                STATS_AVG_PCT: repr(pct_x100 / (100 * pct_count)) if pct_count > 0 else "",
                STATS_MS: ms,
                STATS_PCT_X100: pct_x100,
                STATS_PCT_COUNT: pct_count,
            },
        )
        pipe.expire(stats, ttl_s)
    if keep:
        pipe.sadd(members, *keep)
        pipe.expire(members, ttl_s)
    pipe.execute()


def read_window(client: redis.Redis, window: Window, start: datetime) -> pl.DataFrame:
    """Every item's stats of one window, as WINDOW_ROLLUP_SCHEMA (the rollup's columns)."""
    prefix = window_prefix(window, start)
    members = sorted(_text(m) for m in client.smembers(window_members_key(window, start)))
    pipe = client.pipeline(transaction=True)
    for cid in members:
        pipe.hmget(f"{prefix}:stats:{cid}", STATS_EVENTS, STATS_MS, STATS_PCT_X100, STATS_PCT_COUNT)
    rows = [
        (cid, int(events), int(ms) / 1000, int(pct_x100) / 100, int(pct_count))
        for cid, (events, ms, pct_x100, pct_count) in zip(members, pipe.execute(), strict=True)
        if events is not None
    ]
    return pl.DataFrame(rows, schema=WINDOW_ROLLUP_SCHEMA, orient="row")
