"""The stream loop: slot -> micro-batches of whole transactions -> enrichment -> three sinks.

Every sink applies each change exactly once by its own checkpoint; the slot is acknowledged only
up to the lowest checkpoint. A sink that fails is retried with backoff while the others go on;
when it comes back it catches up from the slot. Nothing here imports Dagster.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import random
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg2

from engagement_dagster.lib import metrics
from engagement_dagster.lib.change_cursor import ChangeCursor
from engagement_dagster.lib.enrich import (
    CHANGES_SCHEMA,
    DEAD_LETTERS_SCHEMA,
    IMAGE_COLUMNS,
    REASON_SCHEMA_MISMATCH,
    ContentVersion,
    EnrichRules,
    content_versions,
    content_versions_from_change,
    enrich,
    fold_content_versions,
)
from engagement_dagster.lib.event_schema import EventShape, content_mismatch, event_shape
from engagement_dagster.lib.pgoutput import UNCHANGED_TOAST, Change, Transaction, format_lsn
from engagement_dagster.lib.sinks.base import Sink, SinkBatch
from engagement_dagster.lib.source_db import (
    KeptConnection,
    connect,
    handover_poll_application_name,
    restart_distance,
    successor_waiting,
)

log = logging.getLogger("engagement.stream")

EVENTS_TABLE = "engagement_events"
CONTENT_TABLE = "content"
EVENT_COLUMNS = IMAGE_COLUMNS  # engagement_events, as pgoutput delivers them
CURRENT_WAL_LSN = "SELECT pg_current_wal_lsn()::text"
CONTENT_SNAPSHOT = "SELECT id::text, content_type, length_seconds FROM content"

# Fault injection for crash tests (off unless set): kill -9 ourselves at a named point.
FAULT_ENV = "ENGAGEMENT_FAULT"  # before_ack, or after_sink:<name>
SUCCESSOR_POLL_S = 0.1  # a run in its handover grace looks for a waiting successor this often
# A broken replication connection (PostgreSQL restarted, a network cut) is opened again, with
# backoff up to RECONNECT_MAX_DELAY_S, for this long before the run gives up and fails.
RECONNECT_GIVE_UP_S = 300.0
RECONNECT_MAX_DELAY_S = 1.0
# At a handover the successor re-decodes the slot from its restart_lsn: wait (bounded by the
# option handover_restart_wait_seconds) until that is at most this much WAL behind.
HANDOVER_RESTART_BYTES = 4 << 20
# At a handover, the sinks get this long to finish before the slot is freed. Shorter is worse:
# the successor first re-reads a slow sink's lag, which the others skip (0.2 s against 1 s, Redis
# stall per handover at 5,000 changes/s: median 987 against 408 ms, README "Where it falls short").
HANDOVER_DRAIN_S = 1.0
# The first batch after the slot opens is cut this soon after its first transaction: at a
# handover the sinks have waited since the last run's last batch, and a small first batch is
# read, enriched and written well before a full batch_max_ms one (Redis checkpoint stall across
# a handover at 5,000 changes/s: median 487 -> 304 ms, README "Figures").
FIRST_BATCH_MAX_MS = 25


@dataclass(frozen=True)
class StreamOptions:
    batch_max_ms: int = 200
    batch_max_rows: int = 20_000
    run_seconds: float = 300.0  # the run ends this long after it starts (at a batch boundary)
    # After run_seconds, keep streaming until a successor waits for the slot, at most this long
    # (0: end at run_seconds). A slow run launch then costs no gap: the handover happens when
    # the successor is ready, whenever that is.
    handover_grace_seconds: float = 0.0
    # Once a successor waits, stream on up to this long until the slot's restart point is close
    # behind what we confirmed (PostgreSQL 15 moves it every 15 s), so that the successor does
    # not first re-decode up to 15 s of WAL: a shorter gap. 0: hand over at once.
    handover_restart_wait_seconds: float = 0.0
    linger_seconds: float | None = None  # once caught up, exit after this long; 0: at once
    report_every_s: float = 30.0
    retry_base_s: float = 0.5
    retry_max_s: float = 5.0  # a sink back from an outage is retried within 5 s
    max_pending_rows: int = 500_000  # per failing sink; beyond it the sink replays from the slot
    # A healthy but slower sink holds the reader back (backpressure) once this many rows wait
    # for it: memory is what is bounded. In rows, not batches: at a steady rate a sink that
    # hangs is marked stalled (stall_s) long before it could hold the reader, and so the others.
    max_queued_rows: int = 100_000
    merge_max_rows: int = 50_000  # a sink applies up to this many queued rows as one write
    stall_s: float = 2.0  # a write taking longer than this marks the sink as failing


class SinkWorker:
    """One sink in its own thread, so a slow or failing sink never holds up the others.

    Batches queue up in memory while the sink is down (retried with exponential backoff and
    jitter). Past `max_pending_rows` the queue is dropped and the sink asks for a replay: the
    stream then re-reads the slot from the lowest checkpoint, which this sink's is.
    """

    def __init__(self, sink: Sink, options: StreamOptions, report: StreamReport) -> None:
        self.sink = sink
        self.options = options
        self.report = report
        self._queue: deque[SinkBatch] = deque()
        self._queued_rows = 0
        self._writing_rows = 0  # of _queued_rows, those in the write under way
        self._lock = threading.Condition()
        self._closing = False
        self.needs_replay = False  # its queue was dropped: feed it again from the slot
        self.ready_for_replay = threading.Event()
        self.failures = 0
        self.last_error: str | None = None
        self.latencies_ms: deque[float] = deque(maxlen=10_000)
        self.applied_lsn: int | None = None  # unknown until the sink has answered once
        self.fault: str | None = None  # fault injection (ENGAGEMENT_FAULT), off by default
        self._next_tick = 0.0
        self._apply_started_at: float | None = None
        self._catching_up = False  # since a failure, until its queue is short again
        self._started_at = time.monotonic()
        self._started_at_lsn: int | None = None  # its checkpoint when it started
        self._thread = threading.Thread(target=self._work, name=f"sink-{sink.name}", daemon=True)

    def start(self) -> None:
        """Start the thread; it sets the sink up and reads its checkpoint, retrying while the
        sink is down, so a sink that is down at start does not hold up the others."""
        self._started_at = time.monotonic()
        self._thread.start()

    def _prepare(self) -> bool:
        prepared = self._until_applied(self.sink.setup) and self._until_applied(
            self.sink.checkpoint
        )
        if prepared:
            self.applied_lsn = self._started_at_lsn = self.sink.checkpoint()
            metrics.SINK_CHECKPOINT_LSN.labels(self.sink.name).set(self.applied_lsn)
        return prepared

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._queue and not self.needs_replay and self.applied_lsn is not None

    def submit(self, batch: SinkBatch, *, stop: threading.Event) -> None:
        """Queue a batch. Blocks while a healthy sink is `max_queued_rows` behind, so a slow
        sink slows the reader instead of filling memory; a failing sink never blocks it."""
        with self._lock:
            while (
                self._queued_rows >= self.options.max_queued_rows
                and not self.stalled
                and not stop.is_set()
            ):
                self._lock.wait(timeout=0.05)
            if self.needs_replay:
                return
            self._queue.append(batch)
            self._queued_rows += batch.rows.height + batch.deltas.height
            # What waits behind the write under way: a transaction larger than the buffer is
            # written, not dropped and read again (which would only bring it back whole).
            waiting = self._queued_rows - self._writing_rows
            if waiting > self.options.max_pending_rows and self.stalled:
                log.warning(
                    "sink %s lags by %d rows: dropping its queue, it will replay from the slot",
                    self.sink.name, self._queued_rows,
                )  # fmt: skip
                self._queue.clear()
                self._queued_rows = self._writing_rows = 0
                self.needs_replay = True
                metrics.SINK_REPLAYS.labels(self.sink.name).inc()
            metrics.SINK_QUEUED_ROWS.labels(self.sink.name).set(self._queued_rows)
            self._lock.notify()

    @property
    def _hung(self) -> bool:
        """In one write (or set-up) for longer than a healthy sink ever takes."""
        started = self._apply_started_at
        return started is not None and time.monotonic() - started > self.options.stall_s

    @property
    def up(self) -> bool:
        """Writes succeed, and none hangs."""
        return self.failures == 0 and not self._hung

    @property
    def stalled(self) -> bool:
        """Starting, failing, catching up after a failure, or stuck in one write for longer than
        a healthy sink ever takes: the reader does not wait for it, so the other sinks never
        wait for a sink that starts slowly, hangs or works through a backlog."""
        return (
            self.applied_lsn is None  # still starting (a lock, a coordinator): never waited on
            or self.failures > 0
            or self._catching_up
            or self._hung
        )

    def resume(self) -> None:
        """The stream re-reads the slot: accept batches again."""
        with self._lock:
            self.needs_replay = False
            self.ready_for_replay.clear()

    def _work(self) -> None:
        if not self._prepare():
            return
        while True:
            with self._lock:
                while not self._queue and not self._closing and not self.needs_replay:
                    if time.monotonic() >= self._next_tick:
                        break
                    self._lock.wait(timeout=max(0.0, self._next_tick - time.monotonic()))
                if self._closing and not self._queue:
                    return
                taken = self._take()
                self._writing_rows = sum(b.rows.height + b.deltas.height for b in taken)
                upkeep = not self._closing and self.failures == 0
                upkeep = upkeep and time.monotonic() >= self._next_tick
            if upkeep:
                self._tick()
            if not taken and not self.needs_replay:
                continue  # woke up for upkeep only
            if not taken:  # dropped queue: wait until the sink answers, then ask for replay
                self._until_applied(self.sink.read_checkpoint)  # really asks the sink
                self.ready_for_replay.set()
                with self._lock:
                    while self.needs_replay and not self._closing:
                        self._lock.wait(timeout=1.0)
                    if self._closing:
                        return
                continue
            batch = SinkBatch.merge(taken)
            if not self._until_applied(functools.partial(self.sink.apply, batch)):
                return
            # Once, at the first batch that takes the sink past its checkpoint (a successor's
            # first batches may all lie below it: re-read, skipped, not "applied").
            started_at = self._started_at_lsn
            if self.applied_lsn == started_at and batch.last_lsn > (started_at or 0):
                log.info(
                    "sink %s: first batch applied %.0f ms after the start",
                    self.sink.name, (time.monotonic() - self._started_at) * 1000,
                )  # fmt: skip
            self.applied_lsn = max(self.applied_lsn or 0, batch.last_lsn)
            if self.fault == f"after_sink:{self.sink.name}":
                _kill_self(self.fault)
            self._observe_applied(taken, batch)
            with self._lock:
                if self._queue and self._queue[0] is taken[0]:  # not dropped meanwhile
                    for _ in taken:
                        part = self._queue.popleft()
                        self._queued_rows -= part.rows.height + part.deltas.height
                self._writing_rows = 0
                if self._queued_rows < self.options.max_queued_rows:
                    self._catching_up = False
                metrics.SINK_QUEUED_ROWS.labels(self.sink.name).set(self._queued_rows)
                self._lock.notify_all()

    def _observe_applied(self, taken: list[SinkBatch], batch: SinkBatch) -> None:
        """Latency of each batch in the write (commit of its last change -> now) and the
        sink's metrics."""
        name = self.sink.name
        applied_at = datetime.now(UTC)
        latency = metrics.SINK_LATENCY.labels(name)
        for part in taken:
            if part.last_commit_at is not None:
                lag_s = (applied_at - part.last_commit_at).total_seconds()
                self.latencies_ms.append(lag_s * 1000)
                latency.observe(lag_s)
                metrics.SINK_LAST_LATENCY.labels(name).set(lag_s)
        metrics.SINK_ROWS.labels(name).inc(batch.rows.height)
        metrics.SINK_BATCHES.labels(name).inc()
        metrics.SINK_CHECKPOINT_LSN.labels(name).set(self.applied_lsn or 0)
        metrics.SINK_LAST_APPLIED.labels(name).set(applied_at.timestamp())

    def _take(self) -> list[SinkBatch]:
        """The queued batches to apply next as one write (under the lock): everything queued, up
        to `merge_max_rows`. A sink that fell behind (a slow start, a long write) so catches up
        in a few large writes instead of many small ones, and the reader is soon free again."""
        taken: list[SinkBatch] = []
        rows = 0
        for batch in self._queue:
            size = batch.rows.height + batch.deltas.height + batch.dead_letters.height
            if taken and rows + size > self.options.merge_max_rows:
                break
            taken.append(batch)
            rows += size
        return taken

    def _tick(self) -> None:
        self._next_tick = time.monotonic() + 1.0
        try:
            self.sink.tick()
        except Exception as exc:  # upkeep failing is reported, never fatal
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("sink %s upkeep failed: %s", self.sink.name, self.last_error)

    def _until_applied(self, action: Callable[[], object]) -> bool:
        """Run action until it succeeds (True) or the worker closes (False)."""
        self._apply_started_at = time.monotonic()
        try:
            return self._retry(action)
        finally:
            self._apply_started_at = None

    def _retry(self, action: Callable[[], object]) -> bool:
        while True:
            try:
                action()
            except Exception as exc:
                self.failures += 1
                self._catching_up = True
                metrics.SINK_UP.labels(self.sink.name).set(0)
                metrics.SINK_ERRORS.labels(self.sink.name, type(exc).__name__).inc()
                metrics.SINK_RETRIES.labels(self.sink.name).inc()
                delay = min(
                    self.options.retry_max_s, self.options.retry_base_s * 2 ** (self.failures - 1)
                )
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "sink %s failed (attempt %d, next in %.1fs): %s",
                    self.sink.name, self.failures, delay, self.last_error,
                )  # fmt: skip
                retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)  # jitter
                with self._lock:  # new batches notify the lock: wait out the backoff anyway
                    while not self._closing and time.monotonic() < retry_at:
                        self._lock.wait(timeout=retry_at - time.monotonic())
                    if self._closing:
                        return False
                continue
            if self.failures:
                log.warning("sink %s recovered after %d failures", self.sink.name, self.failures)
            self.failures, self.last_error = 0, None
            metrics.SINK_UP.labels(self.sink.name).set(1)
            return True

    def wait_idle_or_failing(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) until the queue is applied; never for a sink that is failing, still
        starting, or waiting to be fed again from the slot (that would stall the replay)."""
        deadline = time.monotonic() + timeout_s
        while (
            self._queue
            and self.failures == 0
            and not self.needs_replay
            and self.applied_lsn is not None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued (bounded by timeout_s), then stop and release the sink."""
        deadline = time.monotonic() + timeout_s
        self.wait_idle_or_failing(timeout_s)
        with self._lock:
            self._closing = True
            self._queue.clear()
            self._lock.notify_all()
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        self.sink.close()


