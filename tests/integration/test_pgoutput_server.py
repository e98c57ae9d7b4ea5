"""The pgoutput decoder on bytes the real PostgreSQL sends, through the slot functions and the wire.

Uses its own temporary slots, publication, scratch table, enum type and replication origin, all
dropped afterwards; the rows it adds to the shared tables are deleted, so they are left as found.
"""

from __future__ import annotations

import contextlib
import json
import random
import select
import string
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest

from engagement_dagster.lib.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Change,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    PgOutputError,
    Relation,
    Transaction,
    TransactionAssembler,
    Truncate,
    Type,
    Update,
    decode_message,
    new_assembler,
)

UTC_SESSION = "-c TimeZone=UTC"
EVENT_COLUMNS = (
    "id",
    "content_id",
    "user_id",
    "event_type",
    "event_ts",
    "duration_ms",
    "device",
    "raw_payload",
)
CONTENT_COLUMNS = ("id", "slug", "title", "content_type", "length_seconds", "publish_ts")
UNICODE_TITLE = "Café naïve — 東京の夜 🎧🚀"
UNICODE_DEVICE = "télé 📺"
SMALL_PAYLOAD = {
    "source": "app",
    "pos_ms": 12,
    "label": "ça va 你好 👍",
    "nested": {"a": [1, None]},
}
# Incompressible, so that PostgreSQL stores it out of line (TOAST) instead of compressing inline.
BIG_PAYLOAD = {"blob": "".join(random.Random(7).choices(string.ascii_letters, k=200_000))}
ORIGIN_LSN = 0xABCDEF


@dataclass
class Written:
    """What the workload wrote, to compare the decoded values with."""

    suffix: str
    content: list[str] = field(default_factory=list)  # C1 unicode, C2 nulls, C3 re-keyed/deleted
    events: list[int] = field(default_factory=list)  # E1..E4
    rekeyed_c3: str = ""
    user: str = str(uuid.UUID(int=0x1234))
    kept_content_rows: int = 0
    kept_event_rows: int = 0
    transactions: int = 0

    @property
    def scratch(self) -> str:
        return f"pgoutput_scratch_{self.suffix}"


@dataclass
class Captured:
    written: Written
    sql: list[tuple[int, bytes]]  # (lsn, payload) from pg_logical_slot_get_binary_changes
    wire: list[tuple[int, bytes]]  # (data_start, payload) from the streaming protocol
    binary: list[tuple[int, bytes]]  # peeked with the 'binary' option
    transactions: list[Transaction]

    def messages(self) -> list[Message]:
        return [decode_message(payload, wal_lsn=lsn) for lsn, payload in self.sql]

    def changes(self, table: str) -> list[Change]:
        return [c for t in self.transactions for c in t.changes if c.table == table]


def _connect(dsn: str) -> psycopg2.extensions.connection:
    return psycopg2.connect(dsn, options=UTC_SESSION, connect_timeout=5)


def _connect_replication(dsn: str) -> psycopg2.extras.LogicalReplicationConnection:
    return psycopg2.connect(
        dsn,
        options=UTC_SESSION,
        connect_timeout=5,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
    )


def _one(cur: psycopg2.extensions.cursor) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None
    return row


