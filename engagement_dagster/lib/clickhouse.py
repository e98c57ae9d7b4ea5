"""ClickHouse connections: a ClickHouse server over http(s), or embedded chDB on local disk.

One on-disk chDB database can be open in only one process at a time, so every chDB use holds an
exclusive file lock (`<path>.lock`) for a short open/use/close section; never keep a chDB client
open across batches or hand one to another thread. A process waiting for the lock says so with a
shared lock on `<path>.want`, so that the stream's long-held session lets go only when somebody
waits (lib/clickhouse.ClickHouseSession).

Embedded chDB is opened at nice 10 (`below_the_stream`): chDB loads the database's parts with a
pool of threads as wide as the machine on every open, and at normal priority that burst delayed
the stream's Redis and Kafka writes by up to a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse

from engagement_dagster.lib.secure import clickhouse_server_args

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

NICENESS = 10


@contextmanager
def below_the_stream() -> Iterator[None]:
    """Open embedded chDB at nice 10: the engine threads the open starts keep that priority.

    At 2,000 changes/s with another process opening chDB every 10 s, commit -> Redis p99 was
    1.07 s; with the stream's ClickHouse process and the reader's engine threads at nice 10,
    0.53 s (0.33 s with no reader). Linux niceness is per thread and raising it needs no
    privilege; the calling thread gets its own back afterwards where that is allowed (root,
    CAP_SYS_NICE), else it keeps nice 10.
    """
    thread = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, thread)
        if before < NICENESS:
            os.setpriority(os.PRIO_PROCESS, thread, NICENESS)
    except OSError:
        before = None
    try:
        yield
    finally:
        if before is not None and before < NICENESS:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, thread, before)


class ClickHouseLockTimeout(TimeoutError):
    """Another process held the embedded database for longer than we were willing to wait."""


def chdb_path(dsn: str) -> Path | None:
    """The on-disk path of an embedded chDB DSN, or None for a server URL."""
    parsed = urlparse(dsn)
    if parsed.scheme != "chdb":
        return None
    return Path(parsed.path)


def _acquire_lock(path: Path, timeout_s: float) -> IO[str]:
    """The exclusive lock file of an embedded database, held; raises after timeout_s. While it
    waits, it holds a shared lock on the `.want` file: the holder sees somebody is waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = open(f"{path}.lock", "a+")  # noqa: SIM115 - returned to the caller, held
    deadline = time.monotonic() + timeout_s
    with open(f"{path}.want", "a+") as want:
        fcntl.flock(want, fcntl.LOCK_SH)
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock_file  # leaving the `with` drops the shared lock on .want
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock_file.close()
                    raise ClickHouseLockTimeout(
                        f"embedded ClickHouse at {path} stayed locked by another process for "
                        f"{timeout_s:.0f}s; find it with `fuser {path}.lock`"
                    ) from None
                time.sleep(0.01)


def _others_waiting(want: IO[str]) -> bool:
    """Whether another process waits for the lock (holds a shared lock on `.want`)."""
    try:
        fcntl.flock(want, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(want, fcntl.LOCK_UN)
    return False


def _release_lock(lock_file: IO[str]) -> None:
    fcntl.flock(lock_file, fcntl.LOCK_UN)
    lock_file.close()


@contextmanager
def _chdb_lock(path: Path, timeout_s: float) -> Iterator[None]:
    lock_file = _acquire_lock(path, timeout_s)
    try:
        yield
    finally:
        _release_lock(lock_file)


def _get_client(**kwargs: Any) -> Client:
    """clickhouse_connect, imported at the first client: a stream whose embedded ClickHouse sink
    runs in a process of its own never makes one, and skips its import (0.2 s at start-up)."""
    import clickhouse_connect

    return clickhouse_connect.get_client(**kwargs)


@contextmanager
def clickhouse_client(dsn: str, *, lock_timeout_s: float = 60.0) -> Iterator[Client]:
    """A client for one short section of work; closed (and the chDB lock released) on exit."""
    path = chdb_path(dsn)
    if path is None:
        client = _get_client(**clickhouse_server_args(dsn))
        try:
            yield client
        finally:
            client.close()
        return
    with _chdb_lock(path, lock_timeout_s):
        with below_the_stream():
            client = _get_client(dsn=f"chdb://{path}")
        try:
            yield client
        finally:
            client.close()


class ClickHouseSession:
    """A client kept open across many short uses, for a writer that works every 200 ms.

    Reopening embedded chDB costs ~60 ms and, in chDB 4.4, leaves ~5 threads and about 8 MB of
    memory behind after every open/insert/close cycle (measured: 150 cycles, 807 threads; a
    stream reopening every 10 s grew 0.75 MB/s). So a writer holds the client (and the file
    lock) for as long as nobody else wants the database; once another process waits, it lets go
    when idle for `idle_s` or after holding it for `hold_s`: the other waits at most that long.
    Not thread-safe.
    """

    def __init__(self, dsn: str, *, hold_s: float = 10.0, idle_s: float = 1.0) -> None:
        self.dsn = dsn
        self.path = chdb_path(dsn)
        self.hold_s = hold_s
        self.idle_s = idle_s
        self._client: Client | None = None
        self._lock_file: IO[str] | None = None
        self._want: IO[str] | None = None  # `.want` of the embedded database, while held
        self._opened_at = 0.0
        self._used_at = 0.0

    @contextmanager
    def use(self) -> Iterator[Client]:
        if self._client is None:
            self._open()
        assert self._client is not None
        try:
            yield self._client
        except BaseException:
            self.release()  # a failed client may be broken: start afresh next time
            raise
        self._used_at = time.monotonic()
        if self._used_at - self._opened_at > self.hold_s and self._wanted():
            self.release()

    def release_if_due(self) -> None:
        """Release when somebody waits and we were idle for idle_s or held it for hold_s."""
        now = time.monotonic()
        due = now - self._used_at > self.idle_s or now - self._opened_at > self.hold_s
        if self._client is not None and due and self._wanted():
            self.release()

    def _wanted(self) -> bool:
        """Another process waits for the embedded database (never for a server)."""
        return self._want is not None and _others_waiting(self._want)

    def _open(self, lock_timeout_s: float = 60.0) -> None:
        if self.path is None:
            self._client = _get_client(**clickhouse_server_args(self.dsn))
        else:
            lock_file = _acquire_lock(self.path, lock_timeout_s)
            self._lock_file = lock_file
            self._want = open(f"{self.path}.want", "a+")  # noqa: SIM115 - closed in release
            try:
                with below_the_stream():
                    self._client = _get_client(dsn=f"chdb://{self.path}")
            except BaseException:
                self.release()
                raise
        self._opened_at = self._used_at = time.monotonic()

    def release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        want, self._want = self._want, None
        if want is not None:
            want.close()
        lock_file, self._lock_file = self._lock_file, None
        if lock_file is not None:
            _release_lock(lock_file)