@dataclass
class StreamReport:
    """Running totals of one stream run, handed to `on_report` and returned at the end."""

    batches: int = 0
    transactions: int = 0
    changes: int = 0
    rows: int = 0
    dead_letters: int = 0
    unknown_content: int = 0
    first_lsn: int | None = None
    last_lsn: int = 0
    acknowledged_lsn: int = 0
    caught_up: bool = False
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    sink_errors: dict[str, str | None] = field(default_factory=dict)


# The cyclic garbage collector's generation thresholds while streaming. With CPython's (700, 10,
# 10) it runs every 700 allocations and walks the batch's live objects (decoded tuples, Changes)
# again and again: decoding and framing 100k captured changes took 1.78 s, 1.34 s with these
# (medians of 5). Memory is freed by reference counting; the collector only finds cycles.
GC_THRESHOLDS = (10_000, 10, 10)


_collecting_less = 0  # how many fewer_collections() are open (two streams in one process: tests)
_collecting_less_lock = threading.Lock()
_thresholds_before: tuple[int, int, int] = gc.get_threshold()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Collect cycles less often, and never walk what was allocated before (imports, caches:
    gc.freeze); the process's own thresholds come back when the last one open ends."""
    global _collecting_less, _thresholds_before
    with _collecting_less_lock:
        if _collecting_less == 0:
            _thresholds_before = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
        _collecting_less += 1
    try:
        yield
    finally:
        with _collecting_less_lock:
            _collecting_less -= 1
            if _collecting_less == 0:
                gc.set_threshold(*_thresholds_before)
                gc.unfreeze()