def _run_workload(writer: psycopg2.extensions.connection, w: Written, origin: str) -> None:
    """Every kind of change the stream has to decode, one committed transaction per step."""
    cur = writer.cursor()

    def commit() -> None:
        writer.commit()
        w.transactions += 1

    c1, c2, c3 = (str(uuid.uuid4()) for _ in range(3))
    w.content = [c1, c2, c3]
    w.rekeyed_c3 = str(uuid.uuid4())
    # 1: content with unicode, content with every nullable column NULL.
    cur.execute(
        "INSERT INTO content VALUES (%s, %s, %s, 'podcast', 1800, '2024-05-01 12:34:56.789+00'),"
        " (%s, %s, NULL, NULL, NULL, NULL), (%s, %s, 'c3', 'video', 60, NULL)",
        (c1, f"c1-{w.suffix}", UNICODE_TITLE, c2, f"c2-{w.suffix}", c3, f"c3-{w.suffix}"),
    )
    commit()
    # 2: two events, one with NULL duration and unicode device.
    insert_event = (
        "INSERT INTO engagement_events"
        " (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id"
    )
    ts = "2024-05-01 13:00:00.000001+00"
    for args in [
        (c1, w.user, "play", ts, None, UNICODE_DEVICE, json.dumps(SMALL_PAYLOAD)),
        (c1, w.user, "finish", ts, 90_000, "ios", json.dumps(SMALL_PAYLOAD)),
    ]:
        cur.execute(insert_event, args)
        w.events.append(_one(cur)[0])
    commit()
    e1, e2 = w.events
    # 3: one transaction of three statements: insert, move content_id + NULL a value, delete.
    cur.execute(insert_event, (c2, w.user, "click", ts, 0, None, None))
    w.events.append(_one(cur)[0])
    cur.execute(
        "UPDATE engagement_events SET content_id = %s, duration_ms = NULL WHERE id = %s", (c2, e2)
    )
    cur.execute("DELETE FROM engagement_events WHERE id = %s", (e1,))
    commit()
    # 4: a TOASTed payload, then 5: an update of another column (the new tuple carries 'u').
    cur.execute(insert_event, (c1, w.user, "play", ts, 5, "web", json.dumps(BIG_PAYLOAD)))
    e4 = _one(cur)[0]
    w.events.append(e4)
    commit()
    cur.execute("UPDATE engagement_events SET device = 'tv' WHERE id = %s", (e4,))
    commit()
    # 6: content has REPLICA IDENTITY DEFAULT: a plain update sends no old tuple, a key change
    # sends the old key ('K'), and 7: a delete sends the key only.
    cur.execute("UPDATE content SET title = NULL WHERE id = %s", (c1,))
    cur.execute("UPDATE content SET id = %s WHERE id = %s", (w.rekeyed_c3, c3))
    commit()
    cur.execute("DELETE FROM content WHERE id = %s", (w.rekeyed_c3,))
    commit()
    # 8: TRUNCATE both shared tables and put every row back in the same transaction, so that no
    # other session ever sees them empty.
    cur.execute("SELECT (SELECT count(*) FROM content), (SELECT count(*) FROM engagement_events)")
    w.kept_content_rows, w.kept_event_rows = _one(cur)
    cur.execute("CREATE TEMP TABLE keep_content ON COMMIT DROP AS SELECT * FROM content")
    cur.execute("CREATE TEMP TABLE keep_events ON COMMIT DROP AS SELECT * FROM engagement_events")
    cur.execute("TRUNCATE content, engagement_events")
    cur.execute("INSERT INTO content SELECT * FROM keep_content")
    cur.execute("INSERT INTO engagement_events SELECT * FROM keep_events")
    commit()
    # 9-11: the scratch table: an enum column (Type message), ADD COLUMN mid-stream (a new
    # Relation message), TRUNCATE ... RESTART IDENTITY CASCADE (both option bits).
    cur.execute(f"INSERT INTO {w.scratch} (mood, note) VALUES ('happy', 'before')")
    commit()
    cur.execute(f"ALTER TABLE {w.scratch} ADD COLUMN extra integer")
    writer.commit()  # DDL alone: pgoutput sends nothing for it
    cur.execute(f"INSERT INTO {w.scratch} (mood, note, extra) VALUES ('sad', 'after', 7)")
    commit()
    cur.execute(f"TRUNCATE {w.scratch} RESTART IDENTITY CASCADE")
    commit()
    # 12: a transaction replayed from a replication origin, with a transactional message.
    writer.autocommit = True
    cur.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
    writer.autocommit = False
    cur.execute(
        "SELECT pg_replication_origin_xact_setup(%s, '2024-01-02 03:04:05+00')", ("0/ABCDEF",)
    )
    cur.execute(f"INSERT INTO {w.scratch} (mood, note) VALUES ('happy', 'from origin')")
    cur.execute("SELECT pg_logical_emit_message(true, 'engagement-test', %s)", ("héllo ✓",))
    commit()
    writer.autocommit = True
    cur.execute("SELECT pg_replication_origin_session_reset()")
    cur.close()


