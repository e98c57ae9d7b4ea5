"""ClickHouse connections: a ClickHouse server over http(s), or embedded chDB on local disk.

One on-disk chDB database can be open in only one process at a time, so every chDB use holds an
exclusive file lock for a short open/use/close section; never keep a chDB client open across
batches or hand one to another thread.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client


class ClickHouseLockTimeout(TimeoutError):
    """Another process held the embedded database for longer than we were willing to wait."""


def chdb_path(dsn: str) -> Path | None:
    """The on-disk path of an embedded chDB DSN, or None for a server URL."""
    parsed = urlparse(dsn)
    if parsed.scheme != "chdb":
        return None
    return Path(parsed.path)


@contextmanager
def _chdb_lock(path: Path, timeout_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+") as lock_file:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClickHouseLockTimeout(
                        f"embedded ClickHouse at {path} stayed locked by another process for "
                        f"{timeout_s:.0f}s; find it with `fuser {path}.lock`"
                    ) from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextmanager
def clickhouse_client(dsn: str, *, lock_timeout_s: float = 60.0) -> Iterator[Client]:
    """A client for one short section of work; closed (and the chDB lock released) on exit."""
    path = chdb_path(dsn)
    if path is None:
        client = clickhouse_connect.get_client(dsn=dsn)
        try:
            yield client
        finally:
            client.close()
        return
    with _chdb_lock(path, lock_timeout_s):
        client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        try:
            yield client
        finally:
            client.close()