class Stream:
    """One stream run. Call `run()`; set `stop` (or send SIGTERM) to finish the batch and exit."""

    def __init__(
        self,
        *,
        dsn: str,
        slot: str,
        publication: str,
        sinks: Sequence[Sink],
        options: StreamOptions | None = None,
        rules: EnrichRules | None = None,
        on_report: Callable[[StreamReport], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.options = options or StreamOptions()
        self.rules = rules or EnrichRules()
        self.cursor = ChangeCursor(dsn, slot=slot, publication=publication)
        self.report = StreamReport()
        self.workers = [SinkWorker(sink, self.options, self.report) for sink in sinks]
        self.on_report = on_report
        self.stop = threading.Event()
        self._successor_polled_at = 0.0
        self._successor_polls = KeptConnection(
            dsn, application_name=handover_poll_application_name(slot)
        )
        self._successor_ready = False  # set once a successor waits: hand over, slot first
        self._successor_seen_at = 0.0
        self._first_batch_due = True  # the next batch is the first since the slot was opened
        self._content = fold_content_versions(content_versions([]))
        self._sampler = metrics.ProcessSampler("stream")
        fault = os.environ.get(FAULT_ENV) or None
        if fault is not None and not _valid_fault(fault, [s.name for s in sinks]):
            raise ValueError(
                f"{FAULT_ENV}={fault!r}: expected before_ack or after_sink:<"
                + "|".join(s.name for s in sinks)
                + ">"
            )
        for worker in self.workers:
            worker.fault = fault

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT finish the current batch, checkpoint and exit."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())

    def run(self) -> StreamReport:
        metrics.STREAM_RUNS.inc()
        with metrics.STREAM_RUNNING.track_inprogress(), fewer_collections():
            return self._run()

    def _run(self) -> StreamReport:
        self._content = self._content_snapshot()
        opening = time.monotonic()
        self._open_cursor()
        opened_s = time.monotonic() - opening
        metrics.SLOT_WAIT.observe(opened_s)
        log.info("slot %s open in %.0f ms", self.cursor.slot, opened_s * 1000)
        for worker in self.workers:
            worker.start()
        target = self._current_wal_lsn()
        started = last_report = sampled_at = time.monotonic()
        caught_up_at: float | None = None
        try:
            self._acknowledge(idle=False)
            while not self.stop.is_set():
                if time.monotonic() - started >= self.options.run_seconds and self._hand_over(
                    time.monotonic() - started - self.options.run_seconds
                ):
                    break
                try:
                    transactions = self._read_batch()
                except psycopg2.Error as exc:
                    self._reconnect(exc)
                    continue
                if transactions:
                    self._process(transactions)
                    caught_up_at = None
                idle = not transactions
                # The decoded changes are in the batch now: free them while the sinks write (a
                # million-row transaction holds ~0.8 GB of them).
                del transactions
                if any(w.ready_for_replay.is_set() for w in self.workers):
                    self._replay_from_slot()
                    continue
                self._acknowledge(idle=idle)
                if idle and self._drained(target):
                    self.report.caught_up = True
                    caught_up_at = caught_up_at or time.monotonic()
                    linger = self.options.linger_seconds
                    if linger is not None and time.monotonic() - caught_up_at >= linger:
                        break
                if time.monotonic() >= sampled_at + 1.0:
                    self._sample()
                    sampled_at = time.monotonic()
                if self.on_report and time.monotonic() - last_report >= self.options.report_every_s:
                    self._publish()
                    last_report = time.monotonic()
        finally:
            self._successor_polls.close()
            if self._successor_ready:
                metrics.STREAM_HANDOVERS.inc()
                self._release_slot_early()
            for worker in self.workers:
                worker.close()
            if not self._successor_ready and self.cursor.is_open:
                self._acknowledge(idle=False)
                self.cursor.close()
        self._sample()
        self._publish()
        return self.report

    def _sample(self) -> None:
        """Once a second: process CPU and memory, and whether each sink is up."""
        self._sampler.sample()
        for worker in self.workers:
            metrics.SINK_UP.labels(worker.sink.name).set(int(worker.up))

    def _release_slot_early(self) -> None:
        """Handing over: give the sinks a moment to finish, acknowledge what every sink has
        applied and free the slot, before a slow sink (ClickHouse draining its queue) is done.

        The successor then re-reads from the lowest checkpoint while our slow sink finishes, and
        the per-sink protocol keeps both exact: ClickHouse re-inserts identical versions and its
        checkpoint is the max; a Redis script applies only above the checkpoint it finds (a
        moved one makes the writer re-read it); the successor's Kafka producer fences ours.
        """
        started = time.monotonic()
        deadline = started + HANDOVER_DRAIN_S
        for worker in self.workers:
            worker.wait_idle_or_failing(max(0.0, deadline - time.monotonic()))
        try:
            self._acknowledge(idle=False)
        finally:
            self.cursor.close()
        busy = [w.sink.name for w in self.workers if not w.idle]
        log.info(
            "handover: slot released %.0f ms after the last batch; still finishing: %s",
            (time.monotonic() - started) * 1000, ", ".join(busy) or "nothing",
        )  # fmt: skip

    def _hand_over(self, overtime_s: float) -> bool:
        """Whether a run past its run_seconds ends now: at once without a grace, else when a
        successor waits for the slot (and the slot's restart point is close, see
        handover_restart_wait_seconds) or the grace is over. Polled at most every 0.1 s, on one
        connection."""
        if overtime_s >= self.options.handover_grace_seconds:
            return True
        now = time.monotonic()
        if now - self._successor_polled_at < SUCCESSOR_POLL_S:
            return False
        self._successor_polled_at = now
        distance: int | None = None
        try:
            with self._successor_polls.use() as conn:
                if not self._successor_ready:
                    self._successor_ready = successor_waiting(conn, self.cursor.slot)
                    self._successor_seen_at = now
                if self._successor_ready and self.options.handover_restart_wait_seconds > 0:
                    distance = restart_distance(conn, self.cursor.slot)
        except psycopg2.Error as exc:
            log.warning("could not look for a successor (%s); streaming on", exc)
        if not self._successor_ready:
            return False
        waited_s = now - self._successor_seen_at
        if (
            distance is not None
            and distance > HANDOVER_RESTART_BYTES
            and waited_s < self.options.handover_restart_wait_seconds
        ):
            return False  # the successor would re-decode `distance` bytes first: not yet
        log.info(
            "handover: a successor waits (%.1f s); it re-decodes %s bytes of WAL",
            waited_s, "unknown" if distance is None else f"{distance:,}",
        )  # fmt: skip
        return True

    def _drained(self, target: int) -> bool:
        """Caught up with the WAL as it was when the run started, every sink applied."""
        if not all(worker.idle for worker in self.workers):
            return False
        return self.cursor.position.server_wal_end >= target

    def _open_cursor(self, start_lsn: int = 0) -> None:
        self.cursor.open(start_lsn)
        self._first_batch_due = True

    def _read_batch(self) -> list[Transaction]:
        """Whole transactions for up to batch_max_ms after the first (FIRST_BATCH_MAX_MS for the
        first batch since the slot was opened), or batch_max_rows."""
        first = self.cursor.read(timeout_s=0.25)
        if first is None:
            return []
        batch = [first]
        rows = len(first.changes)
        window_ms = self.options.batch_max_ms
        if self._first_batch_due:
            window_ms = min(window_ms, FIRST_BATCH_MAX_MS)
            self._first_batch_due = False
        deadline = time.monotonic() + window_ms / 1000
        while rows < self.options.batch_max_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            transaction = self.cursor.read(timeout_s=remaining)
            if transaction is None:
                break
            batch.append(transaction)
            rows += len(transaction.changes)
        return batch

    def _process(self, transactions: list[Transaction]) -> None:
        changes, versions, letters = self._frames(transactions)
        content = content_versions(self._content, versions)
        enriched = enrich(changes, content, self.rules)
        self._content = fold_content_versions(content)
        dead_letters = enriched.dead_letters
        if letters:
            dead_letters = pl.concat([dead_letters, _stream_letters(letters)])
        batch = SinkBatch(
            last_lsn=transactions[-1].commit_lsn,
            rows=enriched.rows,
            deltas=enriched.deltas,
            dead_letters=dead_letters,
            first_commit_at=transactions[0].commit_ts,
            last_commit_at=transactions[-1].commit_ts,
        )
        for worker in self.workers:
            worker.submit(batch, stop=self.stop)
        report = self.report
        report.batches += 1
        report.transactions += len(transactions)
        report.changes += sum(len(t.changes) for t in transactions)
        report.rows += enriched.rows.height
        report.dead_letters += dead_letters.height
        report.unknown_content += enriched.unknown_content
        report.first_lsn = report.first_lsn or transactions[0].commit_lsn
        report.last_lsn = batch.last_lsn
        _observe_batch(transactions, changes, enriched.rows, dead_letters, enriched.unknown_content)

    def _frames(
        self, transactions: list[Transaction]
    ) -> tuple[pl.DataFrame, list[ContentVersion], list[_Letter]]:
        """The batch's event changes as text columns, its content versions, and the dead letters
        decided here: truncates, and event changes whose table version lacks a column the rows
        need (schema_mismatch: delivered as dead letters in this batch, never dropped)."""
        ops: list[str] = []
        lsns: list[int] = []
        commits: list[int] = []  # microseconds since the epoch: a Series of datetimes is ~1 us each
        image: list[list[str | None]] = [[] for _ in EVENT_COLUMNS]
        old: list[list[str | None]] = [[] for _ in EVENT_COLUMNS]
        versions: list[ContentVersion] = []
        letters: list[_Letter] = []
        run = _Run(EVENT_COLUMNS, ())  # the changes of one relation version in a row
        for transaction in transactions:
            at = _micros(transaction.commit_ts)
            for change in transaction.changes:
                if change.op == "truncate":
                    raw = f'{{"op": "truncate", "table": "{change.table}"}}'
                    lsn, ts = transaction.commit_lsn, transaction.commit_ts
                    letters.append((lsn, None, "truncate", "truncate", raw, ts))
                    continue
                if change.table == CONTENT_TABLE:
                    if not _content_readable(change):
                        continue
                    new_row = _text_row(change.columns, change.new or change.old)
                    old_row = _text_row(change.columns, change.old) if change.old else None
                    versions.extend(
                        content_versions_from_change(
                            change.op, new_row, old_row, transaction.commit_lsn
                        )
                    )
                    continue
                if change.table != EVENTS_TABLE:
                    continue
                # One relation version's changes share their tuples: compared by identity.
                if change.columns is not run.columns or change.column_types is not run.types:
                    run.into(image, old)
                    run = _Run(change.columns, change.column_types)
                if run.shape.mismatch is not None:
                    letters.append(_mismatch_letter(transaction, change))
                    continue
                op = change.op
                run.images.append((change.new if op != "delete" else change.old) or run.blank)
                run.olds.append((change.old if op != "insert" else None) or run.blank)
                ops.append(op)
                lsns.append(transaction.commit_lsn)
                commits.append(at)
        run.into(image, old)
        data: dict[str, object] = {
            "seq": pl.Series("seq", range(len(ops)), dtype=pl.UInt32),
            "op": pl.Series("op", ops, dtype=pl.String),
            "source_lsn": pl.Series("source_lsn", lsns, dtype=pl.UInt64),
            "source_committed_at": pl.Series(commits, dtype=pl.Int64).cast(
                pl.Datetime("us", "UTC")
            ),
        }
        for i, name in enumerate(EVENT_COLUMNS):
            data[name] = _text_series(name, image[i])
            data[f"old_{name}"] = _text_series(f"old_{name}", old[i])
        return pl.DataFrame(data).select(CHANGES_SCHEMA.names()), versions, letters

    def _replay_from_slot(self) -> None:
        """Re-read the slot from the lowest checkpoint; sinks skip what they already have."""
        for worker in self.workers:
            worker.wait_idle_or_failing()
        log.warning("a lagging sink is back: re-reading the slot from the lowest checkpoint")
        self.cursor.close()
        self._open_cursor()
        self._content = self._content_snapshot()
        for worker in self.workers:
            worker.resume()

    def _reconnect(self, error: psycopg2.Error) -> None:
        """The replication connection broke: open it again once the server answers, right after
        the last transaction handed to the sinks. What was read but not yet batched is sent
        again, nothing batched is read twice, and the slot's confirmed position (the lowest
        checkpoint) is untouched. Fails after RECONNECT_GIVE_UP_S, or at once when the slot
        itself is gone or taken (SlotLost, SlotBusy)."""
        log.warning("replication connection lost (%s); reconnecting", str(error).strip())
        self.cursor.close()
        after = self.report.last_lsn
        started = time.monotonic()
        delay = 0.1
        while not self.stop.is_set():
            try:
                self._open_cursor(start_lsn=after + 1 if after else 0)
            except psycopg2.OperationalError as exc:
                if time.monotonic() - started > RECONNECT_GIVE_UP_S:
                    raise RuntimeError(
                        f"PostgreSQL did not accept the replication connection again within "
                        f"{RECONNECT_GIVE_UP_S:.0f} s ({str(exc).strip()}); the run ends, the "
                        "next one continues from the slot"
                    ) from exc
                self.stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
                continue
            log.warning(
                "replication connection back after %.1f s, continuing after %s",
                time.monotonic() - started, format_lsn(after),
            )  # fmt: skip
            return

    def _acknowledge(self, *, idle: bool) -> None:
        """Move the slot to the lowest checkpoint (and past idle WAL when all is applied)."""
        known = [worker.applied_lsn for worker in self.workers]
        if any(lsn is None for lsn in known):
            return  # a sink has not told its checkpoint yet: the slot stays where it is
        lowest = min(lsn for lsn in known if lsn is not None)
        if any(worker.fault == "before_ack" for worker in self.workers) and self.report.batches:
            _kill_self("before_ack")
        try:
            if idle and all(worker.idle for worker in self.workers):
                self.cursor.acknowledge_idle(lowest)
            else:
                self.cursor.acknowledge(lowest)
        except psycopg2.Error as exc:  # the connection broke: the next read reconnects
            log.warning("could not acknowledge %s: %s", format_lsn(lowest), str(exc).strip())
            return
        self.report.acknowledged_lsn = self.cursor.position.acknowledged_lsn
        metrics.STREAM_ACKED_LSN.set(self.report.acknowledged_lsn)

    def _publish(self) -> None:
        for worker in self.workers:
            self.report.latencies_ms[worker.sink.name] = list(worker.latencies_ms)
            self.report.sink_errors[worker.sink.name] = worker.last_error
        if self.on_report:
            self.on_report(self.report)

    def _content_snapshot(self) -> pl.DataFrame:
        """Content as of now, valid since before anything replayed (valid_from_lsn 0)."""
        with connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(CONTENT_SNAPSHOT)
            rows = cur.fetchall()
        return fold_content_versions(
            content_versions([ContentVersion(str(i), t, n, 0) for i, t, n in rows])
        )

    def _current_wal_lsn(self) -> int:
        from engagement_dagster.lib.pgoutput import parse_lsn

        with connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(CURRENT_WAL_LSN)
            row = cur.fetchone()
        return parse_lsn(row[0]) if row else 0


def _observe_batch(
    transactions: list[Transaction],
    changes: pl.DataFrame,
    rows: pl.DataFrame,
    dead_letters: pl.DataFrame,
    unknown_content: int,
) -> None:
    """A read batch's metrics: changes by table and operation, dead letters by reason, and the
    business counters (events and engagement by content type)."""
    total = sum(len(t.changes) for t in transactions)
    metrics.BATCH_ROWS.observe(total)
    metrics.STREAM_READ_LSN.set(transactions[-1].commit_lsn)
    for op, count in changes.group_by("op").len().iter_rows():
        metrics.CHANGES_READ.labels(EVENTS_TABLE, op).inc(count)
    mismatched = dead_letters.filter(pl.col("reason") == REASON_SCHEMA_MISMATCH)
    for op, count in mismatched.group_by("op").len().iter_rows():
        metrics.CHANGES_READ.labels(EVENTS_TABLE, op).inc(count)
    others = total - changes.height - mismatched.height
    if others:  # content changes and truncates: rare, counted one by one
        for transaction in transactions:
            for change in transaction.changes:
                if change.table != EVENTS_TABLE or change.op == "truncate":
                    metrics.CHANGES_READ.labels(change.table, change.op).inc()
    for reason, count in dead_letters.group_by("reason").len().iter_rows():
        metrics.DEAD_LETTERS.labels(reason).inc(count)
    metrics.UNKNOWN_CONTENT.inc(unknown_content)
    live = rows.filter(pl.col("is_deleted") == 0)
    by_type = live.group_by(
        pl.col("content_type").fill_null("unknown"), pl.col("event_type").fill_null("unknown")
    ).agg(pl.len(), pl.col("engagement_seconds").sum())
    for content_type, event_type, count, seconds in by_type.iter_rows():
        metrics.ENRICHED_EVENTS.labels(content_type, event_type).inc(count)
        metrics.ENGAGEMENT_SECONDS.labels(content_type).inc(seconds or 0.0)


def _valid_fault(fault: str, sink_names: list[str]) -> bool:
    return fault == "before_ack" or fault in {f"after_sink:{name}" for name in sink_names}


def _kill_self(point: str) -> None:
    """Fault injection: die as kill -9 would, with no cleanup at all."""
    log.error("fault injection: kill -9 at %s", point)
    os.kill(os.getpid(), signal.SIGKILL)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // _MICROSECOND


class _Run:
    """Consecutive changes of one version of engagement_events, gathered as whole tuples and
    turned into columns at once (zip), 2x faster than appending value by value."""

    def __init__(self, columns: tuple[str, ...], types: tuple[int, ...]) -> None:
        self.columns, self.types = columns, types
        self.shape = _shape(columns, types)
        self.blank: tuple[None, ...] = (None,) * len(columns)  # no old image: every value NULL
        self.images: list[tuple[object, ...]] = []
        self.olds: list[tuple[object, ...]] = []

    def into(self, image: list[list[str | None]], old: list[list[str | None]]) -> None:
        if not self.images:
            return
        absent = (None,) * len(self.images)
        for gathered, out in ((self.images, image), (self.olds, old)):
            by_column = list(zip(*gathered, strict=True))
            for i, p in enumerate(self.shape.positions):
                out[i].extend(by_column[p] if p >= 0 else absent)


def _text_series(name: str, values: list[str | None]) -> pl.Series:
    """Decoded values are text or None; an unresolved TOAST marker cannot be enriched. Polars
    refuses any other value, so the marker is looked for only then (looking always: 0.5 s of
    a 500k-change catch-up)."""
    try:
        return pl.Series(name, values, dtype=pl.String)
    except (TypeError, ValueError):
        if UNCHANGED_TOAST not in values:
            raise
    raise ValueError(UNRESOLVED_TOAST)


def _text(value: object) -> str | None:
    """Decoded values are text or None; an unresolved TOAST marker cannot be enriched."""
    if value is None or isinstance(value, str):
        return value
    raise ValueError(UNRESOLVED_TOAST)


UNRESOLVED_TOAST = (
    "an unchanged TOASTed value could not be resolved from the old row: "
    "engagement_events needs REPLICA IDENTITY FULL (run `engagement db init`)"
)


def _text_row(columns: tuple[str, ...], values: tuple[object, ...] | None) -> dict[str, str | None]:
    """A content row as text by column; unchanged TOAST values (long titles) are left out."""
    return {
        name: value
        for name, value in zip(columns, values or (), strict=False)
        if value is None or isinstance(value, str)
    }


# Versions of the source tables seen by this process (a Relation message each; the server
# resends one after ALTER TABLE, TRUNCATE and at every connection): each is said once.
_SHAPES: dict[tuple[tuple[str, ...], tuple[int, ...]], EventShape] = {}
_CONTENT_SHAPES: set[tuple[tuple[str, ...], tuple[int, ...]]] = set()
SCHEMA_HELP = "README.md, 'Schema evolution'"


def _shape(columns: tuple[str, ...], types: tuple[int, ...]) -> EventShape:
    """How to read one version of engagement_events (lib/event_schema.py); logged the first
    time a version other than `engagement db init`'s is seen."""
    shape = _SHAPES.get((columns, types))
    if shape is None:
        shape = _SHAPES[(columns, types)] = event_shape(columns, types)
        if shape.mismatch is not None:
            log.error(
                "schema mismatch: %s. Until it is fixed every change of %s is a dead letter "
                "(reason %s) and the stream goes on; the changes made meanwhile are recovered "
                "as %s says",
                shape.mismatch, EVENTS_TABLE, REASON_SCHEMA_MISMATCH, SCHEMA_HELP,
            )  # fmt: skip
        elif shape.ignored:
            log.warning(
                "%s has columns the enriched contract does not carry: %s. Enrichment ignores "
                "them and every change is still delivered (%s)",
                EVENTS_TABLE, ", ".join(shape.ignored), SCHEMA_HELP,
            )  # fmt: skip
    return shape


def _content_readable(change: Change) -> bool:
    """Content is reference data: a missing or retyped field is NULL in the rows (as for unknown
    content), never a dead letter; without an id a change names no content and is skipped.
    Said once per version of the table."""
    key = (change.columns, change.column_types)
    if key not in _CONTENT_SHAPES:
        _CONTENT_SHAPES.add(key)
        mismatch = content_mismatch(*key)
        if mismatch is not None:
            log.error(
                "schema mismatch: %s. Events keep flowing with the content fields it gives NULL; "
                "content changes without an id are skipped (%s)", mismatch, SCHEMA_HELP,
            )  # fmt: skip
    return "id" in change.columns


_INT64 = re.compile(r"^-?[0-9]{1,19}$")
# A dead letter the stream decides itself: (source_lsn, event_id, reason, op, raw_change,
# source_committed_at), in DEAD_LETTERS_SCHEMA order.
_Letter = tuple[int, int | None, str, str, str, datetime]


def _mismatch_letter(transaction: Transaction, change: Change) -> _Letter:
    """A change of a table version the rows cannot be built from, kept whole: `op`, then every
    column of its relation by name (the image: NEW, or OLD for a delete) and `old_<name>` (the
    OLD image), as text, the shape lib/enrich.py gives its dead letters' raw changes."""
    main = change.new if change.op != "delete" else change.old
    prior = change.old if change.op != "insert" else None
    raw: dict[str, str | None] = {"op": change.op}
    for i, name in enumerate(change.columns):
        raw[name] = _text(main[i]) if main is not None else None
    for i, name in enumerate(change.columns):
        raw[f"old_{name}"] = _text(prior[i]) if prior is not None else None
    id_text = raw.get("id")  # absent when the id column is what went missing
    event_id = int(id_text) if id_text is not None and _INT64.match(id_text) else None
    if event_id is not None and not -(2**63) <= event_id < 2**63:
        event_id = None
    return (
        transaction.commit_lsn,
        event_id,
        REASON_SCHEMA_MISMATCH,
        change.op,
        json.dumps(raw, ensure_ascii=False, separators=(",", ":")),
        transaction.commit_ts,
    )


def _stream_letters(letters: list[_Letter]) -> pl.DataFrame:
    """TRUNCATE cannot be replayed row by row, nor a change the rows cannot be built from:
    record them where operators look."""
    return pl.DataFrame(letters, schema=DEAD_LETTERS_SCHEMA, orient="row")