def _read_wire(
    replication: psycopg2.extras.LogicalReplicationConnection,
    slot: str,
    options: dict[str, str],
    transactions: int,
    timeout_s: float = 30.0,
) -> list[tuple[int, bytes]]:
    """Stream from `slot` until `transactions` Commits arrived, acknowledging as we go."""
    cur = cast(psycopg2.extras.ReplicationCursor, replication.cursor())
    cur.start_replication(slot_name=slot, decode=False, options=options)
    received: list[tuple[int, bytes]] = []
    commits = 0
    deadline = time.monotonic() + timeout_s
    while commits < transactions:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{commits}/{transactions} commits from the wire in {timeout_s}s"
        message = cur.read_message()
        if message is None:
            select.select([replication], [], [], min(remaining, 1.0))
            continue
        payload = bytes(message.payload)
        received.append((message.data_start, payload))
        if payload[:1] == b"C":
            commits += 1
            # Acknowledge whole transactions only, by the end of their commit record.
            commit = decode_message(payload, wal_lsn=message.data_start)
            assert isinstance(commit, Commit)
            cur.send_feedback(write_lsn=commit.end_lsn, flush_lsn=commit.end_lsn)
    return received


def _drop_slot(cur: psycopg2.extensions.cursor, slot: str, timeout_s: float = 10.0) -> None:
    """Drop `slot` if it survived its connection: a slot left behind pins WAL for everyone."""
    deadline = time.monotonic() + timeout_s
    while True:
        cur.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        row = cur.fetchone()
        if row is None:
            return
        if row[0] is None:
            # A temporary slot may go with its connection meanwhile.
            with contextlib.suppress(psycopg2.errors.UndefinedObject):
                cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return
        assert time.monotonic() < deadline, f"slot {slot} still held by pid {row[0]}"
        cur.execute("SELECT pg_terminate_backend(%s)", row)
        time.sleep(0.1)


def _drop_leftovers(dsn: str, w: Written, slots: list[str], origin: str, pub: str) -> None:
    conn = _connect(dsn)
    conn.autocommit = True
    try:
        cur = conn.cursor()
        for slot in slots:
            _drop_slot(cur, slot)
        cur.execute("DELETE FROM engagement_events WHERE id = ANY(%s)", (w.events,))
        content = [c for c in (*w.content, w.rekeyed_c3) if c]
        cur.execute("DELETE FROM content WHERE id = ANY(%s::uuid[])", (content,))
        cur.execute(f"DROP PUBLICATION IF EXISTS {pub}")
        cur.execute(f"DROP TABLE IF EXISTS {w.scratch}")
        cur.execute(f"DROP TYPE IF EXISTS pgoutput_mood_{w.suffix}")
        cur.execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin "
            "WHERE roname = %s",
            (origin,),
        )
    finally:
        conn.close()


@pytest.fixture(scope="module")
def captured(source_dsn: str) -> Iterator[Captured]:
    w = Written(suffix=uuid.uuid4().hex[:10])
    pub, origin = f"pgoutput_pub_{w.suffix}", f"pgoutput_origin_{w.suffix}"
    sql_slot, wire_slot = f"pgoutput_sql_{w.suffix}", f"pgoutput_wire_{w.suffix}"
    options = {"proto_version": "1", "publication_names": pub, "messages": "true"}
    slot_args = [item for pair in options.items() for item in pair]
    admin = writer = replication = None
    try:
        admin = _connect(source_dsn)
        admin.autocommit = True
        cur = admin.cursor()
        cur.execute(f"CREATE TYPE pgoutput_mood_{w.suffix} AS ENUM ('happy', 'sad')")
        cur.execute(
            f"CREATE TABLE {w.scratch} (id serial PRIMARY KEY, "
            f"mood pgoutput_mood_{w.suffix}, note text)"
        )
        # The publication must exist before the slots: pgoutput reads it as of each change.
        cur.execute(f"CREATE PUBLICATION {pub} FOR TABLE content, engagement_events, {w.scratch}")
        cur.execute("SELECT pg_replication_origin_create(%s)", (origin,))
        # Temporary slots: dropped by the server with their connection, whatever happens here.
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', true)", (sql_slot,))
        replication = _connect_replication(source_dsn)
        replication.cursor().execute(
            f"CREATE_REPLICATION_SLOT {wire_slot} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        )
        writer = _connect(source_dsn)
        _run_workload(writer, w, origin)

        cur.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes"
            f"(%s, NULL, NULL, {', '.join(['%s'] * (len(slot_args) + 2))})",
            (sql_slot, *slot_args, "binary", "true"),
        )
        binary = [(_lsn(lsn), bytes(data)) for lsn, data in cur.fetchall()]
        cur.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes"
            f"(%s, NULL, NULL, {', '.join(['%s'] * len(slot_args))})",
            (sql_slot, *slot_args),
        )
        sql = [(_lsn(lsn), bytes(data)) for lsn, data in cur.fetchall()]
        wire = _read_wire(replication, wire_slot, options, w.transactions)

        assembler = TransactionAssembler()
        transactions = [t for lsn, data in sql if (t := assembler.feed(data, wal_lsn=lsn))]
        yield Captured(w, sql, wire, binary, transactions)
    finally:
        for conn in (writer, replication, admin):
            if conn is not None:
                conn.close()
        _drop_leftovers(source_dsn, w, [sql_slot, wire_slot], origin, pub)


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


