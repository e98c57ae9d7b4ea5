"""A sink in a child process of its own, so its library never holds the stream's GIL.

Embedded chDB starts its engine inside `connect()` without letting go of the GIL, and the stream
opens it again each time another process had the database (lib/clickhouse.py: a rollup run, a
check, a backfill). Each reopen froze every thread of the stream for 0.5-1 s: at 2,000
changes/s with a reader every 10 s, commit -> Redis p99 went from 0.33 s to 0.9-1.1 s.

Here the sink lives in a child process. `IsolatedSink` forwards read_checkpoint, write, setup,
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

The child is a fresh interpreter that imports only the sink (`python -c`, the pipe's socket passed
down), not multiprocessing's spawn: spawn re-imports the parent's __main__, which in a Dagster run
is the whole `dagster` CLI (2.2 s of imports on an idle machine) before the sink may write a row.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from engagement_dagster.lib.clickhouse import NICENESS
from engagement_dagster.lib.sinks.base import Sink, SinkBatch

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0
ORPHAN_GRACE_S = 60.0  # a child whose parent is gone ends after this, even mid-write
CHILD_MAIN = "from engagement_dagster.lib.sinks.isolated import child_main; child_main()"


class SinkProcessError(RuntimeError):
    """The sink's process ended, or its exception could not be sent back whole."""


class IsolatedSink(Sink):
    """`factory()` (picklable: a class or a functools.partial of one) built and used in a
    child process; started by `start()` or on first use, and again after it ended."""

    def __init__(self, name: str, factory: Callable[[], Sink]) -> None:
        super().__init__()
        self.name = name
        self._factory = factory
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.exit_code: int | None = None  # of the last child, once it ended

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child now (its imports take 1-4 s), so the first write need not wait."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()

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
            if self._process is not None and self._process.poll() is not None:
                log.warning(
                    "the %s sink's process ended (exit code %s) between calls; starting another",
                    self.name, self._process.returncode,
                )  # fmt: skip
                self._stop(1.0)
            if self._process is None:
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
        parent, child = multiprocessing.Pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", CHILD_MAIN, str(child.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL, pass_fds=(child.fileno(),),
            )  # fmt: skip
        finally:
            child.close()
        self._process, self._conn = process, parent
        parent.send(self._factory)  # the child's first message: what to build
        log.info("sink %s runs in process %s", self.name, process.pid)

    def _stop(self, timeout_s: float) -> int | None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)
        self.exit_code = process.returncode
        return process.returncode


def child_main() -> None:
    """The child's entry (CHILD_MAIN): argv is the pipe's descriptor and the parent's pid."""
    fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    _serve(Connection(fd), parent_pid)


def _serve(conn: Connection, parent_pid: int) -> None:
    """The child: build the sink, then answer calls until close or the parent is gone."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # the parent finishes its batch, then closes us
    threading.Thread(target=_end_when_orphaned, args=(parent_pid,), daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        factory: Callable[[], Sink] = conn.recv()  # unpickling it imports the sink's module
    except EOFError:
        return
    # Below the stream, whose reader and other sinks must not wait for us; after the imports,
    # which at nice 10 next to a stream at full speed took 3 s instead of 1.3 s.
    os.nice(NICENESS)
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
