"""A sink in a child process of its own, so its library never holds the stream's GIL.

Embedded chDB starts its engine inside `connect()` without letting go of the GIL, and the stream
opens it again each time another process had the database (lib/clickhouse.py: a rollup run, a
check, a backfill). Each reopen froze every thread of the stream for 0.5-1 s: at 2,000
changes/s with a reader every 10 s, commit -> Redis p99 went from 0.33 s to 0.9-1.1 s.

Here the sink lives in a spawned child. `IsolatedSink` forwards read_checkpoint, write, setup,
tick and close over a pipe and gets back the result or the exception; `Sink.apply` (the
checkpoint filter) stays on this side, so the protocol of DESIGN §6 is unchanged: the child
writes the data and then its checkpoint, as the sink always did.

The child ends with its parent: a stream killed with -9 closes the pipe, and the child finishes
the write under way (data, then checkpoint: as if it had ended just before the kill), lets go of
the database and exits; one stuck in a write is ended ORPHAN_GRACE_S after its parent is gone.
(Not PR_SET_PDEATHSIG: it fires when the *thread* that started the child ends, which would kill
it mid-shutdown at every normal end of a run.) It ignores SIGINT/SIGTERM: the parent finishes
its batch and then closes it. It runs at nice 10, below the stream: chDB's part loading at every
reopen spans every core (lib/clickhouse.py).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from engagement_dagster.lib.clickhouse import NICENESS
from engagement_dagster.lib.sinks.base import Sink, SinkBatch

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0
ORPHAN_GRACE_S = 60.0  # a child whose parent is gone ends after this, even mid-write


class SinkProcessError(RuntimeError):
    """The sink's process ended, or its exception could not be sent back whole."""


class IsolatedSink(Sink):
    """`factory()` (picklable: a class or a functools.partial of one) built and used in a
    spawned child process; started on first use and again after it ended."""

    def __init__(self, name: str, factory: Callable[[], Sink]) -> None:
        super().__init__()
        self.name = name
        self._factory = factory
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.exit_code: int | None = None  # of the last child, once it ended

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def setup(self) -> None:
        self._call("setup")

    def read_checkpoint(self) -> int:
        return int(self._call("read_checkpoint"))

    def write(self, batch: SinkBatch, checkpoint: int) -> None:
        self._call("write", batch, checkpoint)

    def tick(self) -> None:
        if self._process is not None:  # upkeep never starts a child
            self._call("tick")

    def close(self) -> None:
        with self._lock:
            if self._process is None:
                return
            with contextlib.suppress(SinkProcessError):
                self._exchange("close")
            self._stop(CLOSE_TIMEOUT_S)

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            return self._exchange(method, *args)

    def _exchange(self, method: str, *args: Any) -> Any:
        assert self._conn is not None and self._process is not None
        try:
            self._conn.send((method, args))
            ok, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            code = self._stop(1.0)
            raise SinkProcessError(
                f"the {self.name} sink's process ended (exit code {code}) during {method}"
            ) from exc
        if not ok:
            raise value
        return value

    def _start(self) -> None:
        self._stop(1.0)
        context = multiprocessing.get_context("spawn")  # never fork a threaded process
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve, args=(child, self._factory, os.getpid()),
            name=f"engagement-sink-{self.name}", daemon=True,
        )  # fmt: skip
        process.start()
        child.close()
        self._process, self._conn = process, parent
        log.info("sink %s runs in process %s", self.name, process.pid)

    def _stop(self, timeout_s: float) -> int | None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join(5.0)
        self.exit_code = process.exitcode
        return process.exitcode


def _serve(conn: Connection, factory: Callable[[], Sink], parent_pid: int) -> None:
    """The child: build the sink, then answer calls until close or the parent is gone."""
    threading.Thread(target=_end_when_orphaned, args=(parent_pid,), daemon=True).start()
    os.nice(NICENESS)  # below the stream, whose reader and other sinks must not wait for us
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # the parent finishes its batch, then closes us
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sink = factory()
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # the parent closed the pipe or died: let go of the database
            break
        try:
            answer: tuple[bool, Any] = (True, getattr(sink, method)(*args))
        except Exception as exc:  # sent back; the parent's retry policy decides
            answer = (False, _portable(exc))
        conn.send(answer)
        if method == "close":
            break
    with contextlib.suppress(Exception):
        sink.close()


def _portable(exc: Exception) -> Exception:
    """The exception itself when it survives pickling, else one that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return SinkProcessError(f"{type(exc).__name__}: {exc}")
    return exc


def _end_when_orphaned(parent_pid: int) -> None:
    """Exit ORPHAN_GRACE_S after the parent is gone, in case a write never returns."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)