# ---------------------------------------------------------------------------------------------


def test_the_wire_and_the_slot_functions_carry_the_same_bytes(captured: Captured) -> None:
    assert [p for _, p in captured.wire] == [p for _, p in captured.sql]
    # The walsender stamps only the last message a decoding callback writes with its LSN; the
    # ones before it (Relation, Type, and a Begin followed by Origin) carry data_start 0.
    unstamped = [chr(p[0]) for lsn, p in captured.wire if lsn == 0]
    assert set(unstamped) == {"R", "Y", "B"} and unstamped.count("B") == 1
    assert all(w == s for (w, _), (s, _) in zip(captured.wire, captured.sql, strict=True) if w)
    assert len(captured.transactions) == captured.written.transactions
    for wire_assembler in (TransactionAssembler(), new_assembler()):  # the stream's: native
        from_wire = [
            t for lsn, data in captured.wire if (t := wire_assembler.feed(data, wal_lsn=lsn))
        ]
        assert from_wire == captured.transactions


def test_every_protocol_message_type_is_decoded(captured: Captured) -> None:
    kinds = {type(m) for m in captured.messages()}
    assert kinds == {
        Begin,
        Commit,
        Origin,
        Relation,
        Type,
        Insert,
        Update,
        Delete,
        Truncate,
        LogicalMessage,
    }


def test_begin_and_commit_frame_each_transaction(captured: Captured) -> None:
    messages = captured.messages()
    begins = [m for m in messages if isinstance(m, Begin)]
    commits = [m for m in messages if isinstance(m, Commit)]
    assert [b.final_lsn for b in begins] == [c.commit_lsn for c in commits]
    assert [b.commit_ts for b in begins] == [c.commit_ts for c in commits]
    assert all(c.flags == 0 and c.end_lsn > c.commit_lsn for c in commits)
    assert [c.commit_lsn for c in commits] == sorted({c.commit_lsn for c in commits})
    now = datetime.now(UTC)
    local = commits[:-1]  # the last one was replayed from an origin: see the test below
    assert all(abs(now - c.commit_ts) < timedelta(minutes=5) for c in local)
    # The slot function's lsn column: the Commit row is at the end of the commit record.
    commit_rows = [lsn for lsn, data in captured.sql if data[:1] == b"C"]
    assert commit_rows == [c.end_lsn for c in commits]


def test_relation_messages_describe_the_source_tables(captured: Captured) -> None:
    relations = {m.name: m for m in captured.messages() if isinstance(m, Relation)}
    events, content = relations["engagement_events"], relations["content"]
    assert (events.namespace, events.replica_identity) == ("public", "f")
    assert events.column_names == EVENT_COLUMNS
    assert [c.type_oid for c in events.columns] == [20, 2950, 2950, 25, 1184, 23, 25, 3802]
    # REPLICA IDENTITY FULL marks every column as part of the key.
    assert all(c.is_key for c in events.columns)
    assert (content.replica_identity, content.column_names) == ("d", CONTENT_COLUMNS)
    assert [c.is_key for c in content.columns] == [True] + [False] * 5
    assert all(c.type_modifier == -1 for c in (*events.columns, *content.columns))


