"""The change cursor: whole transactions from the logical replication slot, in commit order.

It acknowledges to the server only the LSN the caller hands it (the lowest sink checkpoint), so
a crash anywhere replays and never skips; it never decides on its own what has been applied.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from engagement_dagster.lib.pgoutput import Transaction, format_lsn, new_assembler
from engagement_dagster.lib.secure import pg_connect


class SlotBusy(RuntimeError):
    """Another process is consuming the slot (a live stream run); wait or exit."""


class SlotLost(RuntimeError):
    """The slot was invalidated (wal_status lost): the changes since its position are gone from
    the WAL. Only a restart from a point (README runbook) continues the stream."""


RESTART_RUNBOOK = (
    "restart from a point (README, 'Restart from a point'): stop change_cursor_sensor and any "
    "stream run, then `engagement restart --from <a time before the stream fell behind>`"
)


@dataclass(frozen=True)
class CursorPosition:
    acknowledged_lsn: int  # what we told the server is flushed
    server_wal_end: int  # the server's WAL end, from the last message or keepalive


class ChangeCursor:
    """One replication connection on one slot. Not thread-safe: one reader thread owns it."""

    def __init__(
        self, dsn: str, *, slot: str, publication: str, status_interval_s: int = 10
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.status_interval_s = status_interval_s
        self._conn: psycopg2.extras.LogicalReplicationConnection | None = None
        self._cursor: psycopg2.extras.ReplicationCursor | None = None
        self._assembler = new_assembler()
        self._acknowledged = 0
        self._last_commit_lsn = 0  # of the last whole transaction read

    def open(self, start_lsn: int = 0) -> None:
        """Start streaming from the slot's confirmed position (or start_lsn when later)."""
        # TLS and password as every connection (lib/secure.py); a refusal says which setting.
        conn = pg_connect(
            self.dsn,
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
            # Text output of timestamptz in UTC: the enrichment parses '...+00'.
            options="-c TimeZone=UTC -c DateStyle=ISO",
            application_name=f"engagement-stream:{self.slot}",
            connect_timeout=10,
        )
        cursor = conn.cursor()
        try:
            cursor.start_replication(
                slot_name=self.slot,
                decode=False,
                start_lsn=start_lsn,
                status_interval=self.status_interval_s,
                options={"proto_version": "1", "publication_names": self.publication},
            )
        except psycopg2.errors.ObjectInUse as exc:
            conn.close()
            raise SlotBusy(
                f"replication slot {self.slot!r} is in use by another process: {exc}".strip()
            ) from exc
        except psycopg2.errors.ObjectNotInPrerequisiteState as exc:  # invalidated: WAL removed
            conn.close()
            server = " ".join(str(exc).split())
            raise SlotLost(
                f"replication slot {self.slot!r} can no longer be read ({server}): wal_status is "
                "lost, the WAL it still needed was removed (max_slot_wal_keep_size) while no "
                f"stream consumed it, so changes since its position are gone. To recover: "
                f"{RESTART_RUNBOOK}"
            ) from exc
        self._conn, self._cursor = conn, cursor
        self._assembler = new_assembler()
        self._acknowledged = max(self._acknowledged, start_lsn)

    @property
    def position(self) -> CursorPosition:
        wal_end = int(getattr(self._cursor, "wal_end", 0) or 0)
        return CursorPosition(self._acknowledged, wal_end)

    def read(self, timeout_s: float) -> Transaction | None:
        """The next whole transaction, or None when none completes within timeout_s."""
        cursor = self._require_cursor()
        deadline = time.monotonic() + timeout_s
        while True:
            message = cursor.read_message()
            if message is not None:
                transaction = self._assembler.feed(message.payload)
                if transaction is not None:
                    self._last_commit_lsn = transaction.commit_lsn
                    return transaction
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # poll, not select: select() fails on descriptors above 1023 (a busy process)
            waiter = select.poll()
            waiter.register(cursor.fileno(), select.POLLIN)
            waiter.poll(min(remaining, 1.0) * 1000)

    def acknowledge(self, lsn: int) -> None:
        """Tell the server everything up to lsn is durably applied by every sink."""
        if lsn > self._acknowledged:
            self._require_cursor().send_feedback(
                flush_lsn=lsn, write_lsn=lsn, reply=False, force=True
            )
            self._acknowledged = lsn

    def acknowledge_idle(self, all_applied_lsn: int) -> None:
        """While caught up, let an idle slot move to the server's WAL end so it pins no WAL.

        Only safe when every transaction read so far is applied by every sink: the server will
        still send any transaction that commits after the acknowledged position.
        """
        if all_applied_lsn < self._last_commit_lsn or self._assembler.in_transaction:
            return
        self.acknowledge(max(all_applied_lsn, self.position.server_wal_end))

    def _require_cursor(self) -> psycopg2.extras.ReplicationCursor:
        if self._cursor is None:
            raise RuntimeError("the change cursor is not open; call open() first")
        return self._cursor

    @property
    def is_open(self) -> bool:
        return self._cursor is not None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._cursor = None

    def describe(self) -> str:
        return f"slot {self.slot} acknowledged {format_lsn(self._acknowledged)}"
