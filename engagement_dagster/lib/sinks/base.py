"""What every sink implements and what the stream hands it: the per-sink checkpoint protocol.

A sink never advances its checkpoint past data it has not durably applied, and never applies a
change at or below its checkpoint (DESIGN §6); the slot moves only to the lowest checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import polars as pl


@dataclass(frozen=True)
class SinkBatch:
    """Whole transactions, enriched, with commit LSNs in (after_lsn, last_lsn]."""

    last_lsn: int
    rows: pl.DataFrame  # enriched_engagements rows (lib/enrich.py), versions and tombstones
    deltas: pl.DataFrame  # signed live contributions for Redis
    dead_letters: pl.DataFrame
    first_commit_at: datetime | None = None
    last_commit_at: datetime | None = None

    @staticmethod
    def merge(batches: Sequence[SinkBatch]) -> SinkBatch:
        """Consecutive batches as one: their changes in order, the last one's LSN."""
        if len(batches) == 1:
            return batches[0]
        return SinkBatch(
            last_lsn=batches[-1].last_lsn,
            rows=pl.concat([b.rows for b in batches]),
            deltas=pl.concat([b.deltas for b in batches]),
            dead_letters=pl.concat([b.dead_letters for b in batches]),
            first_commit_at=batches[0].first_commit_at,
            last_commit_at=batches[-1].last_commit_at,
        )

    def after(self, checkpoint: int) -> SinkBatch:
        """The part of the batch a sink at `checkpoint` has not applied yet."""
        if checkpoint <= 0:
            return self
        return SinkBatch(
            last_lsn=self.last_lsn,
            rows=self.rows.filter(pl.col("source_lsn") > checkpoint),
            deltas=self.deltas.filter(pl.col("source_lsn") > checkpoint),
            dead_letters=self.dead_letters.filter(pl.col("source_lsn") > checkpoint),
            first_commit_at=self.first_commit_at,
            last_commit_at=self.last_commit_at,
        )


class Sink(ABC):
    """One sink: its durable checkpoint and how it writes a batch above it.

    The checkpoint is read from the sink's own storage once and then kept in memory: this
    process is its only writer (a second stream is fenced or detected by the sink).
    """

    name: str

    def __init__(self) -> None:
        self._checkpoint: int | None = None

    def setup(self) -> None:  # noqa: B027 - optional hook, most sinks need nothing
        """Create what the sink writes to (tables, topics); idempotent."""

    def checkpoint(self) -> int:
        """The highest commit LSN fully applied; 0 when nothing was."""
        if self._checkpoint is None:
            self._checkpoint = self.read_checkpoint()
        return self._checkpoint

    def apply(self, batch: SinkBatch) -> bool:
        """Apply the part of `batch` above the checkpoint and move the checkpoint to its last
        LSN; False when the whole batch was already applied. On failure the checkpoint stays
        where it was and is read again from storage before the next try."""
        checkpoint = self.checkpoint()
        if batch.last_lsn <= checkpoint:
            return False
        try:
            self.write(batch.after(checkpoint), checkpoint)
        except BaseException:
            self._checkpoint = None
            raise
        self._checkpoint = batch.last_lsn
        return True

    @abstractmethod
    def read_checkpoint(self) -> int: ...

    @abstractmethod
    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        """Write the (already filtered) batch and its checkpoint batch.last_lsn durably."""

    def tick(self) -> None:  # noqa: B027 - optional hook
        """Called about once a second, busy or idle (time-based upkeep)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default holds none."""