def test_content_inserts_keep_unicode_and_nulls(captured: Captured) -> None:
    w = captured.written
    first = captured.transactions[0]
    assert [c.op for c in first.changes] == ["insert"] * 3
    assert first.changes[0].new == (
        w.content[0],
        f"c1-{w.suffix}",
        UNICODE_TITLE,
        "podcast",
        "1800",
        "2024-05-01 12:34:56.789+00",
    )
    assert first.changes[1].new == (w.content[1], f"c2-{w.suffix}", None, None, None, None)
    assert all(c.columns == CONTENT_COLUMNS and c.old is None for c in first.changes)
    assert {c.commit_lsn for c in first.changes} == {first.commit_lsn}
    assert {c.commit_ts for c in first.changes} == {first.commit_ts}


def test_event_inserts_decode_every_column(captured: Captured) -> None:
    w = captured.written
    e1, e2 = captured.transactions[1].changes
    ts = "2024-05-01 13:00:00.000001+00"
    assert e1.new is not None and e2.new is not None
    assert e1.new[:7] == (str(w.events[0]), w.content[0], w.user, "play", ts, None, UNICODE_DEVICE)
    assert e2.new[:7] == (str(w.events[1]), w.content[0], w.user, "finish", ts, "90000", "ios")
    assert json.loads(str(e1.new[7])) == SMALL_PAYLOAD == json.loads(str(e2.new[7]))
    assert (e1.table, e1.namespace, e1.qualified_table) == (
        "engagement_events",
        "public",
        "public.engagement_events",
    )


def test_a_multi_statement_transaction_keeps_its_order(captured: Captured) -> None:
    w = captured.written
    e1, e2, e3 = w.events[:3]
    txn = captured.transactions[2]
    insert, update, delete = txn.changes
    assert [insert.op, update.op, delete.op] == ["insert", "update", "delete"]
    assert insert.new is not None and insert.new[:7] == (
        str(e3),
        w.content[1],
        w.user,
        "click",
        "2024-05-01 13:00:00.000001+00",
        "0",
        None,
    )
    assert insert.new[7] is None
    # REPLICA IDENTITY FULL: the whole old row, so the old content_id can be retracted.
    assert update.old is not None and update.new is not None and not update.old_is_key_only
    assert (update.old[1], update.old[5]) == (w.content[0], "90000")
    assert (update.new[1], update.new[5]) == (w.content[1], None)
    assert update.old[0] == update.new[0] == str(e2)
    assert delete.new is None and delete.old is not None and not delete.old_is_key_only
    assert delete.old[:4] == (str(e1), w.content[0], w.user, "play")
    assert {c.commit_lsn for c in txn.changes} == {txn.commit_lsn}


def test_unchanged_toast_is_resolved_from_the_full_old_row(captured: Captured) -> None:
    big = json.dumps(BIG_PAYLOAD)
    insert = captured.transactions[3].changes[0]
    assert insert.new is not None and json.loads(str(insert.new[7])) == BIG_PAYLOAD
    assert len(str(insert.new[7])) == len(big)
    # On the wire the update's new tuple does not carry the 200 kB value again...
    updates = [m for m in captured.messages() if isinstance(m, Update) and m.old is not None]
    raw = next(m for m in updates if m.new[6] == "tv")
    assert raw.new[7] is UNCHANGED_TOAST
    assert raw.old is not None and raw.old[7] == insert.new[7]
    # ...and the assembler copies it from the old row.
    (update,) = captured.transactions[4].changes
    assert update.new is not None and update.old is not None
    assert update.new[6] == "tv" and update.old[6] == "web"
    assert update.new[7] == insert.new[7]
    assert UNCHANGED_TOAST not in update.new


def test_default_identity_sends_the_key_only_when_it_changes(captured: Captured) -> None:
    w = captured.written
    retitle, rekey = captured.transactions[5].changes
    assert retitle.old is None and retitle.new is not None and retitle.new[2] is None
    assert rekey.old_is_key_only
    assert rekey.old == (w.content[2], None, None, None, None, None)
    assert rekey.new == (w.rekeyed_c3, f"c3-{w.suffix}", "c3", "video", "60", None)
    (delete,) = captured.transactions[6].changes
    assert delete.op == "delete" and delete.old_is_key_only
    assert delete.old == (w.rekeyed_c3, None, None, None, None, None)


