"""Redis sink: the live 10-minute board `engagement:top:10m`, sliding by event time.

Each batch is one Lua script that checks the checkpoint, applies every signed contribution to
per-second event-time buckets and moves the checkpoint, atomically: a replay is a no-op. Every
key it writes has a TTL.
"""

from __future__ import annotations

import time
from typing import Any

import polars as pl
import redis

from engagement_dagster.lib.sinks.base import Sink, SinkBatch

SINK_NAME = "redis"
WINDOW_S = 600
TOP_SECONDS = "engagement:top:10m"
TOP_EVENTS = "engagement:top:10m:events"
CHECKPOINT_KEY = "engagement:_checkpoint:redis"
BUCKET_MS = "engagement:_live:ms:{second}"  # content_id -> engagement milliseconds
BUCKET_EVENTS = "engagement:_live:events:{second}"  # content_id -> events
CHECKPOINT_TTL_S = 35 * 24 * 3600
# A bucket lives while it can be in the window, plus a minute for late refreshes.
BUCKET_TTL_S = WINDOW_S + 60

# KEYS[1] checkpoint. ARGV: batch last LSN, expected checkpoint, checkpoint TTL, then groups of
# (second, content_id, milliseconds, events, expire_at). Integer milliseconds keep the buckets
# exact under any number of increments and retractions.
APPLY_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current >= tonumber(ARGV[1]) then return 0 end
if current ~= tonumber(ARGV[2]) then return -1 end
for i = 4, #ARGV, 5 do
  local ms_key = 'engagement:_live:ms:' .. ARGV[i]
  local ev_key = 'engagement:_live:events:' .. ARGV[i]
  local ms = redis.call('ZINCRBY', ms_key, ARGV[i + 2], ARGV[i + 1])
  local ev = redis.call('ZINCRBY', ev_key, ARGV[i + 3], ARGV[i + 1])
  if tonumber(ev) <= 0 then
    redis.call('ZREM', ms_key, ARGV[i + 1])
    redis.call('ZREM', ev_key, ARGV[i + 1])
  end
  redis.call('EXPIREAT', ms_key, ARGV[i + 4])
  redis.call('EXPIREAT', ev_key, ARGV[i + 4])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""

# KEYS: top seconds, top events. ARGV: first second of the window, last second, TTL.
REFRESH_SCRIPT = """
local seconds = {'ZUNIONSTORE', KEYS[1], 0}
local events = {'ZUNIONSTORE', KEYS[2], 0}
local weights = {'WEIGHTS'}
for s = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  local k = 'engagement:_live:ms:' .. s
  if redis.call('EXISTS', k) == 1 then
    table.insert(seconds, k)
    table.insert(events, 'engagement:_live:events:' .. s)
    table.insert(weights, '0.001')
  end
end
local n = #seconds - 3
if n == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
seconds[3], events[3] = n, n
for _, w in ipairs(weights) do table.insert(seconds, w) end
redis.call(unpack(seconds))
redis.call(unpack(events))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return n
"""


class CheckpointMoved(RuntimeError):
    """Another writer moved the Redis checkpoint under us: two streams are running."""


class RedisSink(Sink):
    name = SINK_NAME

    def __init__(self, url: str, *, window_s: int = WINDOW_S) -> None:
        super().__init__()
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.window_s = window_s
        self._apply = self.client.register_script(APPLY_SCRIPT)
        self._refresh = self.client.register_script(REFRESH_SCRIPT)

    def read_checkpoint(self) -> int:
        value = self.client.get(CHECKPOINT_KEY)
        return int(value) if value else 0

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        now_s = time.time()
        args = self._contributions(batch.deltas, now_s)
        result = self._apply(
            keys=[CHECKPOINT_KEY], args=[batch.last_lsn, checkpoint, CHECKPOINT_TTL_S, *args]
        )
        if result == -1:
            raise CheckpointMoved(
                f"Redis checkpoint moved away from {checkpoint} while applying up to "
                f"{batch.last_lsn}; is a second stream running on this slot?"
            )
        self.refresh(now_s=now_s)

    def _contributions(self, deltas: pl.DataFrame, now_s: float) -> list[Any]:
        """Flattened (second, content_id, ms, events, expire_at) groups for the window."""
        if deltas.height == 0:
            return []
        oldest = int(now_s) - self.window_s
        grouped = (
            deltas.filter(pl.col("content_id").is_not_null())
            .with_columns(
                second=pl.col("event_ts").dt.epoch("s"),
                ms=(pl.col("engagement_seconds").fill_null(0.0) * 1000).round(0).cast(pl.Int64),
            )
            .filter(pl.col("second") > oldest)  # already out of the window: nothing to show
            .group_by("second", "content_id", maintain_order=True)
            .agg(pl.col("ms").sum(), pl.col("events").sum())
            .with_columns(expire_at=pl.col("second") + BUCKET_TTL_S)
        )
        flat: list[Any] = []
        for row in grouped.iter_rows():
            flat.extend(row)
        return flat

    def refresh(self, *, now_s: float | None = None) -> int:
        """Recompute the two boards from the buckets of the last window_s seconds."""
        now = int(now_s or time.time())
        return int(
            self._refresh(
                keys=[TOP_SECONDS, TOP_EVENTS],
                args=[now - self.window_s + 1, now, self.window_s + 60],
            )
        )

    def tick(self) -> None:
        """Slide the boards even when no change arrives."""
        self.refresh()

    def close(self) -> None:
        self.client.close()