def test_truncate_of_the_shared_tables(captured: Captured) -> None:
    w = captured.written
    txn = captured.transactions[7]
    truncates = [c for c in txn.changes if c.op == "truncate"]
    assert sorted(c.table for c in truncates) == ["content", "engagement_events"]
    assert all(c.new is None and c.old is None for c in truncates)
    assert txn.changes[:2] == tuple(truncates)
    restored = [c.table for c in txn.changes[2:]]
    assert restored.count("content") == w.kept_content_rows
    assert restored.count("engagement_events") == w.kept_event_rows
    message = next(m for m in captured.messages() if isinstance(m, Truncate))
    assert (message.cascade, message.restart_identity) == (False, False)


def test_scratch_table_type_add_column_and_truncate_options(captured: Captured) -> None:
    w = captured.written
    messages = captured.messages()
    types = [m for m in messages if isinstance(m, Type)]
    assert types and {(t.namespace, t.name) for t in types} == {
        ("public", f"pgoutput_mood_{w.suffix}")
    }
    scratch = [m for m in messages if isinstance(m, Relation) and m.name == w.scratch]
    assert scratch[0].column_names == ("id", "mood", "note")
    assert scratch[0].columns[1].type_oid == types[0].oid
    # After ADD COLUMN the server describes the table again before the next change.
    assert scratch[1].column_names == ("id", "mood", "note", "extra")
    assert scratch[1].oid == scratch[0].oid
    before, after, truncate = (t.changes[0] for t in captured.transactions[8:11])
    assert (before.new, before.columns) == (("1", "happy", "before"), ("id", "mood", "note"))
    assert after.new == ("2", "sad", "after", "7")
    assert after.columns == ("id", "mood", "note", "extra")
    assert truncate.op == "truncate" and truncate.table == w.scratch
    truncates = [m for m in messages if isinstance(m, Truncate)]
    assert (truncates[-1].cascade, truncates[-1].restart_identity) == (True, True)


def test_origin_and_transactional_message(captured: Captured) -> None:
    w = captured.written
    txn = captured.transactions[11]
    assert txn.origin == f"pgoutput_origin_{w.suffix}"
    (origin,) = [m for m in captured.messages() if isinstance(m, Origin)]
    assert origin.origin_lsn == ORIGIN_LSN
    # Decoding reports the origin's commit timestamp, not the local commit time.
    assert txn.commit_ts == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert txn.changes[0].new == ("1", "happy", "from origin", None)  # RESTART IDENTITY
    (message,) = txn.messages
    assert message.transactional and message.prefix == "engagement-test"
    assert message.content.decode() == "héllo ✓"


def test_binary_option_sends_values_in_binary_format(captured: Captured) -> None:
    w = captured.written
    inserts = [decode_message(data) for _, data in captured.binary if data[:1] == b"I"]
    event = next(
        m for m in inserts if isinstance(m, Insert) and m.new[0] == struct.pack("!q", w.events[1])
    )
    _, content_id, user_id, kind, event_ts, duration, device, payload = event.new
    assert (content_id, user_id) == (uuid.UUID(w.content[0]).bytes, uuid.UUID(w.user).bytes)
    assert (kind, duration, device) == (b"finish", struct.pack("!i", 90_000), b"ios")
    assert isinstance(event_ts, bytes)
    (micros,) = struct.unpack("!q", event_ts)
    assert datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros) == datetime(
        2024, 5, 1, 13, 0, 0, 1, tzinfo=UTC
    )
    assert isinstance(payload, bytes) and payload[:1] == b"\x01"  # jsonb binary: version byte
    assert json.loads(payload[1:]) == SMALL_PAYLOAD
    # The assembler wants text and says so instead of passing bytes on.
    with pytest.raises(PgOutputError, match="binary-format value"):
        assembler = TransactionAssembler()
        for lsn, data in captured.binary:
            assembler.feed(data, wal_lsn=lsn)
